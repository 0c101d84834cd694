"""HyperSpace: hyperparameter tensors attached to model parameters by name.

A hyperparameter lives on a log scale (log10 for L2 coefficients, natural log for learning
rates) and is shared in one of four ways:

    parameter   one per weight (same shape as the parameter)
    unit        one per output unit / output channel, broadcast over the rest
    layer       one per parameter tensor
    global      one for every parameter that carries this kind of hyperparameter
    thesis      dense (2-D) weights per output unit, everything else per weight (thesis 3.2.2)

Hypergradients come back shaped like the hyperparameters: per-element sensitivities are
summed over each sharing group (`reduce`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from pipeline.training import is_regularised

Sharing = Literal["parameter", "unit", "layer", "global", "thesis"]
GLOBAL = "global"


def _group_shape(shape: torch.Size, sharing: Sharing) -> tuple[int, ...]:
    if sharing == "thesis":
        sharing = "unit" if len(shape) == 2 else "parameter"
    if sharing == "parameter":
        return tuple(shape)
    if sharing == "unit":
        return (shape[0],) if len(shape) else ()
    return ()


@dataclass
class HyperSpace:
    """One kind of hyperparameter (e.g. log10 L2) over the selected parameters of a model.

    `shapes` maps each carrying parameter's name to its shape; `values` maps each key (the
    parameter name, or "global") to the log-scale tensor."""
    kind: str
    base: float
    sharing: Sharing
    shapes: dict[str, torch.Size]
    values: dict[str, torch.Tensor]
    bounds: tuple[float, float] = (-math.inf, math.inf)
    _keys: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self):
        self._keys = {name: GLOBAL if self.sharing == GLOBAL else name for name in self.shapes}

    @classmethod
    def create(cls, named_shapes: dict[str, torch.Size], kind: str, init: float, sharing: Sharing,
               base: float = 10.0, bounds: tuple[float, float] = (-math.inf, math.inf),
               select: Callable[[str], bool] = is_regularised, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> "HyperSpace":
        shapes = {n: torch.Size(s) for n, s in named_shapes.items() if select(n)}
        if sharing == GLOBAL:
            values = {GLOBAL: torch.full((), init, dtype=dtype, device=device)}
        else:
            values = {n: torch.full(_group_shape(s, sharing), init, dtype=dtype, device=device)
                      for n, s in shapes.items()}
        return cls(kind, base, sharing, shapes, values, bounds)

    @classmethod
    def l2(cls, model: torch.nn.Module, init: float, sharing: Sharing = "parameter", **kw) -> "HyperSpace":
        """log10 L2 coefficients on conv/linear weights and BatchNorm scales (not on biases/shifts)."""
        return cls.create({n: p.shape for n, p in model.named_parameters()}, "log10_l2", init, sharing, **kw)

    @classmethod
    def scales(cls, model: torch.nn.Module, init: float = 0.0, **kw) -> "HyperSpace":
        """The scaled MLP's per-unit log scales s (w = e^s * z, algorithms §8): hyperparameters held
        in model buffers named `*.s`, natural log, one per output unit."""
        shapes = {n: b.shape for n, b in model.named_buffers() if n.endswith(".s")}
        return cls.create(shapes, "log_scale", init, "parameter", base=math.e, select=lambda n: True, **kw)

    def key(self, name: str) -> str:
        return self._keys[name]

    def log_value(self, name: str) -> torch.Tensor:
        """The log-scale hyperparameter of parameter `name`, broadcast to the parameter's shape."""
        value, shape = self.values[self.key(name)], self.shapes[name]
        return value.reshape(value.shape + (1,) * (len(shape) - value.dim())).expand(shape)

    def value(self, name: str) -> torch.Tensor:
        """base ** hyperparameter, broadcast to the parameter's shape."""
        return torch.pow(self.base, self.log_value(name))

    def reduce(self, per_element: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum per-element sensitivities (keyed by parameter) over each sharing group."""
        out = {k: torch.zeros_like(v) for k, v in self.values.items()}
        for name, grad in per_element.items():
            target = out[self.key(name)]
            extra = tuple(range(target.dim(), grad.dim()))
            target += grad.sum(dim=extra) if extra else grad
        return out

    def clip_(self) -> None:
        for v in self.values.values():
            v.clamp_(*self.bounds)

    def clone(self) -> "HyperSpace":
        return HyperSpace(self.kind, self.base, self.sharing, dict(self.shapes),
                          {k: v.detach().clone() for k, v in self.values.items()}, self.bounds)
