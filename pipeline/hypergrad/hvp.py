"""Hessian-vector products of one training step's cross-entropy.

Both implementations return `Products(H @ dv, B, g)` for the loss of step t at weights w, where
B holds, per buffer hyperparameter theta (the MLP's log scales), the mixed product
d(dv . g)/d theta:
  - `double_backward`: reverse-over-reverse, one backward through the gradient with
    grad_outputs=dv;
  - `forward_over_reverse`: `torch.func.jvp` of `torch.func.grad`.
They agree to rounding in float64 (tested), which is all a Hessian product needs. Exact
reversal also needs the gradient g_t itself, bit for bit as the forward step computed it (it is
divided back out of the velocity). Double backward computes g_t on the way, through the same
kernels as `Problem.train_grad` (a graph kept for a second backward changes no value), and returns
it, which saves the reverse step one forward and backward pass; forward-over-reverse's gradient
is rounded otherwise, so it returns None and the reverse pass calls `Problem.train_grad`. Exact
reversal's round-trip check would reject a gradient that was not bit-identical.

Which one is faster depends on model and device: `bench/hypergrad.py` measures both and
writes its numbers under `bench/results/`; the `hvp` key of params.yaml chooses (default
double backward, the faster on CPU for both models here). The L2 part of the Hessian
(c * dv) and its mixed derivative are added by the caller in closed form.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import grad, jvp

from pipeline.hypergrad.problem import Problem

class Products(NamedTuple):
    hdv: torch.Tensor  # H dv
    mixed: dict[str, torch.Tensor]  # d(dv . g)/d theta per buffer hyperparameter
    grad: torch.Tensor | None  # g itself where the product computed it bit for bit as `train_grad` does


HVP = Callable[[Problem, torch.Tensor, int, torch.Tensor], Products]
DEFAULT_HVP = "double_backward"


def double_backward(problem: Problem, w: torch.Tensor, t: int, dv: torch.Tensor) -> Products:
    leaves = problem.leaves(w)
    theta = {n: b.detach().requires_grad_() for n, b in problem.buffers().items()}
    g = torch.autograd.grad(problem.train_loss(leaves, t, buffers=theta), leaves, create_graph=True)
    flat_g = problem.join(g).detach()
    if not any(part.requires_grad for part in g):  # a loss linear in w and theta: no second derivatives
        return Products(torch.zeros_like(dv), {n: torch.zeros_like(b) for n, b in theta.items()}, flat_g)
    pairs = [(part, u) for part, u in zip(g, problem.views(dv)) if part.requires_grad]  # (dv . g)'s terms
    out = torch.autograd.grad([p for p, _ in pairs], [*leaves, *theta.values()], grad_outputs=[u for _, u in pairs],
                              materialize_grads=True)
    hdv, mixed = out[:len(leaves)], out[len(leaves):]
    return Products(problem.join(hdv), dict(zip(theta, mixed)), flat_g)


def forward_over_reverse(problem: Problem, w: torch.Tensor, t: int, dv: torch.Tensor) -> Products:
    batch, theta = problem.batch(t), problem.buffers()
    _, hdv = jvp(grad(lambda u: problem.train_loss(u, t, batch, theta)), (w.detach(),), (dv,))
    mixed = {}
    if theta:  # forward mode gives H dv only: the mixed product is one more reverse pass
        mixed = grad(lambda th: torch.dot(dv, grad(lambda u: problem.train_loss(u, t, batch, th))(w.detach())))(theta)
    return Products(hdv, mixed, None)  # its gradient is rounded otherwise than train_grad's


HVP_METHODS: dict[str, HVP] = {"double_backward": double_backward, "forward_over_reverse": forward_over_reverse}


def recomputed_gradients(hvp: str, reverse_steps: int) -> int:
    """Training gradients a reverse pass of `reverse_steps` recomputes beside its HVPs: none by
    double backward (it returns them), one per step by forward-over-reverse (counted work)."""
    return 0 if hvp == "double_backward" else reverse_steps
