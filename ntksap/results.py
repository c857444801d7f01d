"""An experiment's results collected: frames of every run and seed, summaries, Table 1, metrics, plot series.

What the plot stage reads and writes: ``train/seed-<s>/<run>/{results,history}.csv`` and the prune
stage's CSV files (``prune/seed-<s>/<run>/``) in, the summary, Table 1 (``to_markdown``), ``metrics.json`` (:func:`write_metrics`) and
the ``dvc plots`` series (:func:`write_dvc_series`) out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .checks import check_choice
from .files import atomic_write_text
from .layout import masks_dir, prune_dir, sparsity_label, sparsity_tag, train_dir
from .params import DENSE

if TYPE_CHECKING:
    from .params import Params

ACCURACY = {"final": ("test_top1", "final test top-1 (%)"),
            "best": ("best_test_top1", "best test top-1 over epochs (%)")}
"""``plot.accuracy`` -> (its column in :func:`collect_results`, the words that
name it in every figure and table). ``final``: after the last epoch (what we
report by default); ``best``: the highest over epochs, what the authors'
training loop prints (PAPER.md section 3, "Reported accuracy")."""
BEST_COLUMNS = ("best_test_top1", "best_test_top5", "best_epoch")


def accuracy_caption(accuracy: str = "final") -> str:
    """How figures and tables name an accuracy: ``final test top-1 (%)`` or
    ``best test top-1 over epochs (%)`` (another metric: its column name)."""
    return ACCURACY[accuracy][1] if accuracy in ACCURACY else accuracy


def accuracy_of(summary: pd.DataFrame) -> str:
    """The accuracy a summary holds (its ``accuracy`` column; ``final`` without one)."""
    if "accuracy" in summary and len(summary):
        return str(summary["accuracy"].iloc[0])
    return "final"


def _runs_seeds(cfg: Params) -> Iterable[tuple[str, int]]:
    for run in cfg.runs:
        for seed in cfg.seeds:
            yield run, seed


# -- collecting ------------------------------------------------------------------------------------
def _fill_best(results: pd.DataFrame, history_csv: Path) -> pd.DataFrame:
    """Fill the ``best_*`` columns where ``results.csv`` lacks them (a run
    trained before they were recorded) from its ``history.csv``: the first
    epoch with the highest test top-1; without epochs, the final values."""
    if all(c in results and results[c].notna().all() for c in BEST_COLUMNS):
        return results
    results = results.copy()
    try:
        hist = pd.read_csv(history_csv)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        hist = pd.DataFrame(columns=["sparsity", "epoch", "test_top1", "test_top5"])
    for c in BEST_COLUMNS:
        if c not in results:
            results[c] = float("nan")
    for i, row in results.iterrows():
        h = hist[(hist["sparsity"] - row["sparsity"]).abs() < 1e-12]
        if h.empty:
            best = {"best_test_top1": row["test_top1"], "best_test_top5": row.get("test_top5"), "best_epoch": 0}
        else:
            b = h.loc[h["test_top1"].astype(float).idxmax()]
            best = {"best_test_top1": b["test_top1"], "best_test_top5": b.get("test_top5"),
                    "best_epoch": int(b["epoch"])}
        for c in BEST_COLUMNS:
            if pd.isna(results.at[i, c]):
                results.at[i, c] = best[c]
    if results["best_epoch"].notna().all():
        results["best_epoch"] = results["best_epoch"].astype(int)
    return results


def collect_results(cfg: Params) -> pd.DataFrame:
    """Metrics of every (run, seed, sparsity): columns run, label, method,
    seed, sparsity, test_top1, test_top5, ... (after the last epoch),
    best_test_top1, best_test_top5, best_epoch (the epoch with the highest
    test top-1) from ``train/seed-<s>/<run>/results.csv``; ``best_*`` missing
    there are filled in from that folder's ``history.csv``."""
    frames = []
    for run, seed in _runs_seeds(cfg):
        f = pd.read_csv(train_dir(cfg, run, seed) / "results.csv")
        f = _fill_best(f, train_dir(cfg, run, seed) / "history.csv")
        f.insert(0, "seed", seed)
        f.insert(0, "method", cfg.runs[run].method)
        f.insert(0, "label", cfg.label(run))
        f.insert(0, "run", run)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def collect_histories(cfg: Params) -> pd.DataFrame:
    """Per-epoch history of every (run, seed, sparsity)."""
    frames = []
    for run, seed in _runs_seeds(cfg):
        f = pd.read_csv(train_dir(cfg, run, seed) / "history.csv")
        f.insert(0, "seed", seed)
        f.insert(0, "label", cfg.label(run))
        f.insert(0, "run", run)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def collect_prune_frames(cfg: Params, name: str) -> pd.DataFrame:
    """One of the prune stage's CSV files (``density``, ``track``,
    ``track_spectra``, ``scores`` in ``prune/``; ``masks`` in ``masks/``) for
    every run and seed, with run, label and seed columns."""
    frames = []
    for run, seed in _runs_seeds(cfg):
        path = (masks_dir if name == "masks" else prune_dir)(cfg, run, seed) / f"{name}.csv"
        if path.stat().st_size == 0:
            continue
        try:
            f = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        f.insert(0, "seed", seed)
        f.insert(0, "label", cfg.label(run))
        f.insert(0, "run", run)
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# -- summaries and tables ---------------------------------------------------------------------------
def summarise(results: pd.DataFrame, accuracy: str = "final", metric: str | None = None) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one seed) and seed count per
    run and sparsity (columns mean, std, seeds) of the accuracy ``plot.accuracy``
    names (``final``: test_top1, ``best``: best_test_top1; :data:`ACCURACY`),
    or of another column ``metric``; column ``accuracy`` says which, so tables
    and figures can name it. Columns ``final``, ``final_std``, ``best``,
    ``best_std`` hold both accuracies (where ``results`` has them), whichever
    is chosen."""
    check_choice("plot.accuracy", accuracy, ACCURACY)
    column = metric or ACCURACY[accuracy][0]
    spec = {"mean": (column, "mean"), "std": (column, "std"), "seeds": (column, "count")}
    for name, (col, _) in ACCURACY.items():
        if col in results:
            spec[name], spec[f"{name}_std"] = (col, "mean"), (col, "std")
    out = results.groupby(["run", "label", "method", "sparsity"], sort=False).agg(**spec).reset_index()
    for col in [c for c in out.columns if c == "std" or c.endswith("_std")]:
        out[col] = out[col].fillna(0.0)
    out["accuracy"] = metric or accuracy
    return out


def accuracy_table(summary: pd.DataFrame, sparsities: Iterable[float] | None = None) -> pd.DataFrame:
    """Table 1 layout: one row per run, one column per sparsity (percent),
    cells ``mean ± std``; a dense run fills every column with its one value.
    The header's first cell names the accuracy shown (the summary's
    ``accuracy``): ``method \\ sparsity (%): final test top-1 (%)``."""
    cols = sorted({float(s) for s in (sparsities if sparsities is not None else summary["sparsity"]) if s > 0})
    table = {}
    for (run, label), g in summary.groupby(["run", "label"], sort=False):
        row = {}
        for s in cols:
            hit = g[(g["sparsity"] - s).abs() < 1e-9]
            if hit.empty and (g["method"] == DENSE).all():
                hit = g
            if hit.empty:
                row[sparsity_label(s)] = ""
                continue
            m, sd, n = hit.iloc[0][["mean", "std", "seeds"]]
            row[sparsity_label(s)] = f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f}"
        table[label] = row
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index.name = f"method \\ sparsity (%): {accuracy_caption(accuracy_of(summary))}"
    return frame


def to_markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (index as the first column)."""
    cols = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * len(frame.columns)) + "|"]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


# -- what DVC shows ------------------------------------------------------------------------------------
def write_dvc_series(summary: pd.DataFrame, histories: pd.DataFrame, out_dir: str | os.PathLike) -> None:
    """Small CSV files for ``dvc plots`` in ``out_dir`` (the pipeline's:
    :func:`ntksap.layout.series_dir`): ``accuracy/<run>.csv`` (sparsity,
    test_top1, std, accuracy: the summary's accuracy, ``final`` or ``best``,
    under the column name dvc.yaml plots, and which one it is) and
    ``curves/<run>.csv`` (epoch, test_top1 at the highest sparsity, mean over
    seeds; a run trained for 0 epochs has the one point of its evaluation at
    init, epoch 0). Both folders get one file per run of the summary."""
    out = Path(out_dir)
    trained = set(histories["run"]) if "run" in histories else set()
    for run, g in summary.groupby("run", sort=False):
        f = g[["sparsity", "mean", "std"]].rename(columns={"mean": "test_top1"}).assign(accuracy=accuracy_of(g))
        atomic_write_text(f.to_csv(index=False), out / "accuracy" / f"{run}.csv")
        if run in trained:
            h = histories[histories["run"] == run]
            h = h[(h["sparsity"] - h["sparsity"].max()).abs() < 1e-12]
            c = h.groupby("epoch")["test_top1"].mean().reset_index()
        else:  # train.epochs = 0: the evaluation at init
            c = pd.DataFrame({"epoch": [0], "test_top1": [float(g.loc[g["sparsity"].idxmax(), "mean"])]})
        atomic_write_text(c.to_csv(index=False), out / "curves" / f"{run}.csv")


def write_metrics(summary: pd.DataFrame, path: str | os.PathLike) -> dict:
    """``metrics.json`` (the pipeline's: :func:`ntksap.layout.metrics_path`)
    for ``dvc metrics show`` / ``dvc exp show``: both accuracies, whichever
    the figures show, as ``{"final": {run: {tag: mean test_top1}}, "best":
    {run: {tag: mean best_test_top1}}}`` (DVC's columns ``final.<run>.<tag>``,
    ``best.<run>.<tag>``); a summary holding one of them (no ``final`` /
    ``best`` columns) gives that one only."""
    metrics: dict = {}
    for name in ACCURACY:
        column = name if name in summary else "mean" if accuracy_of(summary) == name else None
        if column is None:
            continue
        for row in summary.itertuples():
            metrics.setdefault(name, {}).setdefault(row.run, {})[sparsity_tag(row.sparsity)] = \
                round(float(getattr(row, column)), 4)
    atomic_write_text(json.dumps(metrics, indent=1) + "\n", path)
    return metrics
