"""Implicit differentiation (Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters
by implicit differentiation", 2020; algorithms §6b).

Treat w_T as a stationary point of the training loss, G(w_T, theta) = grad L + c w_T = 0. Then
dw*/d theta = -(H + C)^-1 dG/d theta and

    d theta = df/d theta - p . dG/d theta,     p = (H + C)^-1 grad f(w_T)

with p from a Neumann series of N Hessian-vector products at step size eta,

    p ~ eta sum_{j=0..N} (I - eta (H + C))^j grad f,

which converges when eta < 2 / lambda_max(H + C) and (H + C) is positive definite (strongly
convex training, run to convergence); elsewhere it is the method's approximation and the quality
study measures how good. H is the Hessian of the last step's batch (Lorraine et al. also take one
training batch), C = diag(c). The mixed term p . dG/d theta is one more HVP pass: closed form for L2
(ln10 c w p), by autograd for buffer hyperparameters (the MLP's log scales).
"""
from __future__ import annotations

import torch

from pipeline import data_parallel
from pipeline.hyper import HyperSpace
from pipeline.hypergrad.hvp import HVP
from pipeline.hypergrad.problem import LN10, Problem
from pipeline.hypergrad.reverse import validation_gradient


def inverse_hvp(problem: Problem, w: torch.Tensor, t: int, c: torch.Tensor, u: torch.Tensor, hvp: HVP,
                terms: int, step: float) -> torch.Tensor:
    """eta sum_{j=0..terms} (I - eta (H + C))^j u, H the Hessian of step t's loss at w."""
    v, total = u, u
    for _ in range(terms):
        hv = data_parallel.average([hvp(problem, w, t, v).hdv])[0] + c * v
        v = v - step * hv
        total = total + v
    return step * total


def hypergradient(problem: Problem, l2: HyperSpace | None, w_T: torch.Tensor, hvp: HVP, terms: int,
                  step: float | None = None) -> dict:
    """`step` = eta (None: the training step size alpha_{T-1}, the rate gradient descent ran at)."""
    if terms < 0:
        raise ValueError(f"neumann_terms: a count >= 0 (got {terms})")
    t, c = problem.steps - 1, problem.l2_coefficients(l2)
    step = float(problem.alpha_at(t).mean()) if step is None else step
    u, d_scale, val_loss = validation_gradient(problem, w_T)
    p = inverse_hvp(problem, w_T, t, c, u, hvp, terms, step)
    _, mixed, _ = hvp(problem, w_T, t, p)
    mixed = dict(zip(mixed, data_parallel.average(list(mixed.values())))) if mixed else {}
    out = {"val_loss": val_loss, "reverse_steps": terms + 1, "work": {"hvps": terms + 1, "gradients": 1}}
    if l2 is not None:
        out["log10_l2"] = problem.reduce_l2(l2, -LN10 * c * w_T * p)
    if problem.scales is not None:
        out["scale"] = problem.scales.reduce({n: d - mixed[n] for n, d in d_scale.items()})
    return out
