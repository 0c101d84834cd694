"""Truncated reversal (Shaban et al., "Truncated back-propagation for bilevel optimization",
2019; algorithms §6b): float reversal of the last K forward steps only.

The reverse recursion of algorithms §4 runs for t = T-1 ... T-K and stops at w_{T-K}: the
hyperparameters' effect on the first T-K steps is dropped. K = T is float reversal; K = 1 is the
greedy one-step hypergradient (`greedy`).
"""
from __future__ import annotations

import torch

from pipeline.hypergrad.trajectories import FloatPath


class TruncatedPath:
    """The last `last` steps of a float path: reverse step s is forward step T - K + s."""

    def __init__(self, trained: FloatPath, last: int):
        steps = trained.problem.steps
        if not 1 <= last <= steps:
            raise ValueError(f"truncate: K within 1..T = {steps} (got {last})")
        self.path, self.head, self.reverse_steps = trained, steps - last, last

    def forward_step(self, s: int) -> int:
        return self.head + s

    def w(self) -> torch.Tensor:
        return self.path.w()

    def v(self) -> torch.Tensor:
        return self.path.v()

    def undo_position(self, s: int) -> None:
        self.path.undo_position(self.forward_step(s))

    def undo_velocity(self, s: int, g: torch.Tensor) -> None:
        self.path.undo_velocity(self.forward_step(s), g)
