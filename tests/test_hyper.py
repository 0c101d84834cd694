import pytest
import torch

from pipeline.hyper import HyperSpace
from pipeline.models import DenseNet


@pytest.fixture
def model():
    return DenseNet(depth=7, growth_rate=4, init_maps=4, in_channels=1)


@pytest.mark.parametrize("sharing,count", [("parameter", None), ("unit", None), ("layer", None), ("global", 1)])
def test_shapes_broadcast_and_reduce(model, sharing, count):
    space = HyperSpace.l2(model, -4.0, sharing)
    params = dict(model.named_parameters())
    assert not any(name.endswith("bias") for name in space.shapes)  # no L2 on biases / BN shifts
    ones = {n: torch.ones(s, dtype=torch.float64) for n, s in space.shapes.items()}
    grads = space.reduce(ones)
    assert {k: g.shape for k, g in grads.items()} == {k: v.shape for k, v in space.values.items()}
    assert sum(g.sum() for g in grads.values()) == sum(p.numel() for n, p in params.items() if n in space.shapes)
    for name in space.shapes:
        assert space.value(name).shape == params[name].shape
        assert torch.allclose(space.value(name), torch.full(params[name].shape, 1e-4, dtype=torch.float64))
    if sharing == "unit":
        conv = "features.0.weight"
        assert space.values[conv].shape == (params[conv].shape[0],)
    if count:
        assert len(space.values) == count


def test_unit_values_broadcast_over_each_output_channel(model):
    space = HyperSpace.l2(model, 0.0, "unit")
    name = "features.0.weight"
    space.values[name][1] = 2.0
    value = space.value(name)
    assert torch.all(value[1] == 100.0) and torch.all(value[0] == 1.0)


def test_clip_keeps_bounds(model):
    space = HyperSpace.l2(model, 0.0, "layer", bounds=(-8.0, -1.0))
    space.clip_()
    assert all(v.item() == -1.0 for v in space.values.values())
