"""The few hyperparameter curves a run logs: quantiles over every weight's value."""
import pytest
import torch

from pipeline.experiments.summaries import hyper_quantiles
from pipeline.hyper import HyperSpace


def test_quantiles_over_every_weight_by_hand():
    space = HyperSpace.create({"a.weight": (4,), "b.weight": (2, 3)}, "log10_l2", 0.0, "parameter")
    space.values["a.weight"].copy_(torch.arange(4.0))
    space.values["b.weight"].copy_(torch.arange(4.0, 10.0).reshape(2, 3))
    got = hyper_quantiles(space, "log10_l2")  # the values 0..9
    assert got == pytest.approx({"hyper/log10_l2/p05": 0.45, "hyper/log10_l2/p25": 2.25, "hyper/log10_l2/median": 4.5,
                                 "hyper/log10_l2/p75": 6.75, "hyper/log10_l2/p95": 8.55, "hyper/log10_l2/mean": 4.5})


def test_shared_values_count_once_per_weight_and_scale_applies():
    """One value per unit of a 2x3 weight counts three times: what the weights see."""
    space = HyperSpace.create({"w.weight": (2, 3)}, "log_lr", 0.0, "unit")
    space.values["w.weight"].copy_(torch.tensor([0.0, 1.0]))
    got = hyper_quantiles(space, "log10_lr", scale=2.0)
    assert got["hyper/log10_lr/mean"] == pytest.approx(1.0) and got["hyper/log10_lr/p25"] == pytest.approx(0.0)
