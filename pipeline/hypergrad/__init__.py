"""Hypergradients through training: one entry point for every method.

    hypergradient(problem, l2, method="exact")     # bit-exact reversal (fixed point + bits-back)
    hypergradient(problem, l2, method="float")     # float reversal, drifts (thesis fig. 3.6)
    hypergradient(problem, l2, method="unrolled")  # autograd through the stored graph (small T)
    hypergradient(problem, l2, method="drmad")     # straight line w_T -> w_0 (S steps: heuristic)
    hypergradient(problem, l2, method="drmad2")    # float reversal of the last K steps, then the line
    hypergradient(problem, l2, method="stored")    # states kept in memory (short stretches: adaptive)
    hypergradient(problem, l2, method="truncated") # float reversal of the last K steps only
    hypergradient(problem, l2, method="ift")       # implicit differentiation at w_T (Neumann series)
    hypergradient(problem, l2, method="greedy")    # through the last step only (autograd)
    log_lr_hypergradient(problem, result, lr)      # per-parameter log learning rates from d alpha
    validation_loss(problem, l2)                   # train, then f(w_T): for finite differences

Each returns {"log10_l2": {key: tensor}, "val_loss": ..., "w_T": ..., "reverse_steps": ...,
"work": {"hvps": n, "gradients": m}} (and "scale" for buffer hyperparameters; "w_T": where training
ended, "unrolled" aside); the reversals also "alpha", "beta", "w0". "work" counts what the hypergradient cost beyond the T training gradients: Hessian-vector
products and gradients (the validation gradient, and training gradients recomputed by an HVP
that does not return them).
"""
from __future__ import annotations

import torch

from pipeline.hyper import HyperSpace
from pipeline.hypergrad import greedy, ift, unrolled
from pipeline.hypergrad.drmad import drmad2_path, drmad_path, heuristic_steps
from pipeline.hypergrad.hvp import DEFAULT_HVP, HVP_METHODS
from pipeline.hypergrad.trajectories import ExactPath, FixedPointOverflow, FloatPath, ReversalError, StoredPath
from pipeline.hypergrad.problem import Problem
from pipeline.hypergrad.reverse import reverse
from pipeline.hypergrad.truncated import TruncatedPath

METHODS = ("exact", "float", "unrolled", "drmad", "drmad2", "stored", "truncated", "ift", "greedy")

__all__ = ["METHODS", "ExactPath", "FixedPointOverflow", "FloatPath", "Problem", "ReversalError", "StoredPath",
           "TruncatedPath", "hypergradient",
           "log_lr_hypergradient", "validation_loss"]


def hypergradient(problem: Problem, l2: HyperSpace | None = None, method: str = "exact", *,
                  hvp: str = DEFAULT_HVP, record: bool = False, reverse_steps: int | None = None,
                  multiplier: float = 1.0, step_map: str = "same", last: int = 100, truncate: int = 100,
                  neumann_terms: int = 100, neumann_step: float | None = None, **bits: int) -> dict:
    """`reverse_steps`, `multiplier` and `step_map` set DrMAD's line (S = None: the heuristic
    1 / (multiplier * gamma)); `last` is DrMAD2's K, `truncate` truncated reversal's (at most T);
    `neumann_terms` and `neumann_step` the implicit method's series; `bits` the exact method's
    w_bits/v_bits."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {', '.join(HVP_METHODS)} (got {hvp!r})")
    if method == "unrolled":
        return unrolled.hypergradient(problem, l2)
    coef = problem.l2_coefficients(l2)
    if method == "exact":
        path = ExactPath.train(problem, coef, **bits)
    elif method == "stored":
        path = StoredPath.train(problem, coef)
    else:
        path = FloatPath.train(problem, coef)
    w_T = path.w().clone()
    if method == "greedy":
        return {**greedy.hypergradient(problem, l2, path.w_before, w_T), "w_T": w_T}
    if method == "ift":
        return {**ift.hypergradient(problem, l2, w_T, HVP_METHODS[hvp], neumann_terms, neumann_step), "w_T": w_T}
    if method == "truncated":
        path = TruncatedPath(path, min(truncate, problem.steps))
    elif method == "drmad":
        path = drmad_path(problem, path, reverse_steps, multiplier, step_map)
    elif method == "drmad2":
        path = drmad2_path(problem, w_T, path.v(), path.distances, last,
                           lambda d: reverse_steps or heuristic_steps(d, multiplier), step_map)
    return {**reverse(problem, path, l2, HVP_METHODS[hvp], record=record), "w_T": w_T}


validation_loss = unrolled.validation_loss


def log_lr_hypergradient(problem: Problem, result: dict, lr: HyperSpace) -> dict[str, torch.Tensor]:
    """Hypergradient of per-parameter log learning rates eta (alpha_t = schedule_t * e^eta, so
    d eta = sum_t d alpha_t * alpha_t), from a result with per-parameter "alpha" [T, P]."""
    per_element = (result["alpha"] * problem.alpha.to(result["alpha"].dtype)).sum(0)
    named = problem.unflatten(per_element)
    return lr.reduce({n: named[n].to(torch.float64) for n in lr.shapes})
