"""Gradient and Hessian-vector product of one training step's cross-entropy, in one pass.

Both implementations return `(g, H @ dv, B)` for the loss of step t at weights w, where B holds,
per buffer hyperparameter theta (the MLP's log scales), the mixed product d(dv . g)/d theta:
  - `double_backward`: reverse-over-reverse, one backward through the gradient with
    grad_outputs=dv;
  - `forward_over_reverse`: `torch.func.jvp` of `torch.func.grad`.
They agree to rounding in float64 (tested); which is faster depends on model and device, so
`bench/hypergrad.py` measures it and records the winner per device type in hvp_choice.json,
which `default_hvp` reads (double backward where nothing was measured). The L2 part of the Hessian
(c * dv) and its mixed derivative are added by the caller in closed form.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch.func import grad, jvp

from pipeline.hypergrad.problem import Problem

Products = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
HVP = Callable[[Problem, torch.Tensor, int, torch.Tensor], Products]


def double_backward(problem: Problem, w: torch.Tensor, t: int, dv: torch.Tensor) -> Products:
    w = w.detach().requires_grad_()
    theta = {n: b.detach().requires_grad_() for n, b in problem.buffers().items()}
    g = torch.autograd.grad(problem.train_loss(w, t, buffers=theta), w, create_graph=True)[0]
    if not g.requires_grad:  # a loss linear in w and theta: no second derivatives
        return g.detach(), torch.zeros_like(dv), {n: torch.zeros_like(b) for n, b in theta.items()}
    hdv, *mixed = torch.autograd.grad(g, [w, *theta.values()], grad_outputs=dv, materialize_grads=True)
    return g.detach(), hdv, dict(zip(theta, mixed))


def forward_over_reverse(problem: Problem, w: torch.Tensor, t: int, dv: torch.Tensor) -> Products:
    batch, theta = problem.batch(t), problem.buffers()
    g, hdv = jvp(grad(lambda u: problem.train_loss(u, t, batch, theta)), (w.detach(),), (dv,))
    mixed = {}
    if theta:  # forward mode gives H dv only: the mixed product is one more reverse pass
        mixed = grad(lambda th: torch.dot(dv, grad(lambda u: problem.train_loss(u, t, batch, th))(w.detach())))(theta)
    return g, hdv, mixed


HVP_METHODS: dict[str, HVP] = {"double_backward": double_backward, "forward_over_reverse": forward_over_reverse}

CHOICE_FILE = Path(__file__).with_name("hvp_choice.json")


def default_hvp(device: torch.device | str) -> str:
    choice = json.loads(CHOICE_FILE.read_text()) if CHOICE_FILE.exists() else {}
    return choice.get(torch.device(device).type, "double_backward")
