"""The reverse-mode recursion of DESIGN §4, over any path that can be walked backwards.

A path has `reverse_steps` steps; reverse step s uses the batch, masks, alpha and beta of
forward step `forward_step(s)` (the identity for exact and float paths; DrMAD's straight line
maps its S steps onto the T forward steps). Paths without velocities (DrMAD) give no
alpha/beta hypergradients.

    dw = grad f(w_T);  dv = 0
    for t = T-1 .. 0:
        d alpha_t = dw . v_t
        w_t      = w_{t+1} - alpha_t v_t
        dv      += alpha_t dw
        g_t, H dv = one pass through step t's gradient
        v_{t-1}  = (v_t + (1 - beta_t) g_t) / beta_t
        d beta_t = dv . (v_{t-1} + g_t)
        dw      -= (1 - beta_t) (H + diag c) dv          c = 2 * 10^lambda (the L2 Hessian)
        d lambda -= (1 - beta_t) ln10 * c * w_t * dv      (mixed product, closed form)
        dv      *= beta_t
"""
from __future__ import annotations

from typing import Protocol

import torch

from pipeline.hyper import HyperSpace
from pipeline.hypergrad.hvp import HVP
from pipeline.hypergrad.problem import LN10, Problem


class ReversiblePath(Protocol):
    reverse_steps: int
    def forward_step(self, s: int) -> int: ...
    def w(self) -> torch.Tensor: ...
    def v(self) -> torch.Tensor | None: ...
    def undo_position(self, s: int) -> None: ...
    def undo_velocity(self, s: int, g: torch.Tensor) -> None: ...


def validation_gradient(problem: Problem, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    w = w.detach().requires_grad_()
    loss = problem.val_loss(w)
    return torch.autograd.grad(loss, w)[0], loss.item()


def reverse(problem: Problem, path: ReversiblePath, l2: HyperSpace | None, hvp: HVP,
            record: bool = False) -> dict:
    """Walk `path` back from w_T to w_0 and return the hypergradients, keyed like the
    hyperparameters: {"log10_l2": {key: tensor}, "alpha": [T] (or [T, P]), "beta": [T],
    "w0": flat dL/dw_0, "v0": dL/dv_{-1}, "val_loss": f(w_T)}; with `record`, also "trace":
    per reverse step (in reverse order) the norms of the accumulated d lambda and of dw."""
    c = problem.l2_coefficients(l2)
    dw, val_loss = validation_gradient(problem, path.w())
    dv = torch.zeros_like(dw)
    d_l2 = torch.zeros_like(dw)
    per_param_alpha = problem.alpha.dim() == 2
    d_alpha = torch.zeros(problem.alpha.shape, dtype=problem.dtype, device=dw.device)
    d_beta = torch.zeros(problem.steps, dtype=problem.dtype, device=dw.device)
    trace = {"step": [], "l2_norm": [], "dw_norm": []}
    has_velocity = path.v() is not None
    for s in reversed(range(path.reverse_steps)):
        t = path.forward_step(s)
        alpha, beta = problem.alpha_at(t), problem.beta[t].item()
        if has_velocity:
            v = path.v()
            d_alpha[t] += dw * v if per_param_alpha else torch.dot(dw, v)
        path.undo_position(s)
        w = path.w()
        dv = dv + alpha * dw
        g, hdv = hvp(problem, w, t, dv)
        g = g + c * w
        path.undo_velocity(s, g)
        if has_velocity:
            d_beta[t] += torch.dot(dv, path.v() + g)
        dw = dw - (1 - beta) * (hdv + c * dv)
        d_l2 = d_l2 - (1 - beta) * LN10 * c * w * dv
        dv = beta * dv
        if record:
            trace["step"].append(s)
            trace["l2_norm"].append(d_l2.norm().item())
            trace["dw_norm"].append(dw.norm().item())
    out = {"w0": dw, "v0": dv, "val_loss": val_loss, "reverse_steps": path.reverse_steps}
    if has_velocity:
        out.update(alpha=d_alpha, beta=d_beta)
    if l2 is not None:
        out["log10_l2"] = problem.reduce_l2(l2, d_l2)
    if record:
        out["trace"] = trace
    return out
