"""The verdict table on hand-made finalist results: rows, intervals, sentences and costs."""
import json
import math

import pytest

from pipeline import io
from pipeline.layout import Outputs, timings_of
from pipeline.experiments import report, verdict
from pipeline.stats import Interval

N = 100  # test images


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def final_entry(wrong_by_seed, training_work=170, tuning_work=0.0, tuning_wall_s=0.0):
    seeds = [f"seed{s}" for s in wrong_by_seed]
    return {"test_error": {f"seed{s}": (None if w is None else len(w) / N) for s, w in wrong_by_seed.items()},
            "outcome": {f"seed{s}": ("diverged" if w is None else "finished") for s, w in wrong_by_seed.items()},
            "training_work": dict.fromkeys(seeds, training_work), "tuning_work": dict.fromkeys(seeds, tuning_work),
            "wall_time_s": dict.fromkeys(seeds, 7.0), "tuning_wall_s": dict.fromkeys(seeds, tuning_wall_s),
            "test_wrong": {f"seed{s}": w for s, w in wrong_by_seed.items()}}


def results(root):
    """Baseline: 31-33 wrong images of 100. random: 20 fewer on every seed, the same images (a
    clear gain). drmad -4: one image fewer on one seed only. adaptive: much worse; one seed diverged."""
    base = {s: list(range(30 + s)) for s in (1, 2, 3)}
    methods = {"baseline": base,
               "random": {s: list(range(20, 30 + s)) for s in (1, 2, 3)},
               "drmad -4": {1: list(range(30)), 2: list(range(32)), 3: list(range(33))},
               "adaptive a": {1: list(range(80)), 2: list(range(85)), 3: None}}
    kinds = {"baseline": ["baseline"], "search": ["random"], "drmad": ["drmad -4"], "adaptive": ["adaptive a"]}
    tuning = {"baseline": (0.0, 0.0), "search": (240.0, 9.0), "drmad": (263.0, 6.0), "adaptive": (30.0, 0.0)}
    for kind, names in kinds.items():  # written as the stages write them: timings apart
        tuned = kind in ("search", "drmad")  # their tuning's wall time is tune@KIND's
        work, wall = tuning[kind]
        io.write_metrics(root / f"metrics/final/{kind}.json", {"seeds": [1, 2, 3], "test_size": N, "methods": {
            m: final_entry(methods[m], 170, work, None if tuned else wall) for m in names}})
        if tuned:
            io.write_metrics(root / f"metrics/tune/{kind}.json", {"seeds": [1, 2, 3], "methods": {
                m: {f"seed{s}": {"tuning_work": work, "tuning_wall_s": wall} for s in (1, 2, 3)} for m in names}})
    write(root / "metrics/search/random.json", {"sampler": "random", "trials": 3, "diverged_trials": 0,
                                                "work_gradient_equivalents": 240.0, "budget_gradient_equivalents": 263.0,
                                                "best_val_error": 0.05, "best_log10_l2": -4.0, "best_log10_alpha": 0.0,
                                                "wall_time_s": 9.0})
    write(root / "metrics/drmad/-4.json", {"work_gradient_equivalents": 263.0, "seconds_per_meta_iteration": 2.0,
                                           "meta_iterations_completed": 3, "outcome": "finished",
                                           "final_test_error": 0.1, "final_val_error": 0.1, "best_val_error": 0.1,
                                           "hypergradient_work_share": 0.7})
    (root / "plots/drmad/-4").mkdir(parents=True)
    (root / "plots/drmad/-4/meta.csv").write_text("meta_iteration,test_error,seconds\n0,0.1,2\n1,0.1,2\n2,0.1,2\n")


def test_the_table_says_only_what_the_intervals_support(tmp_path):
    results(tmp_path)
    seeds = verdict.with_total_compute(verdict.per_seed(tmp_path))
    table = verdict.table(seeds, 0.95).set_index("method")
    assert list(table.index) == ["baseline", "random", "drmad -4", "adaptive a"]
    assert table.loc["random", "diff_mean"] == pytest.approx(-0.2)
    assert table.loc["random", "verdict"].startswith("better: 20.00 points fewer errors than the baseline")
    assert table.loc["random", "decision"] == "better" and table.loc["drmad -4", "decision"] == "inconclusive"
    assert table.loc["drmad -4", "verdict"].startswith("inconclusive")
    assert "1 of 3 seeds diverged" in table.loc["adaptive a", "verdict"]
    assert table.loc["adaptive a", "verdict"].startswith("worse: ") and table.loc["adaptive a", "decision"] == "worse"
    # random beats the baseline on every seed: probability of improvement 1, its bootstrap interval too
    assert (table.loc["random", "p_improve"], table.loc["random", "p_improve_low"]) == (1.0, 1.0)
    assert table.loc["adaptive a", "seeds"] == 3 and table.loc["adaptive a", "test_error_mean"] == pytest.approx(0.825)
    # costs: each seed's own tuning (the adaptive's inside its runs), its retraining's per seed
    assert table.loc["baseline", "tuning_work"] == 0 and table.loc["random", "tuning_work"] == 240
    assert table.loc["drmad -4", "tuning_work"] == 263 and table.loc["drmad -4", "tuning_wall_s"] == 6.0
    assert table.loc["adaptive a", "tuning_work"] == 30 and table.loc["random", "final_work"] == 170
    assert set(seeds[seeds["method"] == "random"]["total_work"]) == {410}


def test_the_report_leads_with_the_verdict(tmp_path):
    results(tmp_path)
    paths = Outputs(tmp_path).report()
    write(timings_of(tmp_path / "metrics/search/random.json"), {"platform": "another CPU; torch 2.0; cpu"})
    report.run(tmp_path, paths=paths, here="this CPU; torch 2.14; cpu")
    summary = paths.summary_md.read_text()
    assert "| another CPU; torch 2.0; cpu | **no** | search/random |" in summary
    assert "| not recorded | **no** | drmad/-4, final/adaptive, final/baseline, final/drmad, final/search, tune/drmad, tune/search |" in summary
    assert summary.startswith("# Verdict")
    assert "| random | 3 | 12.00 [" in summary and "better: 20.00 points fewer errors than the baseline, CI [" in summary
    assert "**densenet arena, 3 seeds** — better than the baseline: random; worse: adaptive a; inconclusive: drmad -4." \
        in summary
    assert "one image is 1.00 points" in summary
    assert (paths.figures / "test_error_vs_compute.png").stat().st_size > 10_000
    metrics = json.loads(paths.verdict_json.read_text())["densenet"]
    assert metrics["random"]["diff_mean"] == pytest.approx(-0.2) and metrics["baseline"]["diff_mean"] is None


@pytest.mark.parametrize("low, high, expected", [
    (-0.03, -0.01, "better: 2.00 points fewer errors than the baseline, CI [-3.00, -1.00]"),
    (0.01, 0.03, "worse: 2.00 points more errors than the baseline, CI [+1.00, +3.00]"),
    (-0.004, 0.003, "equivalent within ±0.50 points (-0.05, CI [-0.40, +0.30])"),
    (-0.01, 0.05, "inconclusive: +2.00 points, CI [-1.00, +5.00] reaches beyond 0 and ±0.50"),
])
def test_sentences_follow_the_interval(low, high, expected):
    mean = (low + high) / 2 if expected.startswith(("better", "worse", "equivalent")) else 0.02
    diff = Interval(mean, low, high, 3)
    assert verdict.sentence("x", diff, verdict.decide(diff, 0.005), 0.005, 0, 3) == expected


def test_a_method_has_one_colour_in_every_figure():
    """The verdict figure and the per-epoch figure list methods in different orders."""
    from pipeline.plots import method_colours
    verdict_order = method_colours(["baseline", "random", "tpe", "drmad -4", "drmad -2", "drmad -7", "adaptive k100"])
    epochs_order = method_colours(["adaptive k100", "baseline", "drmad -2", "drmad -4", "drmad -7"])
    assert all(epochs_order[m] == verdict_order[m] for m in epochs_order)
    assert len(set(verdict_order.values())) == len(verdict_order)


def seed_frame(wrong: dict[str, dict[int, list[int] | None]], n: int = 20):
    """verdict.per_seed's table from method -> seed -> wrong test images (None: diverged)."""
    import pandas as pd
    rows = [{"kind": "k", "method": m, "seed": s, "test_error": None if w is None else len(w) / n,
             "outcome": "diverged" if w is None else "finished", "final_work": 10.0, "final_wall_s": 1.0,
             "tuning_work": 0.0, "tuning_wall_s": 0.0, "test_wrong": w, "test_size": n}
            for m, seeds in wrong.items() for s, w in seeds.items()]
    return pd.DataFrame(rows)


def as_row(wrong: list[int], n: int = 20) -> list[int]:
    return [int(i in wrong) for i in range(n)]


def test_differences_pair_seed_by_seed_and_image_by_image():
    """Seed 2 of `m` diverged (not the last seed): its difference uses seeds 1, 3, 4 and, within a
    seed, image by image. Pairing by position (m's 1, 3, 4 against the baseline's 1, 2, 3) or by
    counts alone would give other numbers; `lone` has one usable seed: no interval; `same` is the
    baseline again: a zero difference, not a different method."""
    base = {1: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3, 4], 3: [10, 11, 12, 13, 14, 15], 4: [0, 1, 2, 3]}
    m = {1: [0, 1, 2, 3, 19], 2: None, 3: [10, 11, 12, 18], 4: [0, 1, 2]}
    frame = seed_frame({"baseline": base, "m": m, "lone": {1: None, 2: None, 3: [1], 4: None}, "same": base})
    for level in (0.95, 0.8):
        got = verdict.table(frame, level).set_index("method")
        by_hand = verdict.seeds_and_items_ci([[a - b for a, b in zip(as_row(m[s]), as_row(base[s]))] for s in (1, 3, 4)],
                                             level)
        assert (got.loc["m", "diff_mean"], got.loc["m", "diff_low"], got.loc["m", "diff_high"]) == \
            pytest.approx((by_hand.mean, by_hand.low, by_hand.high), abs=1e-12)
        error = verdict.seeds_and_items_ci([as_row(m[s]) for s in (1, 3, 4)], level)
        assert got.loc["m", "test_error_high"] == pytest.approx(error.high, abs=1e-12)  # the level reaches it too
        assert math.isnan(got.loc["lone", "diff_mean"]) and "no comparison" in got.loc["lone", "verdict"]
        assert got.loc["same", "diff_mean"] == 0 and got.loc["same", "decision"] == "equivalent"  # a zero-width interval
    wide, narrow = (verdict.table(frame, lv).set_index("method").loc["m"] for lv in (0.95, 0.8))
    assert wide["diff_high"] - wide["diff_low"] > narrow["diff_high"] - narrow["diff_low"]


def test_error_intervals_are_clipped_to_zero_and_one_hundred_percent():
    """Near 0% and 100% the t interval crosses the ends of an error rate: clipped, not reported as
    negative or above 100%."""
    frame = seed_frame({"baseline": {1: [0], 2: [], 3: [1, 2]},
                        "bad": {1: list(range(20)), 2: list(range(19)), 3: list(range(17))}})
    got = verdict.table(frame, 0.95).set_index("method")
    raw_base = verdict.seeds_and_items_ci([as_row(w) for w in ([0], [], [1, 2])])
    raw_bad = verdict.seeds_and_items_ci([as_row(list(range(k))) for k in (20, 19, 17)])
    assert raw_base.low < 0 and got.loc["baseline", "test_error_low"] == 0.0
    assert raw_bad.high > 1 and got.loc["bad", "test_error_high"] == 1.0
    assert got.loc["bad", "test_error_low"] == pytest.approx(raw_bad.low)  # the other end untouched


def arena_result(root, seed: int, wrong: dict[str, list[int]], n: int = 50) -> None:
    methods = {m: {"test_error": len(w) / n, "test_wrong": w, "outcome": "finished", "tuning_work": 0.0 if m == "baseline"
                   else 900.0, "tuning_wall_s": 1.0, "final_work": 100.0, "final_wall_s": 0.5} for m, w in wrong.items()}
    write(root / f"results/arena/{seed}.json", {"seed": seed, "protocol": "thesis", "steps": 100, "budget": 1000,
                                                "data": "mnist5k 30/20/50", "test_size": n, "methods": methods})


def test_the_mlp_arena_has_its_own_verdict_from_its_seeds(tmp_path):
    """Ten seeds: `drmad` misses 5 images fewer of 50 on every seed (better), `tpe` exactly the
    baseline's (equivalent), `random` one image fewer on every other seed (inconclusive at 50 images)."""
    for seed in range(10):
        base = list(range(seed % 3, 12 + seed % 3))
        arena_result(tmp_path, seed, {"baseline": base, "drmad": base[5:], "tpe": base,
                                      "random": base[1:] if seed % 2 else base})
    seeds = verdict.arena_seeds(tmp_path)
    assert len(seeds) == 40 and set(seeds["total_work"]) == {100.0, 1000.0}
    paths = Outputs(tmp_path).report()
    report.run(tmp_path, paths=paths, margin=0.005)
    summary = paths.summary_md.read_text()
    assert "**mlp arena, 10 seeds** — better than the baseline: drmad; equivalent within ±0.50 points: tpe; " \
           "inconclusive: random." in summary
    assert "## MLP arena" in summary and "## DenseNet arena" not in summary
    # against the best method, drmad: tpe is the baseline again, 5 images of 50 more on every seed
    versus = summary.split("against the lowest mean test error, `drmad`")[1].split("Test error per seed")[0]
    assert "| tpe | 10.00 [" in versus
    assert [line.split(" | ")[-1] for line in versus.splitlines() if line.startswith("| tpe")] == ["worse |"]
    assert "| baseline |" not in versus and "| drmad |" not in versus
    got = json.loads(paths.verdict_json.read_text())
    assert set(got) == {"mlp"} and got["mlp"]["drmad"]["diff_mean"] == pytest.approx(-0.1)
    assert got["mlp"]["drmad"]["p_improve"] == 1.0 and got["mlp"]["random"]["p_improve"] == pytest.approx(0.75)
    assert (paths.figures / "test_error_vs_compute_mlp.png").exists()
