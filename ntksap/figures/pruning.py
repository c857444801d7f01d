"""Figures of what pruning did: layer-wise density, the last iteration's scores, the NTK while pruning."""

from __future__ import annotations

import pandas as pd

from ..layout import sparsity_label
from .palette import COLORS


def _hue_label(value) -> str:
    return sparsity_label(value) + " %" if isinstance(value, float) else str(value)


def plot_layer_density(density: pd.DataFrame, hue: str = "label", ax=None):
    """Layer-wise density (fraction of weights kept per layer, log scale):
    grouped bars, one group per layer and one bar per ``hue`` value (run
    label, or sparsity). A layer pruned away entirely has no bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    d = density[density["name"] != "total"]
    layers = list(dict.fromkeys(d["name"]))
    groups = list(dict.fromkeys(d[hue]))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(layers) * len(groups) + 2), 4.2))
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        dens = d[d[hue] == g].set_index("name")["density"].reindex(layers)
        ax.bar(np.arange(len(layers)) + (i - (len(groups) - 1) / 2) * width, dens.to_numpy(), width,
               label=_hue_label(g), color=COLORS[i % len(COLORS)])
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=60, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("density (kept / weights)")
    ax.legend(fontsize="small", title=hue if hue != "label" else None)
    return ax


def plot_score_histogram(scores: pd.DataFrame, ax=None):
    """Distribution of the last iteration's scores at one sparsity: kept vs
    pruned weights, stacked (pruned below), as two filled step outlines over
    the histogram's bins (``scores``: left, right, pruned, kept)."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    left, right = scores["left"].to_numpy(), scores["right"].to_numpy()
    edges = np.append(left, right[-1:])
    pruned = scores["pruned"].to_numpy()
    ax.stairs(pruned, edges, fill=True, alpha=0.7, label="pruned")
    ax.stairs(pruned + scores["kept"].to_numpy(), edges, baseline=pruned, fill=True, alpha=0.7, label="kept")
    if (left > 0).all() and np.all(right / np.maximum(left, 1e-300) > 1.0001):
        ax.set_xscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("weights")
    ax.legend()
    return ax


def plot_track(track: pd.DataFrame, y: str, hue: str = "sparsity", ax=None):
    """NTK snapshots while pruning: column ``y`` (e.g. trace) against the
    pruning iteration, one line per ``hue`` value, log scale."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (g, part) in enumerate(track.groupby(hue, sort=False)):
        part = part.sort_values("iteration")
        ax.plot(part["iteration"], part[y], marker="o", ms=4, label=_hue_label(g), color=COLORS[i % len(COLORS)])
    ax.set_yscale("log")
    ax.set_xlabel("pruning iteration")
    ax.set_ylabel(y)
    ax.legend(fontsize="small")
    return ax


def plot_eigenvalues(frame: pd.DataFrame, hue: str = "iteration", ax=None):
    """Sorted NTK eigenvalues (log scale) against their index, one line per
    ``hue`` value (a long frame: index, eigenvalue, hue), coloured from light
    to dark in the order of ``hue``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    values = sorted(frame[hue].unique())
    cmap = plt.get_cmap("viridis")
    for i, v in enumerate(values):
        part = frame[(frame[hue] == v) & (frame["eigenvalue"] > 0)].sort_values("index")
        ax.plot(part["index"], part["eigenvalue"], color=cmap(i / max(1, len(values) - 1)), label=f"{hue} {v}")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("NTK eigenvalue")
    ax.legend(fontsize="small", ncols=2)
    return ax
