"""Hessian-vector products of one training step's cross-entropy.

Both implementations return `(H @ dv, B)` for the loss of step t at weights w, where B holds,
per buffer hyperparameter theta (the MLP's log scales), the mixed product d(dv . g)/d theta:
  - `double_backward`: reverse-over-reverse, one backward through the gradient with
    grad_outputs=dv;
  - `forward_over_reverse`: `torch.func.jvp` of `torch.func.grad`.
They agree to rounding in float64 (tested), which is all a Hessian product needs. Neither
supplies the gradient g_t that exact reversal divides back out of the velocity: that must be
the training step's own gradient bit for bit, so the reverse pass recomputes it with
`Problem.train_grad`, the function the forward pass used.

Which one is faster depends on model and device: `bench/hypergrad.py` measures both and
writes its numbers under `bench/results/`; the `hvp` key of params.yaml chooses (default
double backward, the faster on CPU for both models here). The L2 part of the Hessian
(c * dv) and its mixed derivative are added by the caller in closed form.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, jvp

from pipeline.hypergrad.problem import Problem

Products = tuple[torch.Tensor, dict[str, torch.Tensor]]
HVP = Callable[[Problem, torch.Tensor, int, torch.Tensor], Products]
DEFAULT_HVP = "double_backward"


def double_backward(problem: Problem, w: torch.Tensor, t: int, dv: torch.Tensor) -> Products:
    w = w.detach().requires_grad_()
    theta = {n: b.detach().requires_grad_() for n, b in problem.buffers().items()}
    g = torch.autograd.grad(problem.train_loss(w, t, buffers=theta), w, create_graph=True)[0]
    if not g.requires_grad:  # a loss linear in w and theta: no second derivatives
        return torch.zeros_like(dv), {n: torch.zeros_like(b) for n, b in theta.items()}
    hdv, *mixed = torch.autograd.grad(g, [w, *theta.values()], grad_outputs=dv, materialize_grads=True)
    return hdv, dict(zip(theta, mixed))


def forward_over_reverse(problem: Problem, w: torch.Tensor, t: int, dv: torch.Tensor) -> Products:
    batch, theta = problem.batch(t), problem.buffers()
    _, hdv = jvp(grad(lambda u: problem.train_loss(u, t, batch, theta)), (w.detach(),), (dv,))
    mixed = {}
    if theta:  # forward mode gives H dv only: the mixed product is one more reverse pass
        mixed = grad(lambda th: torch.dot(dv, grad(lambda u: problem.train_loss(u, t, batch, th))(w.detach())))(theta)
    return hdv, mixed


HVP_METHODS: dict[str, HVP] = {"double_backward": double_backward, "forward_over_reverse": forward_over_reverse}
