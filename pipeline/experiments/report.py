"""The `report` stage: did gradient-based tuning beat the baseline, at what cost, and how
trustworthy were its hypergradients? Reads every stage's metrics and per-epoch tables and
writes reports/summary.md, reports/summary.csv (one row per run), reports/quality.csv and
comparison figures.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline import inputs, io, plots
from pipeline.layout import Outputs, ReportOutputs
from pipeline.stats import DECISIONS
from pipeline.experiments import verdict
from pipeline.tracking import SILENT, Tracker

COLUMNS = ("run", "final_test_error", "mean_last_n_test_error", "last_n", "best_val_error", "val_test_gap",
           "work_gradient_equivalents", "hypergradient_work_share", "wall_time_s", "outcome")


def _work(m: dict) -> dict:
    """Counted work (machine load cannot change it); older metrics without it: n/a."""
    return {k: m.get(k) for k in ("work_gradient_equivalents", "hypergradient_work_share")}


FIGURES = {"densenet": "test_error_vs_compute.png", "mlp": "test_error_vs_compute_mlp.png"}  # per arena


def _json(path: Path) -> dict:
    return inputs.read_metrics(path)


def baseline_row(root: Path) -> dict | None:
    out = Outputs(root).baseline()
    if not out.metrics.exists():
        return None
    m, epochs = _json(out.metrics), inputs.read_csv(out.per_epoch)
    return {"run": "baseline", "final_test_error": m["final_test_error"], "mean_last_n_test_error":
            m["mean_last_n_test_error"], "last_n": m["last_n"], "best_val_error": m["best_val_error"],
            "val_test_gap": (None if m["outcome"] == "diverged"  # a diverged model's errors are no result
                             else epochs["val_error"].iloc[-1] - epochs["test_error"].iloc[-1]),
            "wall_time_s": m["wall_time_s"], **_work(m), "outcome": m["outcome"]}


def drmad_rows(root: Path, last_n: int) -> list[dict]:
    rows = []
    for tag in sorted(Outputs(root).instances("drmad"), key=lambda t: -float(t)):
        out = Outputs(root).drmad(tag)
        m = _json(out.metrics)
        meta = inputs.read_csv(out.meta_csv) if m["meta_iterations_completed"] else None
        result = meta if m["outcome"] != "diverged" else None  # a diverged run's errors are no result
        rows.append({
            "run": f"drmad {tag}", "final_test_error": m["final_test_error"],
            "mean_last_n_test_error": result["test_error"].tail(last_n).mean() if result is not None else None,
            "last_n": last_n, "best_val_error": m["best_val_error"],
            "val_test_gap": m["final_val_error"] - m["final_test_error"] if result is not None else None,
            "wall_time_s": meta["seconds"].sum() if meta is not None else None,
            **_work(m),
            "outcome": m["outcome"]})
    return rows


def adaptive_rows(root: Path) -> list[dict]:
    rows = []
    for name in Outputs(root).instances("adaptive"):
        m = _json(Outputs(root).adaptive(name).metrics)
        rows.append({"run": f"adaptive {name}", **{k: m.get(k) for k in COLUMNS[1:]},
                     "val_test_gap": m["final_val_test_gap"],
                     **_work(m)})
    return rows


def quality_rows(root: Path) -> list[dict]:
    """Per forward length, protocol and method: cosine with exact and norm ratio per
    meta-iteration (exact's own row: its norm), and the method's counted work. Protocols of one
    length stand side by side."""
    rows = []
    runs = sorted((_json(Outputs(root).quality(n).metrics) for n in Outputs(root).instances("quality")),
                  key=lambda m: (m["forward_steps"], m.get("protocol") != "thesis", m.get("protocol", "")))
    for m in runs:
        common = {"forward_steps": m["forward_steps"], "protocol": m.get("protocol")}
        rows.append({**common, "method": "exact", "cos_exact": "", "sign_cos_exact": "", "norm_ratio": "",
                     "norm": " / ".join(_fmt(n, ".3g") for n in m.get("exact/norm", [])), "mean_cos_exact": None,
                     **_cost(m, "exact"), "outcome": m["outcome"]})
        for method in m["methods"][1:]:
            cos, ratio = m[f"{method}/cos_exact"], m[f"{method}/norm_ratio"]
            finite = [c for c in cos if c is not None]
            rows.append({**common, "method": method, "cos_exact": " / ".join(_fmt(c, ".3f") for c in cos),
                         "sign_cos_exact": " / ".join(_fmt(c, ".3f") for c in m[f"{method}/sign_cos_exact"]),
                         "norm_ratio": " / ".join(_fmt(r, ".3g") for r in ratio), "norm": "",
                         "mean_cos_exact": sum(finite) / len(finite) if finite else None,
                         **_cost(m, method), "outcome": m["outcome"]})
    return rows


def _cost(m: dict, method: str) -> dict:
    """HVPs per meta-iteration (a method's reverse steps, Neumann terms, ...) and the mean counted
    work per meta-iteration in gradient evaluations (T training gradients included)."""
    work = [w for w in m[f"{method}/work"] if w is not None]
    return {"hvps": " / ".join(_fmt(s, ",.0f") for s in m[f"{method}/hvps"]),
            "work": round(sum(work) / len(work)) if work else None}


def quality_frontier(root: Path) -> dict[str, tuple[pd.DataFrame, int]]:
    """Per quality run (title: protocol, T), its hypergradient rows and T: the frontier's input."""
    out = {}
    runs = {n: _json(Outputs(root).quality(n).metrics) for n in Outputs(root).instances("quality")}
    for name, m in sorted(runs.items(), key=lambda r: r[1]["forward_steps"]):
        table = Outputs(root).quality(name).hypergrads_csv
        if table.exists():
            out[f"{m.get('protocol')}, T = {m['forward_steps']:,}"] = (inputs.read_csv(table), m["forward_steps"])
    return out


def quality_variants(root: Path) -> list[dict]:
    """Per quality run: what produced its numbers (protocol, T, meta-iterations, data) and the
    reverse steps S of DrMAD's heuristic under both readings of gamma (text, scripts)."""
    rows = []
    for name in Outputs(root).instances("quality"):
        m = _json(Outputs(root).quality(name).metrics)
        rows.append({"variant": m.get("variant", name), "protocol": m.get("protocol"),
                     "forward_steps": m["forward_steps"],
                     "meta_iterations": f"{m['meta_iterations_completed']} of {m.get('meta_iterations', '?')}",
                     "data": m.get("data", ""),
                     **{f"S_{w}": " / ".join(str(n) for n in m.get(f"reverse_steps_{w}", [])) for w in ("text", "scripts")},
                     "outcome": m["outcome"]})
    return rows


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown(table: pd.DataFrame, percent: tuple[str, ...] = ()) -> str:
    """A GitHub table; error columns in percent, missing values as n/a."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        cells = []
        for col, value in row.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("n/a")
            elif col in percent:
                cells.append(f"{100 * value:.2f}%")
            elif isinstance(value, float):
                cells.append(f"{value:.3g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_if_any(path: Path) -> pd.DataFrame | None:
    """A figure's optional input: its table, or None where the run wrote none."""
    return inputs.read_csv(path) if path.exists() else None


def test_error_curves(root: Path) -> dict[str, pd.DataFrame]:
    """Per run, test error per epoch (DrMAD: the epochs of its last meta-iteration)."""
    curves = {}
    out = Outputs(root)
    if (path := out.baseline().per_epoch).exists():
        curves["baseline"] = inputs.read_csv(path)[["epoch", "test_error"]]
    for tag in out.instances("drmad"):
        epochs = _csv_if_any(out.drmad(tag).epochs_csv)
        if epochs is not None and len(epochs):
            curves[f"drmad {float(tag):g}"] = epochs[epochs["meta_iteration"] == epochs["meta_iteration"].max()]
    for name in out.instances("adaptive"):
        if (epochs := _csv_if_any(out.adaptive(name).epochs_csv)) is not None:
            curves[f"adaptive {name}"] = epochs
    return curves


def layer_trajectories(root: Path) -> dict[str, pd.DataFrame]:
    """Per run and hyperparameter kind: (step, layer, mean), step = meta-iteration or epoch."""
    out, where = {}, Outputs(root)
    for tag in where.instances("drmad"):
        if (frame := _csv_if_any(where.drmad(tag).layers_csv)) is not None:
            out[f"drmad {tag}: log10 L2 per meta-iteration"] = frame.rename(columns={"meta_iteration": "step"})
    for name in where.instances("adaptive"):
        if (frame := _csv_if_any(where.adaptive(name).layers_csv)) is None:
            continue
        for kind, rows in frame.rename(columns={"epoch": "step"}).groupby("kind"):
            out[f"adaptive {name}: {kind} per epoch"] = rows
    return out


BATCHNORM = {"precise": "with BatchNorm population statistics recomputed over the training split before each "
                        "evaluation (precise BN)",
             "running": "with the BatchNorm running averages training left (not recomputed)"}


def search_rows(root: Path) -> list[dict]:
    rows = []
    for name in Outputs(root).instances("search"):
        m = _json(Outputs(root).search(name).metrics)
        rows.append({"sampler": m["sampler"], "trials": m["trials"], "diverged_trials": m["diverged_trials"],
                     "spent_gradient_evals": m["work_gradient_equivalents"],
                     "budget_gradient_evals": m["budget_gradient_equivalents"], "best_val_error": m["best_val_error"],
                     "best_log10_l2": m["best_log10_l2"], "best_alpha": 10 ** m["best_log10_alpha"],
                     "wall_time_s": m["wall_time_s"]})
    return rows


def conclusion(arena: str, table: pd.DataFrame, seeds: int, margin: float) -> str:
    """One line: what a researcher can conclude from an arena's decisions."""
    others = table[table["method"] != verdict.REFERENCE]
    groups = {d: list(others[others["decision"] == d]["method"]) for d in DECISIONS}
    words = {"better": "better than the baseline", "worse": "worse", "equivalent": f"equivalent within ±{100 * margin:.2f} points",
             "inconclusive": "inconclusive"}
    parts = [f"{words[d]}: {', '.join(ms)}" for d, ms in groups.items() if ms]
    return f"**{arena} arena, {seeds} seeds** — " + ("; ".join(parts) if parts else "no method compared") + "."


def verdict_section(root: Path, level: float, batchnorm: str, margin: float = 0.005
                    ) -> tuple[list[str], dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """The lead of summary.md: each arena's verdict (none when neither has run)."""
    tables, frames, text = {}, {}, []
    seeds = verdict.per_seed(root)
    if len(seeds):
        frames["densenet"] = verdict.with_total_compute(seeds)
    if len(arena := verdict.arena_seeds(root)):
        frames["mlp"] = arena
    if not frames:
        return [], tables, frames
    pct = int(round(100 * level))
    for name, frame in frames.items():
        tables[name] = verdict.table(frame, level, margin)
    text = ["# Verdict\n", *(conclusion(name, tables[name], frame.groupby("method").size().max(), margin) + "\n"
                             for name, frame in frames.items()),
            f"Decisions from the {pct}% interval of the paired difference (method minus baseline, seed by seed and image "
            f"by image): better or worse when it excludes 0, equivalent when it lies within ±{100 * margin:.2f} points "
            "(`verdict.margin_points`), inconclusive otherwise. Intervals (Student-t) carry both sources of chance: the "
            "seed-to-seed spread and the sampling of the test images, without counting their interaction twice "
            "(pipeline/stats.py). P(beats baseline): the share of seeds on which the method's test error is below the "
            "baseline's (ties one half), with a bootstrap interval over seeds. Costs are counted work in gradient "
            "evaluations (a training step 1; a reverse step one HVP at `work.hvp_cost`, the MLP's at "
            "`quality.hvp_cost`; one gradient per hypergradient; evaluations not counted), wall seconds beside them.\n"]
    if "densenet" in frames:
        frame = frames["densenet"]
        text += ["\n## DenseNet arena\n",
                 f"Every method's chosen hyperparameters retrained from scratch at the baseline's full schedule on "
                 f"{frame.groupby('method').size().max()} seeds (seed: initialisation, batch order and dropout masks), "
                 f"each evaluated once on the test split {BATCHNORM[batchnorm]} (one image is "
                 f"{100 / frame['test_size'].iloc[0]:.2f} points). Each seed tunes again before it retrains (tune@KIND: "
                 "the searches' sampler streams and trials, DrMAD's w_0, batches and masks are that seed's), so the "
                 "interval holds tuning's variance too. Tuning: what that seed's choice spent (the searches at the "
                 "search stages' budget, DrMAD's counted work; the adaptive method tunes while it trains, so its "
                 "tuning is the hypergradient work inside its final runs). DrMAD's choice: the meta-iteration with the "
                 "lowest validation error among those trained longest (its epochs grow to a cap).\n",
                 verdict.markdown(tables["densenet"], level), "\nTest error per seed (%):\n", _per_seed(frame, tables["densenet"])]
    if "mlp" in frames:
        frame = frames["mlp"]
        first = inputs.read_metrics(Outputs(root).arena_results()[0])
        text += ["\n## MLP arena\n",
                 f"The thesis' CPU experiment as a benchmark: the MNIST MLP of the quality study (protocol "
                 f"`{first['protocol']}`, {first['data']}, T = {first['steps']:,} steps per training). On each of "
                 f"{frame.groupby('method').size().max()} seeds every method tunes with that seed's own streams at one "
                 f"counted budget of {first['budget']:,.0f} gradient evaluations (DrMAD, DrMAD2 and the exact "
                 "hypergradient follow their signs on the per-unit log scales from the hand-set protocol; random "
                 "search, TPE and Hyperband search the global log scale and log L2), then its choice trains again from "
                 "the seed's final initialisation and batch order, the same for every method, and is tested once "
                 f"(one image is {100 / frame['test_size'].iloc[0]:.2f} points). The baseline is the hand-set protocol.\n",
                 verdict.markdown(tables["mlp"], level)]
        best = tables["mlp"].dropna(subset=["test_error_mean"]).sort_values("test_error_mean")["method"].iloc[0]
        text += [f"\nEvery method against the lowest mean test error, `{best}` (same seeds and images; decisions as "
                 "above):\n", verdict.versus(frame, best, level, margin),
                 "\nTest error per seed (%):\n", _per_seed(frame, tables["mlp"])]
    return text, tables, frames


def _per_seed(frame: pd.DataFrame, table: pd.DataFrame) -> str:
    return markdown(frame.pivot(index="method", columns="seed", values="test_error").reindex(table["method"])
                    .rename(columns=lambda seed: f"seed {seed}").reset_index(),
                    percent=tuple(f"seed {seed}" for seed in frame["seed"].unique()))


def provenance(root: Path, here: str | None) -> list[str]:
    """Which platform produced which stage's metrics, and whether that is this machine."""
    produced: dict[str, list[str]] = {}
    for path in sorted((root / "metrics").rglob("*.json")):
        platform = _json(path).get("platform", "not recorded")
        produced.setdefault(platform, []).append(str(path.relative_to(root / "metrics").with_suffix("")))
    if not produced:
        return []
    lines = ["\n## Produced on\n", "Bit-identical results are promised within one platform (processor, software "
             "stack, device); outputs from another platform agree within seed noise (`pipeline verify STAGE` "
             "checks).\n", "| platform | this machine | stage outputs |", "|---|---|---|"]
    for platform, outputs in produced.items():
        mark = "n/a" if here is None else ("yes" if platform == here else "**no**")
        lines.append(f"| {platform} | {mark} | {', '.join(outputs)} |")
    return lines


def run(root: Path = Path("."), last_n: int = 3, paths: ReportOutputs | None = None,
        tracker: Tracker = SILENT, batchnorm: str = "precise", level: float = 0.95,
        here: str | None = None, margin: float = 0.005) -> pd.DataFrame:
    paths = paths or Outputs(root).report()
    rows = [r for r in (baseline_row(root),) if r] + drmad_rows(root, last_n) + adaptive_rows(root)
    summary = pd.DataFrame(rows, columns=list(COLUMNS))
    quality = pd.DataFrame(quality_rows(root))
    searches = pd.DataFrame(search_rows(root))
    errors = ("final_test_error", "mean_last_n_test_error", "best_val_error", "val_test_gap")
    lead, tables, frames = verdict_section(root, level, batchnorm, margin)
    text = lead + ["\n# Tuning runs\n" if lead else "# Summary\n",
                   "The tuning stages as they ran, one seed each and at budgets that differ (epochs, schedules, "
                   "momentum): a record of what each did, not a verdict (that is the table above). Errors on the "
                   f"test split, measured {BATCHNORM[batchnorm]}. `work_gradient_equivalents` is the counted tuning "
                   "and training work in gradient evaluations, `hypergradient_work_share` the part of it spent on "
                   "hypergradients; wall time beside it depends on the machine and its load. DrMAD rows: final and "
                   "mean over the last n meta-iterations; the others: over the last n epochs.\n",
                   markdown(summary, percent=errors)]
    if len(searches):
        text += ["\nSearches (Optuna): trials run within the budget, the best trial by validation error.\n",
                 markdown(searches, percent=("best_val_error",))]
    if len(quality):
        text += ["\n## Hypergradient quality (MNIST MLP)\n",
                 "Each run: its protocol (params.yaml `quality.protocols`; docs/fidelity.md gives each setting's "
                 "source), forward length T, meta-iterations completed of those planned, data (source, "
                 "train/validation/test images) and DrMAD's heuristic S per meta-iteration under the thesis "
                 "text's weighting of gamma and the scripts' (the meta-iterations follow `heuristic`'s). "
                 "`thesis` trains the tanh MLP of thesis 3.1 and its scripts (centred pixels, w = e^s z for "
                 "weights and biases, biases' s fixed at 0.2, e^-4 ||z||^2 over every z); `relu_uncentred` is "
                 "this project's earlier reading (ReLU, plain biases, pixels in [0, 1]).\n",
                 markdown(pd.DataFrame(quality_variants(root))),
                 "\nPer meta-iteration: cosine with the exact hypergradient, of the hypergradients and of their "
                 "signs, and the norm ratio to exact (thesis figs 3.1-3.2); exact's rows give its own norm. "
                 "n/a where that hypergradient was not finite (float reversal overflows on long runs). "
                 "Methods (docs/algorithms.md §5-6b): exact and float reversal walk all T steps back; DrMAD the "
                 "straight line in S steps (heuristic, or fixed); DrMAD2 float reversal of the last K steps, then "
                 "the line; truncated reversal only the last K steps (K = S: DrMAD's cost); implicit "
                 "differentiation at w_T with N Neumann terms; greedy the last step alone. `hvps`: Hessian-vector "
                 "products per meta-iteration, its cost beside its quality; `work`: the mean counted work per "
                 "meta-iteration in gradient evaluations (T training gradients, the hypergradient's gradients and "
                 "its HVPs at `quality.hvp_cost`). reports/figures/hypergradient_frontier.png plots cosine "
                 "against work.\n",
                 markdown(quality.drop(columns=["mean_cos_exact"]))]
    text += provenance(root, here)
    paths.summary_md.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(paths.summary_md, "\n".join(text) + "\n")
    for target, frame in ((paths.summary_csv, summary), (paths.quality_csv, quality)):
        with io.atomic_path(target) as tmp:
            frame.to_csv(tmp, index=False)
    if tables:
        io.write_metrics(paths.verdict_json, {name: verdict.metrics(table) for name, table in tables.items()})
        with io.atomic_path(paths.verdict_seeds) as tmp:
            pd.concat([frame.assign(arena=name) for name, frame in frames.items()]).to_csv(tmp, index=False)
    with io.atomic_dir(paths.figures) as tmp:
        for name, table in tables.items():
            plots.save(verdict.figure(frames[name], table, level, name), tmp / FIGURES[name])
        plots.save(plots.runs_test_error(test_error_curves(root)), tmp / "test_error_per_epoch.png")
        if frontier := quality_frontier(root):
            plots.save(plots.frontier(frontier), tmp / "hypergradient_frontier.png")
        trajectories = layer_trajectories(root)
        if trajectories:
            plots.save(plots.layer_trajectories(trajectories), tmp / "hyperparameters_per_layer.png")
    if tables:
        _log_verdict(tracker, tables)
    extra = (paths.verdict_json, paths.verdict_seeds) if tables else ()
    for target in (paths.summary_md, paths.summary_csv, paths.quality_csv, *extra, *sorted(paths.figures.glob("*.png"))):
        tracker.log_artifact(target)
        tracker.log_parent_artifact(target, "report")
    return summary


def _log_verdict(tracker: Tracker, tables: dict[str, pd.DataFrame]) -> None:
    """The verdict's numbers on the stage's run and on the pipeline's parent run."""
    flat = {f"verdict/{arena}/{method}/{key}": value for arena, table in tables.items()
            for method, entry in verdict.metrics(table).items() for key, value in entry.items() if value is not None}
    tracker.log_metrics(flat)
    tracker.log_parent_metrics(flat)
