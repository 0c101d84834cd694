"""MLP for the MNIST study, optionally in the thesis form w = e^s * z (algorithms §8).

With `scaled=True` each layer trains `z` while `s` (one per output unit, a hyperparameter,
so a buffer rather than a parameter) sets both the initial scale and the effective L2.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ScaledLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.z = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.register_buffer("s", torch.zeros(n_out))

    @property
    def weight(self) -> torch.Tensor:
        return self.s.exp()[:, None] * self.z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (784, 50, 50, 50, 10), scaled: bool = False):
        super().__init__()
        make = ScaledLinear if scaled else nn.Linear
        self.layers = nn.ModuleList(make(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
