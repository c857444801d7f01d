"""Figures of NTK spectra: Figure 2 (sorted eigenvalues on a log axis), one panel per sparsity, relative to
the dense network's, and the distance of each spectrum to the dense one as bars."""

from __future__ import annotations

import pandas as pd

from ..layout import sparsity_label
from ..spectra import check_frame
from .palette import COLORS


def _check(frame, columns, **named) -> None:
    check_frame("frame", frame, columns, **named)


def _stands_out(value) -> bool:
    """NTK-SAP, drawn black in every figure (as in the Figure 1 panel)."""
    return str(value) in ("ntksap", "NTK-SAP")


def _is_dense(value) -> bool:
    return str(value).lower().startswith("dense")


def _label(column: str, value) -> str:
    if column == "sparsity":
        return f"{sparsity_label(value)} % sparsity"
    return f"{column} {value}" if column in ("iteration", "seed") else str(value)


def plot_spectra(frame: pd.DataFrame, ax=None, hue: str = "label"):
    """Figure 2 style: eigenvalue index vs eigenvalue on a log axis, one line per
    ``hue`` value, in the colours of the Figure 1 panel (NTK-SAP black; a dense
    network, a value starting with "dense", black and dashed). Non-positive
    eigenvalues (rounding noise of singular kernels) are left out. Returns the
    matplotlib Axes."""
    _check(frame, ("index", "eigenvalue", hue), hue=hue)
    import matplotlib.pyplot as plt

    new_figure = ax is None
    if new_figure:
        _, ax = plt.subplots(figsize=(5.0, 3.5))
    values = list(dict.fromkeys(frame[hue]))
    colors = _colors([v for v in values if not _is_dense(v)], hue)
    for v in values:
        g = frame[(frame[hue] == v) & (frame["eigenvalue"] > 0)].sort_values("index")
        dense = _is_dense(v)
        color = "black" if dense else colors[v]
        ax.plot(g["index"], g["eigenvalue"], color=color, ls="--" if dense else "-",
                lw=2 if color == "black" and not dense else 1.2, label=str(v))
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("NTK eigenvalue")
    ax.legend(fontsize="small")
    if new_figure:
        ax.figure.tight_layout()
    return ax


def _colors(values, hue: str) -> dict:
    """Light to dark (viridis) for an ordered hue (iteration, density); the palette otherwise, with NTK-SAP
    black as in the Figure 1 panel."""
    import matplotlib.pyplot as plt

    if hue in ("iteration", "density"):
        cmap = plt.get_cmap("viridis")
        ordered = sorted(values, reverse=hue == "density")
        return {v: cmap(i / max(1, len(ordered) - 1)) for i, v in enumerate(ordered)}
    return {v: "black" if _stands_out(v) else COLORS[i % len(COLORS)] for i, v in enumerate(values)}


def plot_spectrum_facets(frame: pd.DataFrame, col: str = "sparsity", hue: str = "iteration",
                         y: str = "eigenvalue", reference: pd.DataFrame | None = None, axes=None,
                         title: str | None = None, col_wrap: int = 4):
    """One panel per ``col`` value (e.g. each sparsity), eigenvalue index
    against ``y`` on a log axis, one line per ``hue`` value: ``y="eigenvalue"``
    for the spectra, ``y="relative"`` for lambda_i / lambda_i(dense)
    (:func:`ntksap.spectra.relative_spectra`; a dotted line marks 1).
    ``reference`` (index, eigenvalue), drawn dashed black in every panel, is
    the dense spectrum. Without ``axes``, a new figure of ``col_wrap`` panels
    a row. Returns the array of Axes."""
    _check(frame, ("index", y, col, hue), y=y, col=col, hue=hue)
    import matplotlib.pyplot as plt
    import numpy as np

    panels = list(dict.fromkeys(frame[col]))
    own_figure = axes is None
    if own_figure:
        ncols = min(len(panels), col_wrap)
        nrows = -(-len(panels) // ncols)
        _, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 0.6, 3.4 * nrows + 0.4), sharey=True,
                               squeeze=False)
        for ax in axes.ravel()[len(panels):]:
            ax.set_visible(False)  # no empty panel
    axes = np.asarray(axes).ravel()
    if len(axes) < len(panels):
        raise ValueError(f"axes has {len(axes)} panels; allowed: at least one per {col} value ({len(panels)})")
    colors = _colors(list(dict.fromkeys(frame[hue])), hue)
    for ax, value in zip(axes, panels):
        part = frame[frame[col] == value]
        for h, g in part.groupby(hue, sort=False):
            g = g[g[y] > 0].sort_values("index")
            ax.plot(g["index"], g[y], color=colors[h], lw=2 if colors[h] == "black" else 1.2,
                    label=_label(hue, h))
        if reference is not None:
            r = reference[reference["eigenvalue"] > 0].sort_values("index")
            ax.plot(r["index"], r["eigenvalue"], color="black", ls="--", lw=1, label="dense")
        if y == "relative":
            ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(_label(col, value))
        ax.set_xlabel("eigenvalue index (descending)")
    for ax in axes[:len(panels)]:
        if ax.get_subplotspec() is None or ax.get_subplotspec().is_first_col():
            ax.set_ylabel("NTK eigenvalue" if y == "eigenvalue" else "eigenvalue / dense eigenvalue")
    axes[len(panels) - 1].legend(fontsize="small", ncols=1 + (len(colors) > 6))
    if title:
        axes[0].figure.suptitle(title)
    if own_figure:
        axes[0].figure.tight_layout()
    return axes


def plot_distances(distances: pd.DataFrame, x: str = "label", hue: str | None = "sparsity", ax=None):
    """Mean |log10 lambda_i - log10 lambda_i(dense)| (``log_distance``, see
    :func:`ntksap.spectra.log_distance`) as bars, one group per ``x`` value
    (method) and one bar per ``hue`` value (sparsity; ``None``: one grey bar
    per method, NTK-SAP's black), in the frame's order. Lower is closer to the
    dense spectrum."""
    _check(distances, (x, "log_distance") + ((hue,) if hue else ()), x=x, hue=hue)
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(dict.fromkeys(distances[x]))
    hues = list(dict.fromkeys(distances[hue])) if hue else [None]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(groups) * len(hues) + 1.5), 3.8))
    width = 0.8 / len(hues)
    for i, h in enumerate(hues):
        part = distances if h is None else distances[distances[hue] == h]
        values = part.set_index(x)["log_distance"].reindex(groups).to_numpy()
        colors = ["black" if _stands_out(g) else COLORS[7] for g in groups] if h is None else COLORS[i % len(COLORS)]
        ax.bar(np.arange(len(groups)) + (i - (len(hues) - 1) / 2) * width, values, width, color=colors,
               label=None if h is None else _label(hue, h))
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel("mean |log10 λ - log10 λ(dense)|")
    if hue:
        ax.legend(fontsize="small")
    return ax


def plot_distances_with_table(summary: pd.DataFrame, columns=("log_distance", "trace", "condition"),
                              x: str = "label"):
    """The distance bars of :func:`plot_distances` (one per row of ``summary``,
    e.g. the spectrum stage's ``summary.csv`` without the dense row) beside a
    table of ``columns`` for the same rows, closest first. Returns the Figure."""
    _check(summary, (x, *columns), x=x)
    import matplotlib.pyplot as plt

    rows = summary.sort_values("log_distance")
    fig, (ax_table, ax_bars) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.42 * len(rows)),
                                            gridspec_kw={"width_ratios": [1.15, 1]})
    ax_table.axis("off")
    cells = [[str(r[x])] + [f"{r[c]:.4g}" for c in columns] for _, r in rows.iterrows()]
    table = ax_table.table(cellText=cells, colLabels=[x, *columns], loc="center", cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.35)
    plot_distances(rows, x=x, hue=None, ax=ax_bars)
    ax_bars.set_title("distance to the dense spectrum (lower = closer)")
    fig.tight_layout()
    return fig
