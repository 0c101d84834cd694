"""The adaptive stage runner: resume after an interruption, divergence as an outcome."""
import json
import math

import pandas as pd
import pytest
import torch

from pipeline.layout import Outputs
from pipeline.experiments import adaptive as adaptive_run
from pipeline.config import ConfigError, parse_params
from helpers import Interrupt, RecordingTracker, tiny_params, tiny_settings

TINY = tiny_settings(
    # 3 steps an epoch. a: hyper-updates at steps 3 and 7, the second through steps 5-7, across the
    # checkpoint after epoch 2 (a resume that lost the stored window would skip it)
    adaptive={"variants": {"a": {"every": 4, "window": 3, "l2_step": 0.5, "lr_step": 0.5},
                           "b": {"every": 3, "window": 2, "val_size": 50}},
              "epochs": 3, "batch_size": 32, "val_batch_size": 20, "last_n": 2})


@pytest.mark.parametrize("name", ["a", "b"])
def test_interrupted_run_resumes_to_identical_numbers(prepared, tmp_path, name):
    params = parse_params(TINY)
    straight = Outputs(tmp_path / "straight").adaptive(name)
    resumed = Outputs(tmp_path / "resumed").adaptive(name)
    expected = adaptive_run.run(params, prepared, name, straight)
    with pytest.raises(Interrupt):
        adaptive_run.run(params, prepared, name, resumed, tracker=RecordingTracker(stop_at_step=3))
    assert resumed.checkpoint.exists() and not resumed.metrics.exists()
    after = RecordingTracker()
    got = adaptive_run.run(params, prepared, name, resumed, tracker=after)
    assert after.epochs == [3]  # resumed: only the epoch the checkpoint lacked ran again
    untimed = lambda m: {k: v for k, v in m.items() if k not in ("wall_time_s", "hypergradient_time_share")}
    assert untimed(got) == untimed(expected) and got["hyper_updates"] == {"a": 2, "b": 3}[name]
    pd.testing.assert_frame_equal(pd.read_csv(straight.epochs_csv), pd.read_csv(resumed.epochs_csv))
    ours, theirs = torch.load(resumed.hypers, weights_only=False), torch.load(straight.hypers, weights_only=False)
    for kind in ("log10_l2", "log_lr"):
        assert all(torch.equal(ours[kind][k], theirs[kind][k]) for k in theirs[kind])
    layers = pd.read_csv(straight.layers_csv)
    ceiling = math.log10(1.0 / (1.0 * (1 - 0.9)))  # lr_max / (alpha (1 - momentum)): rates up to 10x their start
    assert set(layers["kind"]) == {"log10_l2", "log10_lr"} and (layers["mean"][layers["kind"] == "log10_lr"] <= ceiling).all()


def test_divergence_is_an_outcome(prepared, tmp_path):
    params = tiny_params(TINY, adaptive={"alpha": 1e30, "lr_max": 1e31})
    paths = Outputs(tmp_path).adaptive("a")
    metrics = adaptive_run.run(params, prepared, "a", paths)
    assert metrics["outcome"] == "diverged"
    assert json.loads(paths.metrics.read_text())["outcome"] == "diverged"
    values = torch.load(paths.hypers, weights_only=False)
    assert all(bool(torch.isfinite(v).all()) for kind in ("log10_l2", "log_lr") for v in values[kind].values())


def test_unknown_variant_or_oversized_split_is_a_config_error():
    with pytest.raises(ConfigError, match="--variant"):
        adaptive_run.variant(parse_params(TINY), "c")
    with pytest.raises(ConfigError, match="adaptive.variants.b.val_size"):
        adaptive_run.variant(parse_params(TINY), "b", {"sizes": {"train": 30, "val": 20}})


def test_counted_work_by_hand(prepared, tmp_path):
    """Variant a: 3 epochs of 3 steps = 9 gradients; hypergradients at steps 3 and 7 through
    window 3: 2 validation gradients and 2 x 3 HVPs; HVP cost 3 (params.yaml work.hvp_cost)."""
    params = parse_params({**TINY, "work": {"hvp_cost": 3.0}})
    metrics = adaptive_run.run(params, prepared, "a", Outputs(tmp_path).adaptive("a"))
    assert (metrics["work_training_gradients"], metrics["work_hypergradient_gradients"], metrics["work_hvps"]) == (9, 2, 6)
    assert metrics["work_gradient_equivalents"] == 9 + 2 + 3 * 6
    assert metrics["hypergradient_work_share"] == pytest.approx((2 + 18) / 29, abs=1e-6)
