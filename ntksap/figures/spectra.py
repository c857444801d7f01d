"""Figure 2: the sorted NTK eigenvalues of several networks on one log axis."""

from __future__ import annotations

import pandas as pd


def plot_spectra(frame: pd.DataFrame, ax=None, hue: str = "label"):
    """Figure 2 style: eigenvalue index vs eigenvalue on a log axis, one line per
    ``hue`` value (seaborn ``lineplot``). Non-positive eigenvalues (rounding
    noise of singular kernels) are left out. Returns the matplotlib Axes."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("index", "eigenvalue", hue) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; it has {list(frame.columns)} "
                         f"(hue={hue!r} must name one of them)")
    import matplotlib.pyplot as plt
    import seaborn as sns

    new_figure = ax is None
    if new_figure:
        _, ax = plt.subplots(figsize=(5.0, 3.5))
    data = frame[frame["eigenvalue"] > 0]
    sns.lineplot(data=data, x="index", y="eigenvalue", hue=hue, ax=ax, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("NTK eigenvalue")
    if new_figure:
        ax.figure.tight_layout()
    return ax
