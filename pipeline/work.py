"""Counted work: what a run spent, in gradient evaluations, whatever else ran on the machine.

- A training step: one gradient evaluation (forward and backward of its batch).
- A reverse step: one Hessian-vector product, `hvp_cost` gradient evaluations. Double backward
  returns the step's gradient with the product (algorithms §4), so nothing else is recomputed,
  and DrMAD's line needs no gradient beyond it; forward-over-reverse recomputes the gradient, one
  more evaluation per step (`recomputed`).
- A hypergradient: one more gradient, of the validation loss at its end.
- Evaluations (validation, test, precise BN) tune nothing and are not counted.

`hvp_cost` is a declared constant per model (params.yaml `work.hvp_cost` for the DenseNet,
`quality.hvp_cost` for the MLP), measured as double backward's time over a gradient's
(`bench/hypergrad.py --only hvp`), so budgets and trial counts do not depend on the machine; each
run records the ratio it measured beside it (`hvp_cost_measured`), so a stale constant shows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass
class Work:
    training_gradients: int = 0
    hyper_gradients: int = 0
    hvps: int = 0

    def train(self, steps: int) -> None:
        self.training_gradients += steps

    def hypergradient(self, reverse_steps: int, recomputed: int = 0) -> None:
        """One hypergradient: its reverse steps' HVPs, the validation gradient and the training
        gradients its HVP did not return (`recomputed`)."""
        self.hyper_gradients += 1 + recomputed
        self.hvps += reverse_steps

    def metrics(self, hvp_cost: float) -> dict[str, float]:
        """Totals in gradient evaluations, and the share that went into hypergradients."""
        hyper = self.hyper_gradients + hvp_cost * self.hvps
        total = self.training_gradients + hyper
        return {"work_gradient_equivalents": total, "work_training_gradients": self.training_gradients,
                "work_hypergradient_gradients": self.hyper_gradients, "work_hvps": self.hvps,
                "hypergradient_work_share": round(hyper / total, 6) if total else 0.0}


def step_costs(problem, hvp, sample: int = 100, clock=None) -> tuple[float, float]:
    """Seconds of one training gradient and of one gradient-plus-HVP (double backward computes
    both), each the best of two passes over `sample` steps of a hypergradient Problem. Their
    ratio is the `hvp_cost_measured` a run records beside the declared constant. `clock`:
    `time.perf_counter` (wall) by default; `time.process_time` counts this process's CPU seconds,
    which other processes on the same cores inflate far less."""
    clock = clock or time.perf_counter
    k, w = min(sample, problem.steps), problem.w0
    dv = torch.ones_like(w)

    def per_step(fn) -> float:
        best = math.inf
        for _ in range(2):
            start = clock()
            for t in range(k):
                fn(w, t)
            best = min(best, (clock() - start) / k)
        return best

    return per_step(problem.train_grad), per_step(lambda w, t: hvp(problem, w, t, dv))
