"""The CUDA path cannot regress on machines without a GPU: every op that the training step, the
Hessian-vector product and the validation loss of every model run must be one that
`torch.use_deterministic_algorithms(True)` allows on CUDA, or exact reversal there would stop
(or, without the flag, drift). Autograd graphs name the ops; PyTorch's own docstring names the
ones that raise."""
import os
import re

import pytest
import torch

from pipeline.hypergrad import Problem
from pipeline.models import MLP, DenseNet, dropout_masks
from pipeline.training import setup_device

F64 = torch.float64

# Each entry of the docstring's "will throw a RuntimeError" list -> the autograd node stems of its
# kernels (a node `XBackward0` runs X's backward; `XBackwardBackward0` runs it in a double backward).
RAISING = {
    "torch.nn.AvgPool3d": ["AvgPool3D"], "torch.nn.AdaptiveAvgPool2d": ["AdaptiveAvgPool2D"],
    "torch.nn.AdaptiveAvgPool3d": ["AdaptiveAvgPool3D"], "torch.nn.AdaptiveMaxPool2d": ["AdaptiveMaxPool2D"],
    "torch.nn.FractionalMaxPool2d": ["FractionalMaxPool2D"], "torch.nn.FractionalMaxPool3d": ["FractionalMaxPool3D"],
    "torch.nn.MaxUnpool1d": ["MaxUnpool2D"], "torch.nn.MaxUnpool2d": ["MaxUnpool2D"],
    "torch.nn.MaxUnpool3d": ["MaxUnpool3D"],
    "torch.nn.functional.interpolate": ["UpsampleLinear1D", "UpsampleBilinear2D", "UpsampleBicubic2D",
                                        "UpsampleTrilinear3D"],
    "torch.nn.ReflectionPad1d": ["ReflectionPad1D"], "torch.nn.ReflectionPad2d": ["ReflectionPad2D"],
    "torch.nn.ReflectionPad3d": ["ReflectionPad3D"],
    "torch.nn.NLLLoss": ["NllLoss2D"],  # only the spatial kernel accumulates atomically (nll_loss2d)
    "torch.nn.CTCLoss": ["CtcLoss"], "torch.nn.EmbeddingBag": ["EmbeddingBag"], "torch.Tensor.put_": ["Put"],
    "torch.histc": ["Histc"], "torch.bincount": ["Bincount"], "torch.median": ["Median"],
    "torch.kthvalue": ["Kthvalue"], "torch.nn.functional.grid_sample": ["GridSampler2D", "GridSampler3D"],
    "torch.Tensor.scatter_reduce": ["ScatterReduce"],
    "torch.Tensor.resize_": [],  # quantized tensors only: none here
}


def documented_raising() -> set[str]:
    doc = torch.use_deterministic_algorithms.__doc__
    start = doc.index("will throw a\n    :class:`RuntimeError` when ``mode=True``")
    section = doc[start:doc.index("In addition,", start)]
    return set(re.findall(r"^\s*\* :(?:class|func):`([^`]+)`", section, re.M))


def node_stems(*outputs: torch.Tensor) -> set[str]:
    seen, stack, stems = set(), [o.grad_fn for o in outputs if o.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stems.add(re.sub(r"(Backward)+\d*$", "", type(node).__name__))
        stack += [n for n, _ in node.next_functions]
    return stems


def problem(model, shape):
    torch.manual_seed(0)
    x, y = torch.randn(8, *shape, dtype=F64), torch.randint(0, 4, (8,))
    return Problem(model.to(F64), x, y, x, y, alpha=torch.full((2,), 0.1), beta=torch.full((2,), 0.9),
                   batch_size=4, seed=0)


MODELS = {
    "densenet": lambda: problem(DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1), (1, 8, 8)),
    "mlp": lambda: problem(MLP((12, 10, 4)), (12,)),
    "scaled_mlp": lambda: problem(MLP((12, 10, 4), scaled=True), (12,)),
}


def test_the_list_of_raising_ops_covers_this_torch():
    """A torch that documents a new raising op makes this test ask for its node names."""
    assert documented_raising() <= set(RAISING), documented_raising() - set(RAISING)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_hvp_and_validation_graphs_use_no_op_that_raises_on_cuda(name):
    p = MODELS[name]()
    w = p.w0.clone().requires_grad_()
    loss = p.train_loss(w, 0)
    g = torch.autograd.grad(loss, w, create_graph=True)[0]  # its graph is what the HVP walks back
    with dropout_masks(p.model, torch.Generator().manual_seed(0)):  # the Trainer's own (module) forward
        module_loss = torch.nn.functional.cross_entropy(p.model.train()(p.x), p.y)
    stems = node_stems(loss, g, p.val_loss(w), module_loss)
    walked = {"densenet": {"Convolution", "NativeBatchNorm"}, "mlp": {"Addmm"}, "scaled_mlp": {"Mm", "Mul"}}[name]
    assert walked <= stems, walked - stems  # the graphs were walked
    forbidden = {s for stems_ in RAISING.values() for s in stems_}
    assert not stems & forbidden, stems & forbidden


def test_a_forbidden_op_is_found():
    """The walk sees what a model would add (adaptive pooling beyond 1x1 on CUDA)."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = torch.nn.functional.adaptive_avg_pool2d(x, 2).sum()
    assert "AdaptiveAvgPool2D" in node_stems(out)


def test_setup_device_turns_deterministic_mode_on(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        assert setup_device("cpu") == torch.device("cpu")
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
