"""The look shared by the saved figures: the seaborn theme, saving as PNG and PDF, the paper's sparsity axis."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from ..layout import sparsity_label


def style() -> None:
    """The seaborn theme of the saved figures (plot and spectrum notebooks)."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig, path: str | os.PathLike, formats: Iterable[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (PNG at 150 dpi),
    without a creation date, so the same figure gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        p = path.with_suffix(f".{fmt}")
        tmp = p.with_name(f".{p.stem}.tmp.{fmt}")
        stamp = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
        fig.savefig(tmp, dpi=150, bbox_inches="tight", metadata=stamp)
        os.replace(tmp, p)
        written.append(p)
    return written


def sparsity_axis(ax, sparsities: Iterable[float]) -> None:
    """The paper's sparsity axis: positions log(1/density)/log(1/0.8) (evenly
    spaced for densities 0.8^k), ticks labelled in percent."""
    sparsities = sorted(set(float(s) for s in sparsities if s > 0))
    ax.set_xticks([sparsity_position(s) for s in sparsities])
    ax.set_xticklabels([sparsity_label(s) for s in sparsities], rotation=45)
    ax.set_xlabel("sparsity (%)")


def sparsity_position(sparsity):
    """x position of a sparsity on :func:`sparsity_axis` (k for density 0.8^k)."""
    import numpy as np

    return np.log(1.0 / (1.0 - np.asarray(sparsity, dtype=float))) / math.log(1 / 0.8)
