"""Figures of test accuracy: a Figure 1 panel (accuracy against sparsity) and learning curves."""

from __future__ import annotations

import pandas as pd

from ..layout import sparsity_label
from ..params import DENSE
from ..results import accuracy_caption, accuracy_of
from .style import sparsity_axis, sparsity_position


def plot_accuracy(summary: pd.DataFrame, ax=None, title: str | None = None):
    """Figure 1 panel: mean test accuracy vs sparsity, a band of one standard
    deviation over seeds, one line per run; a dense run is a horizontal line.
    The y label and the title name the accuracy (the summary's ``accuracy``:
    final, or best over epochs)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    pruned = summary[summary["method"] != DENSE]
    palette = dict(zip(pruned["label"].unique(), sns.color_palette("colorblind", pruned["label"].nunique())))
    for (run, label), g in pruned.groupby(["run", "label"], sort=False):
        g = g.sort_values("sparsity")
        x = sparsity_position(g["sparsity"])
        color = "black" if run == "ntksap" else palette[label]  # the paper's method stands out
        ax.plot(x, g["mean"], marker="o", ms=4, label=label, color=color, lw=2.2 if run == "ntksap" else 1.4)
        ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], color=color, alpha=0.15, lw=0)
    for _, row in summary[summary["method"] == DENSE].iterrows():
        ax.axhline(row["mean"], color="black", ls="--", lw=1, label=f"{row['label']} ({row['mean']:.1f})")
    sparsity_axis(ax, pruned["sparsity"])
    caption = accuracy_caption(accuracy_of(summary))
    ax.set_ylabel(caption)
    ax.set_title(f"{title}: {caption}" if title else caption)
    ax.legend(fontsize="small", ncols=2)
    return ax


def plot_curves(histories: pd.DataFrame, sparsity: float, metric: str = "test_top1", ax=None):
    """Learning curves at one sparsity: ``metric`` per epoch, mean over seeds,
    one line per run. The final accuracy is each line's last point, the best
    over epochs its highest (the title says so for test top-1)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    h = histories[(histories["sparsity"] - sparsity).abs() < 1e-9]
    sns.lineplot(data=h, x="epoch", y=metric, hue="label", errorbar="sd", ax=ax)
    what = "test top-1 (%)" if metric == "test_top1" else metric
    ax.set_ylabel(what)
    ax.set_title(f"{what} per epoch at {sparsity_label(sparsity)} % sparsity"
                 + ("\n(final: the last epoch; best over epochs: the highest)" if metric == "test_top1" else ""))
    ax.legend(fontsize="small")
    return ax
