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


class Reversal:
    """The recursion's state; `step(s)` runs reverse step s, so reversals can run in lockstep."""

    def __init__(self, problem: Problem, path: ReversiblePath, l2: HyperSpace | None, hvp: HVP):
        self.problem, self.path, self.l2, self.hvp = problem, path, l2, hvp
        self.c = problem.l2_coefficients(l2)
        self.dw, self.val_loss = validation_gradient(problem, path.w())
        self.dv = torch.zeros_like(self.dw)
        self.d_l2 = torch.zeros_like(self.dw)
        self.per_param_alpha = problem.alpha.dim() == 2
        self.d_alpha = torch.zeros(problem.alpha.shape, dtype=problem.dtype, device=self.dw.device)
        self.d_beta = torch.zeros(problem.steps, dtype=problem.dtype, device=self.dw.device)
        self.has_velocity = path.v() is not None

    def step(self, s: int) -> None:
        problem, path, c = self.problem, self.path, self.c
        t = path.forward_step(s)
        alpha, beta = problem.alpha_at(t), problem.beta[t].item()
        if self.has_velocity:
            v = path.v()
            self.d_alpha[t] += self.dw * v if self.per_param_alpha else torch.dot(self.dw, v)
        path.undo_position(s)
        w = path.w()
        self.dv = self.dv + alpha * self.dw
        g, hdv = self.hvp(problem, w, t, self.dv)
        g = g + c * w
        path.undo_velocity(s, g)
        if self.has_velocity:
            self.d_beta[t] += torch.dot(self.dv, path.v() + g)
        self.dw = self.dw - (1 - beta) * (hdv + c * self.dv)
        self.d_l2 = self.d_l2 - (1 - beta) * LN10 * c * w * self.dv
        self.dv = beta * self.dv

    def result(self) -> dict:
        out = {"w0": self.dw, "v0": self.dv, "val_loss": self.val_loss, "reverse_steps": self.path.reverse_steps}
        if self.has_velocity:
            out.update(alpha=self.d_alpha, beta=self.d_beta)
        if self.l2 is not None:
            out["log10_l2"] = self.problem.reduce_l2(self.l2, self.d_l2)
        return out


def reverse(problem: Problem, path: ReversiblePath, l2: HyperSpace | None, hvp: HVP,
            record: bool = False) -> dict:
    """Walk `path` back from w_T to w_0 and return the hypergradients, keyed like the
    hyperparameters: {"log10_l2": {key: tensor}, "alpha": [T] (or [T, P]), "beta": [T],
    "w0": flat dL/dw_0, "v0": dL/dv_{-1}, "val_loss": f(w_T)}; with `record`, also "trace":
    per reverse step (in reverse order) the norms of the accumulated per-element d lambda
    and of dw (thesis figs 3.4-3.5)."""
    state = Reversal(problem, path, l2, hvp)
    trace = {"step": [], "l2_norm": [], "dw_norm": []}
    for s in reversed(range(path.reverse_steps)):
        state.step(s)
        if record:
            trace["step"].append(s)
            trace["l2_norm"].append(state.d_l2.norm().item())
            trace["dw_norm"].append(state.dw.norm().item())
    out = state.result()
    if record:
        out["trace"] = trace
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.dot(a, b) / (a.norm() * b.norm())).item() if a.norm() > 0 and b.norm() > 0 else float("nan")


def reversal_drift(problem: Problem, exact_path: ReversiblePath, float_path: ReversiblePath,
                   l2: HyperSpace | None, hvp: HVP) -> dict[str, list[float]]:
    """Thesis fig. 3.6: walk one trajectory back with exact arithmetic and with floats in
    lockstep (both from the same w_T, v_T) and record, per reverse step, the distances between
    their w, v, d lambda and dw, and the cosine of their d lambda."""
    exact, plain = Reversal(problem, exact_path, l2, hvp), Reversal(problem, float_path, l2, hvp)
    out = {k: [] for k in ("step", "w", "v", "d_l2", "dw", "cos_d_l2")}
    for s in reversed(range(exact_path.reverse_steps)):
        exact.step(s)
        plain.step(s)
        out["step"].append(s)
        out["w"].append((exact_path.w() - float_path.w()).norm().item())
        out["v"].append((exact_path.v() - float_path.v()).norm().item())
        out["d_l2"].append((exact.d_l2 - plain.d_l2).norm().item())
        out["dw"].append((exact.dw - plain.dw).norm().item())
        out["cos_d_l2"].append(_cosine(exact.d_l2, plain.d_l2))
    return out
