"""What a run logs about its many hyperparameters: a handful of curves, not one per layer.

Per-layer detail (mean and std of every layer) stays in each stage's layers.csv artifact and in
the report's figures; the MLflow chart view gets the quantiles of all values of one kind.
"""
from __future__ import annotations

import torch

from pipeline.hyper import HyperSpace

QUANTILES = {"p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}


def hyper_quantiles(space: HyperSpace, kind: str, scale: float = 1.0) -> dict[str, float]:
    """hyper/<kind>/{p05,p25,median,p75,p95,mean} over every hyperparameter value (log scale x `scale`)."""
    values = torch.cat([space.log_value(n).reshape(-1).double().cpu() for n in space.shapes]) * scale
    if values.numel() > 16_000_000:  # torch.quantile's limit: an even subsample, same for every call
        values = values[:: values.numel() // 16_000_000 + 1]
    levels = torch.tensor(list(QUANTILES.values()), dtype=torch.float64)
    out = {f"hyper/{kind}/{name}": q.item() for name, q in zip(QUANTILES, torch.quantile(values, levels))}
    out[f"hyper/{kind}/mean"] = values.mean().item()
    return out
