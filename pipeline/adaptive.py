"""The adaptive (online) method: hyperparameters that change during one training run (algorithms §7).

Every `every` (K) steps the validation loss of a validation batch is back-propagated through
the last `window` (M) steps, whose states are kept in memory (exact by storage), giving the
hypergradients of per-parameter log10 L2 and log learning rates eta (alpha = alpha_t * e^eta,
applied elementwise in w += alpha * v); both move by sign steps, then log10 L2 is clipped into
its bounds and eta to its ceiling (the thesis': an absolute learning rate, config `lr_max`).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.hyper import HyperSpace
from pipeline.hypergrad import Problem, StoredPath, log_lr_hypergradient
from pipeline.hypergrad.hvp import DEFAULT_HVP, HVP_METHODS
from pipeline.hypergrad.problem import flat
from pipeline.hypergrad.reverse import reverse
from pipeline.meta import sign_step, zero_momentum
from pipeline.training import Trainer


def hyper_update_due(step: int, every: int, window: int) -> bool:
    """Does step `step` (0-based, just taken) end with a hypergradient? Every `every` steps, once
    the last `window` states are stored."""
    return (step + 1) % every == 0 and step + 1 >= window


def hypergradients_in(steps: int, every: int, window: int) -> int:
    """Hypergradients a training of `steps` steps takes (`pipeline plan` counts with it)."""
    return sum(hyper_update_due(s, every, window) for s in range(steps))


@dataclass(frozen=True)
class AdaptiveSettings:
    every: int = 100  # K: elementary steps between hyperparameter updates
    window: int = 5  # M: steps the validation loss is back-propagated through
    l2_step: float = 0.01  # sign step of log10 L2
    lr_step: float = 0.2  # sign step of eta = ln(learning-rate multiplier)
    val_batch_size: int = 500  # validation batches cycle through the validation split
    hvp: str = DEFAULT_HVP  # Hessian-vector product implementation (params.yaml `hvp`)
    eta_floor: Callable[[int, int], float] | None = None  # (step, total steps) -> least eta, if scheduled


class AdaptiveTrainer(Trainer):
    """Classical-momentum SGD whose per-parameter L2 and learning rates follow hypergradients."""

    def __init__(self, model, x, y, val_x, val_y, cfg, seed: int, l2: HyperSpace, lr: HyperSpace,
                 settings: AdaptiveSettings):
        if cfg.nesterov:
            raise ValueError("the adaptive method reverses classical momentum: set nesterov false")
        super().__init__(model, x, y, cfg, seed)
        self.val_x, self.val_y, self.l2, self.lr, self.settings = val_x, val_y, l2, lr, settings
        self.recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.window)
        self.updates, self.hyper_seconds, self.finite = 0, 0.0, True
        self.hypergradients_taken = 0  # every one costs window reverse steps (updates: the finite ones)
        self._zero = (zero_momentum(l2), zero_momentum(lr))
        self.refresh()

    def refresh(self) -> None:
        """Push the current hyperparameters into the update rule."""
        self.l2_coefficients = [2 * self.l2.value(n).to(p) for n, p in zip(self.names, self.params)
                                if n in self.l2.shapes]
        self.lr_scales = [self.lr.value(n).to(p) for n, p in zip(self.names, self.params)]

    def update(self, step: int, grads: list[torch.Tensor]) -> None:
        self.recent.append((flat(self.params), flat(self.state.velocity)))  # w_t, v_{t-1}
        super().update(step, grads)
        if hyper_update_due(step, self.settings.every, self.settings.window):
            self.hyper_step(step)

    def raise_to_floor(self, step: int) -> None:
        """Keep every rate at or above the floor schedule's from this step on (the floor only
        falls with time, so clamping at each hyper-update is enough)."""
        least = self.settings.eta_floor(step, self.total_steps)
        for value in self.lr.values.values():
            value.clamp_(min=least)
        self.refresh()

    def validation_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = min(self.settings.val_batch_size, len(self.val_x))
        start = (self.updates * size) % len(self.val_x)
        idx = torch.arange(start, start + size, device=self.val_x.device) % len(self.val_x)
        return self.val_x[idx], self.val_y[idx]

    def problem(self, step: int) -> tuple[Problem, StoredPath]:
        """The last M steps (ending with `step`) as a problem, and their stored path."""
        m = self.settings.window
        first = step - m + 1
        ws = [w for w, _ in self.recent] + [flat(self.params)]
        vs = [v for _, v in self.recent] + [flat(self.state.velocity)]
        scales = flat(self.lr_scales)
        alphas = torch.stack([self.alpha(first + s) * scales for s in range(m)])
        problem = Problem(self.model, self.x, self.y, *self.validation_batch(), alpha=alphas,
                          beta=torch.full((m,), self.cfg.momentum, dtype=torch.float64), batch_size=self.cfg.batch_size,
                          seed=self.seed, w0=ws[0], v0=vs[0], first_step=first, exact_beta=False)
        return problem, StoredPath(problem, ws, vs)

    def hypergradients(self, step: int) -> tuple[dict, dict]:
        problem, path = self.problem(step)
        result = reverse(problem, path, self.l2, HVP_METHODS[self.settings.hvp])
        return result["log10_l2"], log_lr_hypergradient(problem, result, self.lr)

    def hyper_step(self, step: int) -> None:
        start = time.perf_counter()
        d_l2, d_eta = self.hypergradients(step)
        self.hypergradients_taken += 1
        if all(bool(torch.isfinite(g).all()) for g in (*d_l2.values(), *d_eta.values())):
            sign_step(self.l2, d_l2, self._zero[0], self.settings.l2_step, 0.0)
            sign_step(self.lr, d_eta, self._zero[1], self.settings.lr_step, 0.0)
            if self.settings.eta_floor is not None:
                self.raise_to_floor(step)
            self.updates += 1
            self.refresh()
        else:
            self.finite = False  # the caller records the divergence; hyperparameters stay finite
        self.hyper_seconds += time.perf_counter() - start
