"""Meta-iterations: sign steps on hyperparameters in log space (algorithms §6).

    m <- mu * m - (1 - mu) * sign(d theta);    theta <- clip(theta + eta * m)

the thesis' momentum convention (the same as its SGD's): the first step is (1 - mu) * eta and a
steady one (the same sign throughout) approaches eta, so eta is the most a hyperparameter moves
per meta-iteration (thesis 3.2.1: 1/3 in log10 units, "at most 3 meta-iterations" for an order of
magnitude). With mu = 0 it is a plain sign step of eta.

and epochs that grow by a factor per meta-iteration up to a cap (thesis: 100 -> 300, x1.4).
"""
from __future__ import annotations

import torch

from pipeline.hyper import HyperSpace


def epochs_at(iteration: int, start: int, growth: float, cap: int) -> int:
    return min(cap, round(start * growth ** iteration))


def sign_step(hypers: HyperSpace, grads: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
              step: float, mu: float) -> None:
    """Descend the hypergradient's sign (0 where it is 0), with momentum, then clip to bounds."""
    for key, value in hypers.values.items():
        momentum[key].mul_(mu).sub_((1.0 - mu) * torch.sign(grads[key]))
        value.add_(step * momentum[key])
    hypers.clip_()


def zero_momentum(hypers: HyperSpace) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in hypers.values.items()}


def layer_summary(hypers: HyperSpace) -> dict[str, dict[str, float]]:
    """Per parameter tensor: mean and std of its (log-scale) hyperparameters, as broadcast."""
    out = {}
    for name in hypers.shapes:
        values = hypers.log_value(name).double()
        out[name] = {"mean": values.mean().item(), "std": values.std(unbiased=False).item()}
    return out
