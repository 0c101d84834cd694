"""DrMAD and DrMAD2 (Fu et al. 2016; thesis ch. 1 and 3.1, algorithms §5).

DrMAD forgets the training path and walks back along the straight line from w_T to w_0 in S
steps: only w_0 and w_T are kept. DrMAD2 first undoes the last K forward steps in floats, then
takes the straight line from w_{T-K} to w_0.

Reverse step s of the line uses the batch, masks, alpha and beta of forward step
`step_map(s)`: "same" (forward step s, the iterate it stands closest to when S = 1/gamma),
"stride" (floor(s T / S)), or "nearest" (the forward iterate whose distance from w_0, as a
share of |w_T - w_0|, is closest to s / S).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from pipeline.hypergrad.trajectories import FloatPath
from pipeline.hypergrad.problem import Problem

StepMap = Literal["same", "stride", "nearest"]
Weighting = Literal["text", "scripts"]
HEURISTIC_STEPS = 20  # forward steps whose distances from w_0 estimate gamma
SCRIPT_STEPS = (5, 19)  # the scripts' steps: |w_t - w_0| / t for t = 5..19


def gamma_estimate(distances: torch.Tensor, weighting: Weighting = "text") -> float:
    """gamma ~ |w_t - w_0| / (t |w_T - w_0|), a weighted average over the first 20 steps with most
    weight early (the straight-line picture is best near w_0). `distances[t-1]` = |w_t - w_0|.

    text:    t = 1..20, weights 1/t (the thesis' words: "first 20 steps, more weight early").
    scripts: t = 5..19, weights 1/2 + 2^-15, 2^-2, 2^-3, ..., 2^-15 (the DrMAD CPU scripts: each
             later step half the weight of the one before, the first taking what is left)."""
    total = distances[-1].double()
    if weighting == "text":
        t = torch.arange(1, min(HEURISTIC_STEPS, len(distances)) + 1, dtype=torch.float64)
        weights = 1.0 / t
    elif len(distances) < SCRIPT_STEPS[0]:  # too short for the scripts' steps: the text's reading
        return gamma_estimate(distances, "text")
    else:
        t = torch.arange(SCRIPT_STEPS[0], min(SCRIPT_STEPS[1], len(distances)) + 1, dtype=torch.float64)
        weights = 2.0 ** -torch.arange(1, len(t) + 1, dtype=torch.float64)
        weights[0] = 1.0 - weights[1:].sum()
    gammas = distances[t.long() - 1].double() / (t * total)
    return float((weights * gammas).sum() / weights.sum())


def heuristic_steps(distances: torch.Tensor, multiplier: float = 1.0, weighting: Weighting = "text") -> int:
    """Number of reverse steps S = 1 / (multiplier * gamma) (thesis 3.1: multiplier 10 on CPU),
    rounded to the nearest (text) or up (scripts)."""
    s = 1.0 / (multiplier * gamma_estimate(distances, weighting))
    if not math.isfinite(s):
        raise FloatingPointError("DrMAD's step heuristic: the distances |w_t - w_0| are not finite (training diverged)")
    return max(1, math.ceil(s) if weighting == "scripts" else round(s))


def step_map(kind: StepMap, line_steps: int, forward_steps: int, distances: torch.Tensor | None = None):
    """s -> forward step for a line of `line_steps` steps standing in for `forward_steps`."""
    if kind == "same":
        return lambda s: min(s, forward_steps - 1)
    if kind == "stride":
        return lambda s: s * forward_steps // line_steps
    if kind == "nearest":
        share = torch.cat([distances.new_zeros(1), distances]) / distances[-1]  # share[t] for w_t
        return lambda s: min(int((share - s / line_steps).abs().argmin()), forward_steps - 1)
    raise ValueError(f"step map must be same, stride or nearest (got {kind!r})")


class LinePath:
    """The straight line w_s = (s/S) w_end + (1 - s/S) w_0, walked from s = S down to 0."""

    def __init__(self, w0: torch.Tensor, w_end: torch.Tensor, steps: int, forward_step):
        self.w0, self.w_end, self.reverse_steps = w0, w_end, steps
        self.forward_step = forward_step
        self._w = w_end

    def w(self) -> torch.Tensor:
        return self._w

    def v(self) -> None:
        return None

    def undo_position(self, s: int) -> None:
        frac = s / self.reverse_steps
        self._w = frac * self.w_end + (1 - frac) * self.w0

    def undo_velocity(self, s: int, g: torch.Tensor) -> None:
        pass


def drmad2_path(problem: Problem, w_T: torch.Tensor, v_T: torch.Tensor, distances: torch.Tensor, last: int,
                line_steps: Callable[[torch.Tensor], int], kind: StepMap) -> "Drmad2Path":
    """DrMAD2 from a float run's end (w_T, v_T) and distances: float reversal of its last `last`
    steps (capped at T), then the line to w_0 in `line_steps(distances of the head)` steps."""
    k = min(last, problem.steps)
    head = problem.steps - k
    tail = FloatPath(problem, w_T, v_T, distances)
    return Drmad2Path(problem, tail, k, line_steps(distances[:head]) if head else 0, kind)


class Drmad2Path:
    """Float reversal of the last K forward steps, then the straight line to w_0 in S steps."""

    def __init__(self, problem: Problem, trained: FloatPath, last: int, line_steps: int, kind: StepMap):
        self.problem, self.float_path, self.last, self.line_steps = problem, trained, last, line_steps
        self.reverse_steps = line_steps + last
        self.kind = kind
        self.line: LinePath | None = None
        self.distances = trained.distances

    def forward_step(self, s: int) -> int:
        head = self.problem.steps - self.last
        if s >= self.line_steps:
            return head + s - self.line_steps
        return step_map(self.kind, self.line_steps, head, self.distances[:head])(s)

    def _segment(self, s: int):
        if s >= self.line_steps:
            return self.float_path
        if self.line is None:  # w_{T-K} is known only once the float part is undone
            self.line = LinePath(self.problem.w0, self.float_path.w(), self.line_steps, self.forward_step)
        return self.line

    def w(self) -> torch.Tensor:
        return self.line.w() if self.line is not None else self.float_path.w()

    def v(self) -> None:
        return None

    def undo_position(self, s: int) -> None:
        segment = self._segment(s)
        segment.undo_position(self.forward_step(s) if segment is self.float_path else s)

    def undo_velocity(self, s: int, g: torch.Tensor) -> None:
        if s >= self.line_steps:
            self.float_path.undo_velocity(self.forward_step(s), g)


def drmad_path(problem: Problem, trained: FloatPath, steps: int | None = None, multiplier: float = 1.0,
               kind: StepMap = "same") -> LinePath:
    """DrMAD over `trained` (only its w_0 and w_T are used); S from the heuristic when None."""
    steps = steps or heuristic_steps(trained.distances, multiplier)
    return LinePath(problem.w0, trained.w(), steps, step_map(kind, steps, problem.steps, trained.distances))
