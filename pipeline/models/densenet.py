"""DenseNet (Huang et al. 2017) as in the Lasagne reference the thesis used.

BN-ReLU-Conv3x3(-dropout) layers whose outputs are concatenated, three dense blocks joined
by BN-ReLU-Conv1x1(-dropout)-AvgPool2 transitions, then BN-ReLU-global pool-linear.
Convolutions carry no bias (BatchNorm follows). DenseNet-40: depth 40, k = 12, 16 initial maps.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.dropout import MaskedDropout
from pipeline.seeds import INIT_STREAM, derive_seed


def _bn_relu_conv(c_in: int, c_out: int, kernel: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        MaskedDropout(dropout))


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, dropout: float):
        super().__init__()
        self.body = _bn_relu_conv(c_in, growth, 3, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(nn.Module):
    def __init__(self, depth: int = 40, growth_rate: int = 12, init_maps: int = 16,
                 dropout: float = 0.2, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        assert (depth - 4) % 3 == 0, "depth must be 3n + 4"
        per_block = (depth - 4) // 3
        layers: list[nn.Module] = [nn.Conv2d(in_channels, init_maps, 3, padding=1, bias=False)]
        c = init_maps
        for block in range(3):
            for _ in range(per_block):
                layers.append(DenseLayer(c, growth_rate, dropout))
                c += growth_rate
            if block < 2:
                layers += [_bn_relu_conv(c, c, 1, dropout), nn.AvgPool2d(2)]
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal convolutions and a Glorot classifier, as in the Lasagne reference.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_densenet(cfg, info: dict, seed: int) -> DenseNet:
    """The DenseNet of `cfg` (params.yaml `model`) for a dataset's `info`, with weights drawn from
    `seed` alone (on the CPU, so every device starts equal)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, INIT_STREAM))
        return DenseNet(cfg.depth, cfg.growth_rate, cfg.init_maps, cfg.dropout,
                        in_channels=info["channels"], num_classes=info["num_classes"])
