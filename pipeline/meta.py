"""Meta-iterations: sign steps on hyperparameters in log space (algorithms §6).

    m <- mu * m - eta * sign(d theta);    theta <- clip(theta + m)

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
        momentum[key].mul_(mu).sub_(step * torch.sign(grads[key]))
        value.add_(momentum[key])
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
