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
