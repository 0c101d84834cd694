"""Figures people would rather look at than read (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def error_curves(per_epoch: pd.DataFrame, title: str) -> Figure:
    """Train/val/test error per epoch (thesis figs 3.9, 3.15)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val", "test"):
        ax.plot(per_epoch["epoch"], 100 * per_epoch[f"{split}_error"], label=split)
    ax.set(xlabel="epoch", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def histogram(values, title: str, xlabel: str, bins: int = 60) -> Figure:
    """Distribution of many hyperparameters (MLflow has no histogram type)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values.numpy() if hasattr(values, "numpy") else values, bins=bins, color="tab:blue", alpha=0.8)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def meta_curves(per_meta: pd.DataFrame, title: str) -> Figure:
    """Train/val/test error after each meta-iteration (thesis fig. 3.8)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val", "test"):
        ax.plot(per_meta["meta_iteration"], 100 * per_meta[f"{split}_error"], marker="o", label=split)
    ax.set(xlabel="meta-iteration", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
