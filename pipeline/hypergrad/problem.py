"""A training problem as the hypergradient methods see it: flat weights and pure losses.

Weights are one flat vector `w` of P numbers; `unflatten` gives the named views a
`functional_call` needs. `train_loss(w, t)` is the cross-entropy of step t's batch under step
t's dropout masks (both pure functions of (seed, t)), `val_loss(w)` the validation
cross-entropy with dropout off. BatchNorm always normalises with the statistics of the batch
it sees (for validation: the whole, fixed validation set), so no running statistics enter a
hypergradient and none are touched (algorithms §3).

Hyperparameters that live in model buffers (`scales`: the MLP's per-unit log scales s of
w = e^s * z, algorithms §8) enter every loss through `functional_call`; their hypergradients come
from the same passes as the weights' (`buffers` makes them differentiable leaves).

Momenta are stored as the rationals n / 2^16 that exact reversal uses, so every method
(exact, float, unrolled, finite differences) follows the same trajectory.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_
from torch.nn import functional as F

from pipeline import data_parallel
from pipeline.hyper import HyperSpace
from pipeline.hypergrad.bitsback import D, rational_beta
from pipeline.models import MaskedDropout, dropout_masks
from pipeline.training import MASK_STREAM, BatchSchedule, generator

LN10 = math.log(10.0)



def flat(tensors) -> torch.Tensor:
    """Tensors (or a name -> tensor mapping's values) as one detached flat vector."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.detach().reshape(-1) for t in values])

@dataclass
class Problem:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    alpha: torch.Tensor  # [T] step sizes, or [T, P] per-parameter (float64: float32 would round them)
    beta: torch.Tensor  # [T] momenta (float64); replaced by their rationals n / 2^16
    batch_size: int
    seed: int
    w0: torch.Tensor = field(default=None)  # flat initial weights (default: the model's)
    v0: torch.Tensor = field(default=None)  # velocity before step 0 (default: zeros)
    first_step: int = 0  # global index of step 0: batches and masks are those of first_step + t
    exact_beta: bool = True  # False: keep beta as given (paths that never divide by it)
    scales: HyperSpace | None = None  # hyperparameters held in model buffers, keyed by buffer name
    n: list[int] = field(init=False)

    def __post_init__(self):
        self.model = replace_all_batch_norm_modules_(copy.deepcopy(self.model))  # batch statistics only
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.numels = [p.numel() for _, p in self.model.named_parameters()]
        self.dtype = self.x.dtype
        if self.w0 is None:
            self.w0 = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).to(self.dtype)
        if self.v0 is None:
            self.v0 = torch.zeros_like(self.w0)
        if self.exact_beta:
            self.n = [rational_beta(float(b)) for b in self.beta]
            self.beta = torch.tensor([n / D for n in self.n], dtype=torch.float64)
        else:
            self.n, self.beta = [], self.beta.to(torch.float64)
        self.alpha = self.alpha.to(self.x.device, torch.float64)
        self.batches = BatchSchedule(len(self.x), self.batch_size, self.seed)
        self._dropout = [m for m in self.model.modules() if isinstance(m, MaskedDropout)]

    @property
    def steps(self) -> int:
        return len(self.alpha)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.views(flat)))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s) for t, s in zip(flat.split(self.numels), self.shapes)]

    def flatten(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([named[n].reshape(-1) for n in self.names])

    # -- losses ------------------------------------------------------------------------------
    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches.indices(self.first_step + t).to(self.x.device)
        return self.x[idx], self.y[idx]

    def buffers(self) -> dict[str, torch.Tensor]:
        """The buffer hyperparameters' current values by buffer name (empty without `scales`)."""
        if self.scales is None:
            return {}
        return {n: self.scales.log_value(n).to(self.dtype) for n in self.scales.shapes}

    def named(self, w: torch.Tensor | list[torch.Tensor],
              buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What `functional_call` needs: the weights' named views (of the flat w, or w as
        per-parameter tensors already) and the buffer hyperparameters."""
        weights = dict(zip(self.names, w)) if isinstance(w, list) else self.unflatten(w)
        return {**weights, **(self.buffers() if buffers is None else buffers)}

    def leaves(self, w: torch.Tensor) -> list[torch.Tensor]:
        """w as per-parameter leaves to differentiate by. Differentiating by the flat w instead
        would make autograd build a zero-filled P-vector per parameter in every backward pass
        (the backward of a slice); the per-parameter gradients are the same numbers."""
        return [p.detach().requires_grad_() for p in self.views(w.detach())]

    def join(self, parts) -> torch.Tensor:
        """Per-parameter tensors (weights or gradients) as one flat vector, `views`' inverse."""
        return torch.cat([p.reshape(-1) for p in parts])

    def train_loss(self, w: torch.Tensor | list[torch.Tensor], t: int, batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Pass `batch` (= self.batch(t)) when calling inside a torch.func transform: the batch
        order is cached, and a cache filled inside a transform would leak its tensors.
        `buffers` overrides the buffer hyperparameters (to differentiate through them)."""
        x, y = batch if batch is not None else self.batch(t)
        self.model.train()
        if not self._dropout:  # no masks to draw: skip the per-step generator
            return F.cross_entropy(functional_call(self.model, self.named(w, buffers), (x,)), y)
        with dropout_masks(self.model, generator(self.seed, MASK_STREAM, self.first_step + t, self.x.device)):
            logits = functional_call(self.model, self.named(w, buffers), (x,))
        return F.cross_entropy(logits, y)

    def val_loss(self, w: torch.Tensor | list[torch.Tensor], buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        self.model.train()
        for m in self._dropout:
            m.eval()  # dropout off, BatchNorm on the validation set's own statistics
        logits = functional_call(self.model, self.named(w, buffers), (self.val_x,))
        return F.cross_entropy(logits, self.val_y)

    def train_grad(self, w: torch.Tensor, t: int) -> torch.Tensor:
        """Gradient of the cross-entropy of step t (the L2 part is added in closed form), averaged
        over the data-parallel ranks."""
        leaves = self.leaves(w)
        return data_parallel.average([self.join(torch.autograd.grad(self.train_loss(leaves, t), leaves))])[0]

    # -- L2 hyperparameters as flat vectors ----------------------------------------------------
    def l2_coefficients(self, l2: HyperSpace | None) -> torch.Tensor:
        """c with grad R(w) = c * w, i.e. 2 * 10^lambda on regularised weights and 0 elsewhere."""
        parts = [2 * l2.value(n).reshape(-1) if l2 is not None and n in l2.shapes
                 else torch.zeros(k, dtype=torch.float64, device=self.x.device)
                 for n, k in zip(self.names, self.numels)]
        return torch.cat(parts).to(self.dtype)

    def reduce_l2(self, l2: HyperSpace, per_element: torch.Tensor) -> dict[str, torch.Tensor]:
        named = self.unflatten(per_element)
        return l2.reduce({n: named[n].to(torch.float64) for n in l2.shapes})

    def alpha_at(self, t: int) -> torch.Tensor:
        return self.alpha[t].to(self.dtype)
