"""Metrics hold results only: wall times, throughputs and the platform go to timings/, so a rerun
with equal results leaves metrics/ byte for byte as it was, and readers still see both."""
from pathlib import Path

from helpers import tiny_params
from pipeline import inputs, io
from pipeline.experiments import baseline, quality
from pipeline.layout import Outputs, timings_of

NESTED = {"outcome": "finished", "wall_time_s": 3.2, "platform": "cpu x",
          "methods": {"a": {"test_error": {"seed1": 0.1}, "wall_time_s": {"seed1": 4.0}},
                      "b": {"seed1": {"tuning_work": 8, "tuning_wall_s": 1.5}}},
          "seconds_per_meta_iteration": 2.0, "work_hvps": 10, "hypergradient_work_share": 0.4}


def test_timings_split_off_and_merge_back(tmp_path):
    path = tmp_path / "metrics/drmad/-4.0.json"
    io.write_metrics(path, NESTED)
    results = inputs.read_json(path)
    assert results == {"outcome": "finished", "methods": {"a": {"test_error": {"seed1": 0.1}},
                                                          "b": {"seed1": {"tuning_work": 8}}},
                       "work_hvps": 10, "hypergradient_work_share": 0.4}
    assert timings_of(path) == tmp_path / "timings/drmad/-4.0.json"
    assert inputs.read_metrics(path) == NESTED


def test_timings_of_follows_the_layout():
    assert timings_of(Path("r/metrics/baseline.json")) == Path("r/timings/baseline.json")
    assert timings_of(Path("r/results/arena/3.json")) == Path("r/timings/arena/3.json")
    assert timings_of(Path("r/reports/verdict.json")) == Path("r/reports/verdict_timings.json")


def test_identical_reruns_leave_metrics_unchanged(tmp_path, prepared):
    """Two runs of the same stage write the same metrics bytes; their timings exist and differ in
    what the clock measured (a wall time in the metrics would fail the first assertion)."""
    params = tiny_params(baseline={"epochs": 1})
    q = tiny_params(quality={"protocols": {"thesis": {"hidden": [8], "batch_size": 20}}, "meta_iterations": 1,
                             "variants": {"t": {"protocol": "thesis", "steps": 10}}, "drmad_steps": 3, "last": 3,
                             "trace_points": 5, "data": {"train_size": 200, "val_size": 100, "test_size": 100}})
    for root in ("a", "b"):
        baseline.run(params, prepared, Outputs(tmp_path / root).baseline())
        quality.run(q, "t", Outputs(tmp_path / root).quality("t"), exact_worker=None)
    for files in (lambda r: Outputs(r).baseline(), lambda r: Outputs(r).quality("t")):
        a, b = files(tmp_path / "a").metrics, files(tmp_path / "b").metrics
        assert a.read_bytes() == b.read_bytes()
        assert "wall_time_s" in inputs.read_json(timings_of(a)) and "platform" in inputs.read_json(timings_of(a))
    assert "images_per_s" in inputs.read_metrics(Outputs(tmp_path / "a").baseline().metrics)
