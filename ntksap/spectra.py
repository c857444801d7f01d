"""Comparing NTK spectra with a reference spectrum (the dense network's): each eigenvalue relative to the
reference's of the same rank, lambda_i / lambda_i(ref), and the mean log10 distance (Figure 2's reading).

Spectra are long frames with the columns ``index`` (rank, 0 = largest) and ``eigenvalue``, plus keys that
name each spectrum (e.g. ``sparsity``, ``iteration``, ``run``); see ``ntksap.ntk.SpectrumRecorder.frame``
and ``ntksap.ntk.spectra_frame``. Eigenvalues are clipped at :data:`FLOOR` before a ratio or a logarithm:
a singular kernel's smallest eigenvalues are rounding noise around zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

FLOOR = 1e-30
"""Eigenvalues below this count as this (rounding noise of singular kernels)."""


def log_distance(eigenvalues, reference) -> float:
    """Mean over ranks i of |log10 lambda_i - log10 lambda_i(ref)|, both sorted
    descending; 0 for the reference itself, 1 for a spectrum ten times smaller
    everywhere. Both must hold the same number of eigenvalues (1-D arrays)."""
    a = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())[::-1]
    b = np.sort(np.asarray(reference, dtype=np.float64).ravel())[::-1]
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"eigenvalues has {a.size} values and reference {b.size}; allowed: the same number, "
                         "at least 1 (spectra of the same probe inputs)")
    return float(np.mean(np.abs(np.log10(np.clip(a, FLOOR, None)) - np.log10(np.clip(b, FLOOR, None)))))


def check_frame(name: str, frame, needed: Sequence[str], **named) -> None:
    """``frame`` is a DataFrame holding the columns ``needed``, else a ValueError
    naming ``name``, the missing columns and ``named`` (e.g. ``hue=...``), the
    arguments that asked for them."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        by = [f"{k}={v!r}" for k, v in named.items() if v in missing]
        raise ValueError(f"{name} lacks column(s) {missing}; it has {list(frame.columns)}"
                         + (f" ({', '.join(by)} must name one of them)" if by else ""))


def relative_spectra(frame: pd.DataFrame, reference: pd.DataFrame, on: Sequence[str] = ()) -> pd.DataFrame:
    """``frame`` with two more columns: ``reference`` (the eigenvalue of the
    same rank in the reference spectrum with the same ``on`` keys) and
    ``relative`` = eigenvalue / reference (1 = as the reference). ``reference``
    holds one spectrum per value of the ``on`` keys (``on=()``: one spectrum)."""
    on = list(on)
    check_frame("frame", frame, [*on, "index", "eigenvalue"])
    check_frame("reference", reference, [*on, "index", "eigenvalue"])
    ref = reference[[*on, "index", "eigenvalue"]].rename(columns={"eigenvalue": "reference"})
    if ref.duplicated([*on, "index"]).any():
        raise ValueError(f"reference holds more than one spectrum per {on or 'frame'}; allowed: one (pass the "
                         "keys that tell its spectra apart as `on`)")
    out = frame.merge(ref, on=[*on, "index"], how="left", validate="many_to_one")
    if out["reference"].isna().any():
        raise ValueError("frame has ranks or keys the reference lacks; allowed: spectra of the same probe inputs "
                         f"as the reference, for every value of {on}")
    out["relative"] = np.clip(out["eigenvalue"], FLOOR, None) / np.clip(out["reference"], FLOOR, None)
    return out


def distances(frame: pd.DataFrame, reference: pd.DataFrame, by: Sequence[str],
              on: Sequence[str] = ()) -> pd.DataFrame:
    """One row per spectrum of ``frame`` (the groups of the ``by`` keys, which
    include ``on``): ``by`` and ``log_distance`` (:func:`log_distance`) to the
    reference spectrum with the same ``on`` keys."""
    by, on = list(by), list(on)
    if not set(on) <= set(by):
        raise ValueError(f"on={on} must be among by={by} (each spectrum is compared with the reference of its keys)")
    rel = relative_spectra(frame, reference, on)
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))),
             "log_distance": log_distance(g["eigenvalue"], g["reference"])}
            for key, g in rel.groupby(by, sort=False)]
    return pd.DataFrame(rows, columns=[*by, "log_distance"])


def final_snapshots(track_spectra: pd.DataFrame, by: Sequence[str] = ("sparsity",)) -> pd.DataFrame:
    """The last recorded iteration of each pruning (per ``by`` group) in a
    prune stage's ``track_spectra.csv`` frame: the spectrum of the final masks."""
    by = list(by)
    check_frame("track_spectra", track_spectra, [*by, "iteration", "index", "eigenvalue"])
    last = track_spectra.groupby(by, sort=False)["iteration"].transform("max")
    return track_spectra[track_spectra["iteration"] == last]
