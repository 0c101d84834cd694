"""The exact half of a quality meta-iteration in a second process: the same bits as in one
process, and its failures surface here (a divergence stays an outcome, a dead worker an error,
never a hang)."""
import time

import pandas as pd
import pytest
import torch

from pipeline.layout import Outputs
from pipeline.experiments import quality
from pipeline.hypergrad import exact_process
from pipeline.hypergrad.hvp import double_backward
from tests.test_quality import splits, tiny  # noqa: F401 (a fixture)


def build(params, steps, splits):
    built, info = splits
    protocol = params.quality.protocols["p"]
    problem = quality.build_problem(params.quality, protocol, params.seed, steps, built, info, torch.device("cpu"))
    return problem, quality.penalty(problem, protocol, torch.device("cpu")), protocol


def test_two_processes_give_the_one_process_bits(splits):
    """Two meta-iterations' worth (the second at other scales, which the worker must take up):
    every hypergradient, the trace and w_T equal to those computed in this process."""
    params, steps = tiny(), 30
    cfg = params.quality
    problem, l2, multiplier = build(params, steps, splits)
    with exact_process.ExactProcess("double_backward", torch.get_num_threads()) as worker:
        worker.load(problem, l2, set(quality.spread(steps, cfg.trace_points)))
        firsts = []
        for shift in (0.0, 0.3):
            for value in problem.scales.values.values():
                value.add_(shift)
            one = quality.hypergradients(quality.Setup(problem, l2, cfg, multiplier, double_backward))
            two = quality.hypergradients(quality.Setup(problem, l2, cfg, multiplier, double_backward, exact_worker=worker))
            for method in quality.methods(cfg):
                assert torch.equal(one["grads"][method], two["grads"][method]), method
            assert one["trace"] == two["trace"] and len(one["trace"]["step"]) == cfg.trace_points
            assert torch.equal(one["w_T"], two["w_T"]) and one["val_loss"] == two["val_loss"]
            firsts.append(two["grads"]["exact"])
        assert worker.cpu_s > 0
    assert not torch.equal(*firsts)  # the scales moved, and the worker followed them


def test_the_stage_gives_the_same_tables_with_either_schedule(tmp_path, monkeypatch):
    runs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("PIPELINE_EXACT_PROCESS", mode)
        paths = Outputs(tmp_path / mode).quality("t20")
        runs[mode] = (quality.run(tiny(), "t20", paths), paths)
    assert runs["1"][0]["processes"] == 2 and runs["0"][0]["processes"] == 1
    for table in ("hypergrads_csv", "errors_csv", "reverse_csv"):
        pd.testing.assert_frame_equal(pd.read_csv(getattr(runs["1"][1], table)), pd.read_csv(getattr(runs["0"][1], table)))


def test_a_divergence_in_the_child_is_the_run_s_outcome(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_EXACT_PROCESS", "1")
    metrics = quality.run(tiny({"alpha": 1e9}), "t20", Outputs(tmp_path).quality("t20"))
    assert metrics["outcome"] == "diverged" and metrics["meta_iterations_completed"] == 0


def test_a_dead_child_is_an_error_not_a_hang(splits):
    params = tiny()
    problem, l2, multiplier = build(params, 10, splits)
    with exact_process.ExactProcess("double_backward", 1) as worker:
        worker._process.kill()
        worker.load(problem, l2, None)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exact reversal process ended"):
            quality.hypergradients(quality.Setup(problem, l2, params.quality, multiplier, double_backward, exact_worker=worker))
        assert time.monotonic() - started < 30


def test_auto_wants_the_child_only_with_cores_to_spare(monkeypatch):
    monkeypatch.delenv("PIPELINE_EXACT_PROCESS", raising=False)
    monkeypatch.setattr("pipeline.training.auto_threads", lambda: 2)
    assert exact_process.wanted("cpu", 1) and not exact_process.wanted("cpu", 2)
    assert not exact_process.wanted("cpu", "auto")  # `auto` threads already take every core
    monkeypatch.setattr("pipeline.training.auto_threads", lambda: 1)
    assert not exact_process.wanted("cpu", 1)
    monkeypatch.setenv("PIPELINE_EXACT_PROCESS", "1")
    assert exact_process.wanted("cpu", 1)
