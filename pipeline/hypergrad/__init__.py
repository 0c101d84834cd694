"""Hypergradients through training: one entry point for every method.

    hypergradient(problem, l2, method="exact")     # bit-exact reversal (fixed point + bits-back)
    hypergradient(problem, l2, method="float")     # float reversal, drifts (thesis fig. 3.6)
    hypergradient(problem, l2, method="unrolled")  # autograd through the stored graph (small T)
    validation_loss(problem, l2)                   # train, then f(w_T): for finite differences

Each returns {"log10_l2": {key: tensor}, "alpha": ..., "beta": ..., "w0": ..., "val_loss": ...}.
"""
from __future__ import annotations

from pipeline.hyper import HyperSpace
from pipeline.hypergrad import unrolled
from pipeline.hypergrad.hvp import HVP_METHODS, default_hvp
from pipeline.hypergrad.paths import ExactPath, FixedPointOverflow, FloatPath
from pipeline.hypergrad.problem import Problem
from pipeline.hypergrad.reverse import reverse

METHODS = ("exact", "float", "unrolled")

__all__ = ["METHODS", "ExactPath", "FixedPointOverflow", "FloatPath", "Problem", "hypergradient",
           "validation_loss"]


def hypergradient(problem: Problem, l2: HyperSpace | None = None, method: str = "exact", *,
                  hvp: str = "auto", record: bool = False, **bits: int) -> dict:
    if method == "unrolled":
        return unrolled.hypergradient(problem, l2)
    coef = problem.l2_coefficients(l2)
    if method == "exact":
        path = ExactPath.train(problem, coef, **bits)
    elif method == "float":
        path = FloatPath.train(problem, coef)
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    hvp = default_hvp(problem.x.device) if hvp == "auto" else hvp
    return reverse(problem, path, l2, HVP_METHODS[hvp], record=record)


validation_loss = unrolled.validation_loss
