"""Counted work: what a run spent, in gradient evaluations, whatever else ran on the machine.

A training step costs one gradient evaluation (forward and backward of its batch); a reverse
step one gradient (recomputed, algorithms §4) and one Hessian-vector product; each hypergradient
one more gradient, of the validation loss at its end. An HVP counts as `hvp_cost` gradient
evaluations (params.yaml `work.hvp_cost`, measured by `bench/hypergrad.py --only hvp`).
Evaluations (validation, test, precise BN) tune nothing and are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Work:
    training_gradients: int = 0
    hyper_gradients: int = 0
    hvps: int = 0

    def train(self, steps: int) -> None:
        self.training_gradients += steps

    def hypergradient(self, reverse_steps: int) -> None:
        self.hyper_gradients += reverse_steps + 1
        self.hvps += reverse_steps

    def metrics(self, hvp_cost: float) -> dict[str, float]:
        """Totals in gradient evaluations, and the share that went into hypergradients."""
        hyper = self.hyper_gradients + hvp_cost * self.hvps
        total = self.training_gradients + hyper
        return {"work_gradient_equivalents": total, "work_training_gradients": self.training_gradients,
                "work_hypergradient_gradients": self.hyper_gradients, "work_hvps": self.hvps,
                "hypergradient_work_share": round(hyper / total, 6) if total else 0.0}
