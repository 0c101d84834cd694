"""The baseline runner: resume after an interruption, and divergence as an outcome."""
import json

import pandas as pd
import pytest
import torch

from pipeline.layout import Outputs
from pipeline.experiments import baseline
from pipeline.config import parse_params
from helpers import Interrupt, RecordingTracker, tiny_params, tiny_settings

TINY = tiny_settings(baseline={"epochs": 3, "batch_size": 32, "last_n": 2})


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_interrupted_run_resumes_to_identical_result(prepared, tmp_path):
    params = parse_params(TINY)
    straight = Outputs(tmp_path / "straight").baseline()
    resumed = Outputs(tmp_path / "resumed").baseline()
    expected = baseline.run(params, prepared, straight)

    with pytest.raises(Interrupt):
        baseline.run(params, prepared, resumed, tracker=RecordingTracker(stop_at_step=3))
    assert resumed.checkpoint.exists() and not resumed.metrics.exists()
    after = RecordingTracker()
    got = baseline.run(params, prepared, resumed, tracker=after)
    assert after.epochs == [3]  # resumed, not restarted: epochs 1-2 came from the checkpoint

    assert not resumed.checkpoint.exists()
    drop_time = lambda m: {k: v for k, v in m.items() if k not in ("wall_time_s", "images_per_s")}
    assert drop_time(got) == drop_time(expected)
    for key, tensor in weights(straight.model).items():
        assert torch.equal(tensor, weights(resumed.model)[key]), key
    pd.testing.assert_frame_equal(pd.read_csv(straight.per_epoch), pd.read_csv(resumed.per_epoch))


def test_checkpoint_of_other_settings_is_ignored(prepared, tmp_path):
    paths = Outputs(tmp_path).baseline()
    with pytest.raises(Interrupt):
        baseline.run(parse_params(TINY), prepared, paths, tracker=RecordingTracker(stop_at_step=2))
    other = tiny_params(TINY, baseline={"log10_l2": -3.0})
    after = RecordingTracker()
    baseline.run(other, prepared, paths, tracker=after)
    assert after.epochs == [1, 2, 3]  # started over
    fresh = Outputs(tmp_path / "fresh").baseline()
    baseline.run(other, prepared, fresh)
    for key, tensor in weights(fresh.model).items():
        assert torch.equal(tensor, weights(paths.model)[key]), key


def test_divergence_is_an_outcome_not_a_crash(prepared, tmp_path):
    params = tiny_params(TINY, baseline={"alpha": 1e30})
    paths = Outputs(tmp_path).baseline()
    metrics = baseline.run(params, prepared, paths)
    assert metrics["outcome"] == "diverged"
    assert metrics["epochs_completed"] == 1  # alpha 1e30: the first epoch's losses are already NaN
    assert json.loads(paths.metrics.read_text())["outcome"] == "diverged"
    assert paths.model.exists() and paths.per_epoch.exists()


def test_metrics_report_final_and_mean_of_last_n(prepared, tmp_path):
    paths = Outputs(tmp_path).baseline()
    metrics = baseline.run(parse_params(TINY), prepared, paths)
    per_epoch = pd.read_csv(paths.per_epoch)
    assert list(per_epoch["epoch"]) == [1, 2, 3]
    assert metrics["final_test_error"] == per_epoch["test_error"].iloc[-1]
    assert metrics["mean_last_n_test_error"] == pytest.approx(per_epoch["test_error"].iloc[-2:].mean())
    assert metrics["best_val_error"] == per_epoch["val_error"].min()
    assert metrics["outcome"] == "finished" and metrics["images_per_s"] > 0
    assert (metrics["work_gradient_equivalents"], metrics["hypergradient_work_share"]) == (9, 0.0)  # 3 epochs x 3 steps
