"""The quality study's problem: the MNIST MLP in the form w = e^s * z (thesis 3.1, algorithms §8),
its data as a protocol prepares it, the fixed c ||z||^2 penalty, and its error rate. Shared by the
quality, trajectory and arena stages."""
from __future__ import annotations

import math

import torch
from torch.func import functional_call

from pipeline import data
from pipeline.config import QualityConfig, QualityProtocol
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import Problem
from pipeline.models import MLP
from pipeline.seeds import INIT_STREAM, derive_seed


def build_mlp(protocol: QualityProtocol, seed: int, in_features: int, num_classes: int) -> MLP:
    """The scaled MLP with z_0 drawn from `seed` alone (on the CPU, so every device starts equal):
    e^z0_log_scale * N(0, 1) (thesis), or N(0, 1/fan-in) when z0_log_scale is null. Scaled biases
    draw their z with the weights' (layer by layer, weights first) and keep s_b = init_scale."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, INIT_STREAM))
        mlp = MLP((in_features, *protocol.hidden, num_classes), scaled=True, activation=protocol.activation,
                  scaled_biases=protocol.biases == "scaled")
        with torch.no_grad():
            for layer in mlp.layers:
                if protocol.z0_log_scale is not None:
                    layer.z.normal_().mul_(math.exp(protocol.z0_log_scale))
                if layer.scaled_biases:
                    layer.bias_s.fill_(protocol.init_scale)
                    if protocol.z0_log_scale is not None:
                        layer.bias_z.normal_().mul_(math.exp(protocol.z0_log_scale))
        return mlp


def load_data(cfg: QualityConfig, protocol: QualityProtocol) -> tuple[dict, dict]:
    return data.build(cfg.data, pixels=protocol.pixels)


def build_problem(cfg: QualityConfig, protocol: QualityProtocol, seed: int, steps: int, splits: dict, info: dict,
                  device: torch.device) -> Problem:
    dtype = getattr(torch, cfg.dtype)
    x, y = (splits["train"][k].to(device) for k in ("x", "y"))
    model = build_mlp(protocol, seed, x[0].numel(), info["num_classes"]).to(device, dtype)
    scales = HyperSpace.scales(model, protocol.init_scale, bounds=tuple(cfg.scale_bounds), device=device)
    return Problem(model, x.flatten(1).to(dtype), y, splits["val"]["x"].flatten(1).to(device, dtype),
                   splits["val"]["y"].to(device), alpha=torch.full((steps,), protocol.alpha, dtype=torch.float64),
                   beta=torch.full((steps,), protocol.momentum, dtype=torch.float64), batch_size=protocol.batch_size, seed=seed,
                   scales=scales)


def penalty(problem: Problem, protocol: QualityProtocol, device: torch.device) -> HyperSpace:
    """The fixed c ||z||^2 term, c = base^log_l2, as a global L2 hyperparameter (log10 inside)."""
    return HyperSpace.l2(problem.model, protocol.log10_l2, "global", device=device)


def error_rate(problem: Problem, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = functional_call(problem.model, problem.named(w), (x.flatten(1).to(problem.dtype),))
    return (logits.argmax(1) != y).double().mean().item()
