"""Dropout whose masks come from an explicit generator.

Reverse passes recompute the gradient of step t and must see the same masks, and
`F.dropout` takes no generator. So a training forward runs inside `dropout_masks(model, g)`:
every MaskedDropout draws from `g` in layer order, which makes the masks a pure function of
the generator's seed. A training forward without a generator is an error, not hidden noise.
Under data parallelism each rank keeps its rows of the whole batch's masks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from pipeline import data_parallel


class MaskedDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.generator is None:
            raise RuntimeError("training forward with dropout needs masks: wrap it in dropout_masks(model, generator)")
        if data_parallel.world_size() == 1:
            keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        else:  # the whole batch's masks, so each rank's rows get the ones a single process would draw
            whole = x.new_empty((len(x) * data_parallel.world_size(), *x.shape[1:]))
            keep = data_parallel.shard(whole.bernoulli_(1 - self.p, generator=self.generator))
        return x * keep / (1 - self.p)


@contextmanager
def dropout_masks(model: nn.Module, generator: torch.Generator) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, MaskedDropout)]
    for m in layers:
        m.generator = generator
    try:
        yield
    finally:
        for m in layers:
            m.generator = None
