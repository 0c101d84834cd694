"""Figures people would rather look at than read (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save(figure: Figure, path) -> None:
    """Write a PNG and free the figure."""
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


LABELS = {"exact": "exact", "float": "float reversal", "drmad": "DrMAD (heuristic S)",
          "drmad_fixed": "DrMAD (fixed S)", "drmad2": "DrMAD2", "truncated_S": "truncated (K = S)",
          "greedy": "greedy (one step)"}
# One colour per method in every figure, so a method is recognised across them; methods named by
# a number (truncated_100, ift_10, ...) take the next free colour of the palette, in order.
COLOURS = {"exact": "black", "float": "tab:orange", "drmad": "tab:blue", "drmad_fixed": "tab:purple",
           "drmad2": "tab:green", "truncated_S": "tab:red", "greedy": "tab:gray"}
PALETTE = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "gold", "navy", "lime", "teal")


def label(method: str) -> str:
    family, _, value = method.rpartition("_")
    named = {"truncated": f"truncated (K = {value})", "ift": f"implicit ({value} Neumann terms)"}
    return LABELS.get(method) or named.get(family, method)


def colours(methods) -> dict[str, str]:
    free = iter(PALETTE)
    return {m: COLOURS.get(m) or next(free, None) for m in methods}


def _by_method(ax, table: pd.DataFrame, column: str, methods, colour: dict[str, str]) -> None:
    for method in methods:
        rows = table[table["method"] == method]
        ax.plot(rows["meta_iteration"], rows[column], marker="o", label=label(method), color=colour[method])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # meta-iterations are whole


def frontier(runs: dict[str, tuple[pd.DataFrame, int]]) -> Figure:
    """Per run, each method's cosine with the exact hypergradient against the counted work of the
    hypergradient itself, beyond the T training gradients every method shares (mean over
    meta-iterations; the bars span their min and max): a cost-quality frontier. `runs`: a title ->
    (hypergradient rows with method, work and cos_exact; T)."""
    methods = list(dict.fromkeys(m for rows, _ in runs.values() for m in rows["method"]))
    colour, cols = colours(methods), min(3, len(runs))
    rows_n = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    for ax, (title, (table, steps)) in zip(axes.flat, runs.items()):
        for method in methods:
            rows = table[table["method"] == method]
            cos = rows["cos_exact"].fillna(1.0) if method == "exact" else rows["cos_exact"]
            if not len(rows) or cos.isna().all():
                continue
            x, y = rows["work"].mean() - steps, cos.mean()
            ax.errorbar(x, y, yerr=[[y - cos.min()], [cos.max() - y]], marker="o", capsize=3, color=colour[method],
                        label=label(method), linestyle="none")
        ax.set(xscale="log", xlabel="hypergradient work beyond training (gradient evaluations)",
               ylabel="cosine with exact", title=title, ylim=(-1.05, 1.05))
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower right", fontsize=8)
    fig.suptitle("Cost and quality of each hypergradient against exact")
    fig.tight_layout()
    return fig


def quality_figures(frames: dict[str, pd.DataFrame], title: str) -> dict[str, Figure]:
    """The quality stage's figures, named after the thesis figures they reproduce."""
    hyper, errors, trace = frames["hypergrads"], frames["errors"], frames["reverse"]
    methods = list(dict.fromkeys(hyper["method"]))
    colour, out = colours(methods), {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _by_method(ax, hyper, "norm", methods, colour)
    ax.set(yscale="log", xlabel="meta-iteration", ylabel="hypergradient norm", title=f"Fig 3.1 norms, {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    out["fig3_1_norms.png"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, column, name in zip(axes, ("cos_exact", "sign_cos_exact"), ("hypergradients", "their signs")):
        _by_method(ax, hyper, column, [m for m in methods if m != "exact"], colour)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="meta-iteration", ylabel="cosine with exact", title=f"Fig 3.2 cosine of {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    out["fig3_2_cosines.png"] = fig

    wide = errors.pivot(index="meta_iteration", columns="split", values="error").reset_index()
    out["fig3_3_errors.png"] = meta_curves(wide.rename(columns={s: f"{s}_error" for s in ("train", "val", "test")}),
                                           f"Fig 3.3 errors, {title}")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, quantity, name in zip(axes, ("theta_norm", "dw_norm"), ("|d theta| (d s)", "|dw|")):
        for i, rows in trace[trace["quantity"] == quantity].groupby("meta_iteration"):
            ax.plot(rows["steps_back"], rows["value"], label=f"meta-iteration {i}")
        ax.set(yscale="log", xlabel="reverse steps from w_T", ylabel=name, title=f"Figs 3.4-3.5 exact {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    out["fig3_4_reverse_norms.png"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    first = trace[trace["meta_iteration"] == trace["meta_iteration"].min()]
    for quantity in ("w", "v", "d_theta", "dw"):
        rows = first[first["quantity"] == quantity]
        axes[0].plot(rows["steps_back"], rows["value"].clip(lower=1e-300), label=quantity)
    axes[0].set(yscale="log", xlabel="reverse steps from w_T", ylabel="|exact - float|",
                title="Fig 3.6 float vs exact reversal")
    axes[0].legend(fontsize=8)
    rows = first[first["quantity"] == "cos_d_theta"]
    axes[1].plot(rows["steps_back"], rows["value"])
    axes[1].set(xlabel="reverse steps from w_T", ylabel="cosine", title="cos(d theta exact, d theta float)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}, first meta-iteration")
    out["fig3_6_drift.png"] = fig
    for figure in out.values():
        figure.tight_layout()
    return out


def parameter_paths(path: pd.DataFrame, coordinates: pd.DataFrame, explained: list[float]) -> dict[str, Figure]:
    """Thesis figs 2.1-2.2: the stored iterates on two random coordinates and on the top-2
    principal components, and single coordinates against the iteration."""
    out = {}
    for projection, name, labels in (("random", "fig2_1_random_coordinates.png", ("coordinate a", "coordinate b")),
                                     ("pca", "fig2_2_pca.png", (f"PC1 ({100 * explained[0]:.1f}%)",
                                                                 f"PC2 ({100 * explained[1]:.1f}%)"))):
        rows = path[path["projection"] == projection]
        fig, ax = plt.subplots(figsize=(5, 5))
        points = ax.scatter(rows["x"], rows["y"], c=rows["iteration"], s=6, cmap="viridis")
        ax.plot(rows["x"], rows["y"], lw=0.5, color="grey")
        ax.set(xlabel=labels[0], ylabel=labels[1], title=f"Parameter path: {projection}")
        fig.colorbar(points, ax=ax, label="iteration")
        fig.tight_layout()
        out[name] = fig
    fig, ax = plt.subplots(figsize=(6, 4))
    for coordinate, rows in coordinates.groupby("coordinate"):
        ax.plot(rows["iteration"], rows["value"], label=f"w[{coordinate}]")
    ax.set(xlabel="iteration", ylabel="value", title="Single coordinates along training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["fig2_2_coordinates.png"] = fig
    return out


FIXED_COLOURS = {"baseline": "black", "random": "tab:gray", "tpe": "tab:brown"}
FAMILY_COLOURS = {"drmad": ("tab:blue", "tab:cyan", "tab:purple", "navy"), "adaptive": ("tab:green", "olive", "lime")}


def method_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every figure that shows the same methods: fixed for the
    baseline and the searches, a family's shades (by sorted name) for the DrMAD initialisations
    and the adaptive variants."""
    family = {m: m.split(" ")[0] for m in methods}
    out = {}
    for method in methods:
        if method in FIXED_COLOURS:
            out[method] = FIXED_COLOURS[method]
            continue
        shades = FAMILY_COLOURS.get(family[method], ("tab:red", "tab:pink", "tab:orange"))
        members = sorted(m for m in methods if family[m] == family[method] and m not in FIXED_COLOURS)
        out[method] = shades[members.index(method) % len(shades)]
    return out


def runs_test_error(curves: dict[str, pd.DataFrame]) -> Figure:
    """Test error per epoch of every run on one plot (each method in its colour of every figure)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = method_colours(list(curves))
    for name, frame in curves.items():
        ax.plot(frame["epoch"], 100 * frame["test_error"], marker=".", label=name, color=palette[name])
    ax.set(xlabel="epoch", ylabel="test error (%)", title="Test error per epoch (DrMAD: last meta-iteration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_trajectories(trajectories: dict[str, pd.DataFrame]) -> Figure:
    """Per-layer mean hyperparameters over meta-iterations or epochs, one panel per run and kind;
    layers coloured by depth (input dark, classifier light), the colour bar says which is which."""
    n = len(trajectories)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (title, frame) in zip(axes.flat, trajectories.items()):
        order = list(dict.fromkeys(frame["layer"]))  # the network's order, input first
        for depth, name in enumerate(order):
            layer = frame[frame["layer"] == name]
            ax.plot(layer["step"], layer["mean"], lw=0.8, color=cmap(depth / max(1, len(order) - 1)))
        unit = "meta-iteration" if "meta-iteration" in title else "epoch"
        ax.set(title=title, xlabel=unit, ylabel="layer mean (log10)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, ticks=[0, 1])
        bar.ax.set_yticklabels([order[0], order[-1]], fontsize=6)
        bar.set_label(f"{len(order)} layers by depth", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig
