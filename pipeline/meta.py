"""Meta-iterations: sign steps on hyperparameters in log space (algorithms §6).

    m <- mu * m - (1 - mu) * sign(d theta);    theta <- clip(theta + eta * m)

the thesis' momentum convention (the same as its SGD's): the first step is (1 - mu) * eta and a
steady one (the same sign throughout) approaches eta, so eta is the most a hyperparameter moves
per meta-iteration (thesis 3.2.1: 1/3 in log10 units, "at most 3 meta-iterations" for an order of
magnitude). With mu = 0 it is a plain sign step of eta.

and epochs that grow by a factor per meta-iteration up to a cap (thesis: 100 -> 300, x1.4).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.hyper import HyperSpace
from pipeline.progress import Progress
from pipeline.tracking import SILENT, Tracker


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


class MetaState:
    """A meta-iteration loop's state, what its checkpoint holds: the hyperparameters, their
    sign-step momentum, the completed iterations, the outcome, the rows written so far (tables by
    name) and what a finalist would retrain (`chosen`, where the loop chooses)."""
    FORMAT = 2  # in checkpoint fingerprints: a checkpoint of another layout is not restored

    def __init__(self, hypers: HyperSpace, tables: tuple[str, ...]):
        self.hypers, self.momentum = hypers, zero_momentum(hypers)
        self.iteration, self.outcome, self.chosen = 0, "finished", None
        self.rows: dict[str, list[dict]] = {name: [] for name in tables}

    def state(self) -> dict:
        return {"values": self.hypers.values, "momentum": self.momentum, "iteration": self.iteration,
                "outcome": self.outcome, "rows": self.rows, "chosen": self.chosen}

    def restore(self, state: dict) -> None:
        for key, value in state["values"].items():
            self.hypers.values[key].copy_(value)
            self.momentum[key].copy_(state["momentum"][key])
        self.iteration, self.outcome, self.rows, self.chosen = (state["iteration"], state["outcome"], state["rows"],
                                                                state["chosen"])


def run_meta_iterations(state: MetaState, total: int, step: Callable[[], bool], save: Callable[[dict], None],
                        bar_name: str, report: Callable[[], dict], progress: bool | None = None,
                        tracker: Tracker = SILENT) -> None:
    """The meta-iterations left (from `state.iteration` to `total`), `save`d after each. `step` runs
    one and says whether it stayed finite: a divergence ends the loop as outcome `diverged`, the
    hyperparameters at their last finite values; `report` gives the progress bar's figures."""
    bar = Progress(state.iteration, total, bar_name, "meta-iteration", progress)
    for _ in bar:
        if state.outcome == "diverged":
            break
        if step():
            state.iteration += 1
            bar.report(**report())
        else:
            state.outcome = "diverged"
            tracker.set_tag("outcome", "diverged")
        save(state.state())
