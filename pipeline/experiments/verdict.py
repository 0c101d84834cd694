"""The verdict: did a tuning method beat the baseline, and at what cost? Two arenas.

- densenet: the finalists (metrics/final/*.json: test error per method and seed, each seed's
  choice tuned at that seed by tune@KIND and retrained from scratch at the baseline's schedule),
  with each seed's tuning work;
- mlp: the MLP arena (results/arena/SEED.json: per seed, every method tuned with that seed's
  streams at one counted budget, then retrained and tested).

Per method: the mean test error over seeds with its confidence interval, the paired difference to
the baseline on the same seeds and test images with its interval, a decision from that interval
and the margin `verdict.margin_points` (better, worse, equivalent within the margin, or
inconclusive), the probability of beating the baseline on a random seed, and the costs.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pipeline import inputs, plots
from pipeline.config import TUNED_KINDS
from pipeline.layout import Outputs

from pipeline.stats import Interval, decide, probability_of_improvement, seeds_and_items_ci

REFERENCE = "baseline"
KIND_ORDER = ("baseline", "search", "drmad", "adaptive")
ARENAS = ("densenet", "mlp")
SEED_COLUMNS = ["kind", "method", "seed", "test_error", "outcome", "final_work", "final_wall_s", "run_tuning_work",
                "run_tuning_wall_s", "test_wrong", "test_size"]


ENTRY = ("test_error", "outcome", "training_work", "wall_time_s", "tuning_work", "tuning_wall_s", "test_wrong")


def per_seed(root: Path) -> pd.DataFrame:
    """One row per (method, seed): test error (None if that run diverged), final training work
    and wall seconds, and the tuning work charged to it."""
    rows = []
    for kind in KIND_ORDER:
        path = Outputs(root).final(kind).metrics
        if not path.is_file():
            continue
        final = inputs.read_metrics(path, ("methods", "test_size"))
        tuned = tuning_times(root, kind)
        if not all(isinstance(e, dict) and set(ENTRY) <= set(e) for e in final["methods"].values()):
            raise inputs.InputError(f"{path}: a method's entry lacks some of {', '.join(ENTRY)}; it is written by "
                                    f"final@{kind}: run `dvc repro final@{kind}`")
        for method, entry in final["methods"].items():
            for seed, error in entry["test_error"].items():
                rows.append({"kind": kind, "method": method, "seed": int(seed.removeprefix("seed")),
                             "test_error": error, "outcome": entry["outcome"][seed],
                             "final_work": entry["training_work"][seed], "final_wall_s": entry["wall_time_s"][seed],
                             "run_tuning_work": entry["tuning_work"][seed],
                             "run_tuning_wall_s": tuned[method][seed] if tuned else entry["tuning_wall_s"][seed],
                             "test_wrong": entry["test_wrong"][seed], "test_size": final["test_size"]})
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def tuning_times(root: Path, kind: str) -> dict | None:
    """Per method and seed, tune@KIND's wall seconds (its timings; the finalists retrain results
    only), or None for a kind tuned inside its own run."""
    if kind not in TUNED_KINDS:
        return None
    path = Outputs(root).tune(kind).metrics
    methods = inputs.read_metrics(path, ("methods",))["methods"]
    return {method: {seed: c.get("tuning_wall_s") for seed, c in by_seed.items()} for method, by_seed in methods.items()}


def arena_seeds(root: Path) -> pd.DataFrame:
    """The MLP arena's rows, one per (method, seed), with the columns of `with_total_compute`:
    each seed's own tuning work and time, then its retraining's."""
    rows = []
    for path in Outputs(root).arena_results():
        result = inputs.read_metrics(path, ("seed", "methods", "test_size"))
        for method, e in result["methods"].items():
            rows.append({"kind": "arena", "method": method, "seed": int(result["seed"]), "test_error": e["test_error"],
                         "outcome": e["outcome"], "final_work": e["final_work"], "final_wall_s": e["final_wall_s"],
                         "run_tuning_work": e["tuning_work"], "run_tuning_wall_s": e["tuning_wall_s"],
                         "test_wrong": e["test_wrong"], "test_size": result["test_size"]})
    return with_total_compute(pd.DataFrame(rows, columns=SEED_COLUMNS))


def with_total_compute(seeds: pd.DataFrame) -> pd.DataFrame:
    """Per seed: its own tuning's work (tune@KIND's, or the adaptive run's hypergradients) plus its
    retraining's: the compute that produced that test error."""
    out = seeds.copy()
    out["tuning_work"], out["tuning_wall_s"] = out["run_tuning_work"], out["run_tuning_wall_s"]
    out["total_work"] = out["tuning_work"] + out["final_work"]
    return out


def sentence(method: str, diff: Interval | None, decision: str | None, margin: float, diverged: int, n: int) -> str:
    """What the interval of the paired difference supports, in words (percentage points)."""
    note = f" ({diverged} of {n} seeds diverged and are left out)" if diverged else ""
    if method == REFERENCE:
        return "the reference" + note
    if diff is None:
        return "no comparison: fewer than two seeds with a result on both sides" + note
    d, low, high = (100 * x for x in (diff.mean, diff.low, diff.high))
    span, within = f"CI [{low:+.2f}, {high:+.2f}]", f"±{100 * margin:.2f}"
    words = {"better": f"better: {-d:.2f} points fewer errors than the baseline, {span}",
             "worse": f"worse: {d:.2f} points more errors than the baseline, {span}",
             "equivalent": f"equivalent within {within} points ({d:+.2f}, {span})",
             "inconclusive": f"inconclusive: {d:+.2f} points, {span} reaches beyond 0 and {within}"}
    return words[decision] + note


def wrong_rows(runs: pd.DataFrame) -> dict[int, list[int]]:
    """Seed -> 0/1 per test image (1: wrong), for the seeds whose run did not diverge."""
    out = {}
    for r in runs.dropna(subset=["test_error"]).itertuples(index=False):
        row = [0] * int(r.test_size)
        for i in r.test_wrong:
            row[i] = 1
        out[int(r.seed)] = row
    return out


def table(seeds: pd.DataFrame, level: float, margin: float = 0.005) -> pd.DataFrame:
    """One row per method, the baseline first. Intervals carry the seed-to-seed spread and the
    test split's sampling of images (`seeds_and_items_ci`); differences pair seeds and images.
    `margin`: equivalence margin as an error rate (0.005: half a point)."""
    reference = wrong_rows(seeds[seeds["method"] == REFERENCE])
    base = seeds[seeds["method"] == REFERENCE]
    reference_error = dict(zip(base["seed"].astype(int), base["test_error"]))
    rows = []
    for method, runs in seeds.groupby("method", sort=False):
        wrong = wrong_rows(runs)
        error = seeds_and_items_ci(list(wrong.values()), level) if wrong else None
        common = [s for s in wrong if s in reference]
        diff = (seeds_and_items_ci([[a - b for a, b in zip(wrong[s], reference[s])] for s in common], level)
                if len(common) >= 2 and method != REFERENCE else None)
        errors = dict(zip(runs["seed"].astype(int), runs["test_error"]))
        improve = (probability_of_improvement([errors[s] for s in common], [reference_error[s] for s in common], level)
                   if diff else None)
        decision = decide(diff, margin) if diff else None
        rows.append({"method": method, "seeds": len(runs), "test_error_mean": error.mean if error else None,
                     # an error rate lies in [0, 1]: the interval is clipped to it
                     "test_error_low": max(error.low, 0.0) if error else None,
                     "test_error_high": min(error.high, 1.0) if error else None,
                     "diff_mean": diff.mean if diff else None, "diff_low": diff.low if diff else None,
                     "diff_high": diff.high if diff else None, "decision": decision,
                     "p_improve": improve.mean if improve else None, "p_improve_low": improve.low if improve else None,
                     "p_improve_high": improve.high if improve else None,
                     "tuning_work": runs["tuning_work"].mean(), "tuning_wall_s": runs["tuning_wall_s"].mean(),
                     "final_work": runs["final_work"].mean(), "final_wall_s": runs["final_wall_s"].mean(),
                     "verdict": sentence(method, diff, decision, margin,
                                         int(runs["test_error"].isna().sum()), len(runs))})
    return pd.DataFrame(rows)


def versus(seeds: pd.DataFrame, reference: str, level: float, margin: float) -> str:
    """A markdown table: every other method minus `reference` (paired by seed and image), its
    interval and decision; what the baseline column cannot say when every method beats it."""
    against, lines = wrong_rows(seeds[seeds["method"] == reference]), []
    for method, runs in seeds.groupby("method", sort=False):
        wrong = wrong_rows(runs)
        common = [s for s in wrong if s in against]
        if method in (reference, REFERENCE) or len(common) < 2:
            continue
        diff = seeds_and_items_ci([[a - b for a, b in zip(wrong[s], against[s])] for s in common], level)
        lines.append(f"| {method} | {_pct(diff.mean)} [{_pct(diff.low)}, {_pct(diff.high)}] | {decide(diff, margin)} |")
    head = [f"| method | minus {reference}, points (paired, {int(round(100 * level))}% CI) | decision |", "|---|---|---|"]
    return "\n".join(head + lines) + "\n"


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.2f}"


def markdown(verdict: pd.DataFrame, level: float) -> str:
    pct = int(round(100 * level))
    head = (f"| method | seeds | test error % (mean, {pct}% CI) | minus baseline, points (paired, {pct}% CI) | "
            f"P(beats baseline on a seed) ({pct}% CI) | tuning cost: gradient evals / wall s | "
            "final cost per seed: gradient evals / wall s | verdict |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in verdict.itertuples(index=False):
        error = f"{_pct(r.test_error_mean)} [{_pct(r.test_error_low)}, {_pct(r.test_error_high)}]"
        diff = ("—" if r.method == REFERENCE else
                f"{_pct(r.diff_mean)} [{_pct(r.diff_low)}, {_pct(r.diff_high)}]" if r.diff_mean is not None else "n/a")
        improve = ("—" if r.method == REFERENCE else f"{r.p_improve:.2f} [{r.p_improve_low:.2f}, {r.p_improve_high:.2f}]"
                   if r.p_improve is not None else "n/a")
        lines.append(f"| {r.method} | {r.seeds} | {error} | {diff} | {improve} | {r.tuning_work:.0f} / "
                     f"{r.tuning_wall_s:.0f} | {r.final_work:.0f} / {r.final_wall_s:.0f} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def metrics(verdict: pd.DataFrame) -> dict:
    """The verdict as `dvc metrics` and MLflow read it: method -> numbers (null where none)."""
    keys = ("test_error_mean", "test_error_low", "test_error_high", "diff_mean", "diff_low", "diff_high",
            "p_improve", "p_improve_low", "p_improve_high", "tuning_work", "tuning_wall_s", "final_work", "final_wall_s")

    def clean(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)
    return {r["method"]: {k: clean(r[k]) for k in keys} for r in verdict.to_dict("records")}


def figure(seeds: pd.DataFrame, verdict: pd.DataFrame, level: float, arena: str = "densenet") -> Figure:
    """Test error against total compute (tuning + final training, gradient evaluations): one
    small point per seed, the method's mean with its interval as a large one."""
    fig, ax = plots.plt.subplots(figsize=(7.5, 4.8))
    palette = plots.method_colours(list(verdict["method"]))
    for r in verdict.itertuples(index=False):
        runs = seeds[(seeds["method"] == r.method) & seeds["test_error"].notna()]
        colour = palette[r.method]
        ax.scatter(runs["total_work"], 100 * runs["test_error"], s=14, alpha=0.6, color=colour)
        if r.test_error_mean is not None:
            low = r.test_error_low if math.isfinite(r.test_error_low) else r.test_error_mean
            high = r.test_error_high if math.isfinite(r.test_error_high) else r.test_error_mean
            ax.errorbar(runs["total_work"].mean(), 100 * r.test_error_mean,
                        yerr=[[100 * (r.test_error_mean - low)], [100 * (high - r.test_error_mean)]],
                        fmt="o", ms=7, capsize=4, color=colour, label=r.method)
    ax.set(xlabel="total compute per seed: tuning + final training (gradient evaluations)", ylabel="test error (%)",
           title=f"{arena} arena: test error per seed, mean and {int(round(100 * level))}% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig
