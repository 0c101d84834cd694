"""MLP for the MNIST study, optionally in the thesis form w = e^s * z (algorithms §8).

With `scaled=True` each layer trains `z` while `s` (one per output unit, a hyperparameter,
so a buffer rather than a parameter) sets both the initial scale and the effective L2.
With `scaled_biases=True` the biases take the same form, `b = e^bias_s * bias_z`, where
`bias_s` is a fixed buffer (the thesis' scripts zero its hypergradient, so it never moves) and
`bias_z` is a parameter like `z`: penalised and drawn with it.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Activation = Literal["relu", "tanh"]
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


class ScaledLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, scaled_biases: bool = False):
        super().__init__()
        self.z = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.register_buffer("s", torch.zeros(n_out))
        self.scaled_biases = scaled_biases
        if scaled_biases:  # "bias_z" does not end in "bias": the L2 penalty covers it (is_regularised)
            self.bias_z = nn.Parameter(torch.zeros(n_out))
            self.register_buffer("bias_s", torch.zeros(n_out))  # not "*.s": no hyperparameter
        else:
            self.bias = nn.Parameter(torch.zeros(n_out))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weights e^s * z (forward never forms them)."""
        return self.s.exp()[:, None] * self.z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (e^s z)^T = (x z^T) e^s: scaling the [batch, out] product rather than the [out, in]
        # weights is the same function, but its multiply, and those its backward and double
        # backward passes derive from it, run over batch * out numbers: 50 * 50 instead of
        # 50 * 784 in the first layer, where nearly all the weights are.
        bias = self.bias_s.exp() * self.bias_z if self.scaled_biases else self.bias
        return F.linear(x, self.z) * self.s.exp() + bias


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (784, 50, 50, 50, 10), scaled: bool = False,
                 activation: Activation = "relu", scaled_biases: bool = False):
        super().__init__()
        if scaled_biases and not scaled:
            raise ValueError("scaled_biases needs scaled=True")
        self.act = ACTIVATIONS[activation]
        self.layers = nn.ModuleList(ScaledLinear(a, b, scaled_biases) if scaled else nn.Linear(a, b)
                                    for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x
