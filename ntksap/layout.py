"""Where every result of the pipeline lives: the paths of ``results/<experiment>/`` and the sparsity tags.

``dvc.yaml`` writes the same paths (``tests/test_pipeline.py`` checks that they agree). The prune and
train stages run once per seed, over every run; inside a seed's folder each run has its own::

    params.ok                               the check stage passed (constant text)
    masks/seed-<s>/<run>/                   init.pt (the original init), <tag>.pt (the masks), masks.csv: what
                                            train and spectrum read
    prune/seed-<s>/<run>/                   density.csv, track.csv, track_spectra.csv, scores.csv: what the
                                            plot reads of the pruning (deterministic files only)
    train/seed-<s>/<run>/                   <tag>/ (model.pt, history.csv, metrics.json), results.csv, history.csv
    spectrum/                               eigenvalues.csv, summary.csv, ntk_spectrum.png/pdf
    plots/                                  accuracy.csv, table.md/csv, figures (png, pdf)
    series/accuracy/<run>.csv               `dvc plots` data (committed to git)
    series/curves/<run>.csv
    metrics.json                            `dvc metrics show` (committed to git)
    notebooks/prune/seed-<s>.ipynb          the executed notebooks; nothing downstream reads them
    notebooks/train/seed-<s>.ipynb
    notebooks/spectrum.ipynb, notebooks/plot.ipynb
    timings/prune/seed-<s>.csv              run, sparsity, tag, seconds: everything that measures time, which
    timings/train/seed-<s>.csv              nothing downstream reads (run, sparsity, epoch, epoch_time)
    checkpoints/<run>-<seed>/<tag>-<key>/   where training runs and resumes; not a DVC output, safe to delete

The prepared datasets (the prepare stage's output) are ``data/prepared/<dataset>.pt``.
``<tag>`` names a sparsity: 0.981986 -> ``sp98_20`` (percent, two decimals).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import check_choice

if TYPE_CHECKING:
    from .params import Params

RESULTS = "results"
PREPARED = Path("data") / "prepared"
SEED_STAGES = ("prune", "train")              # one stage per seed, covering every run
NOTEBOOK_STAGES = (*SEED_STAGES, "spectrum", "plot")


# -- the repository -------------------------------------------------------------------------------
def nearest(name: str, start: str | os.PathLike | None = None) -> Path | None:
    """The file ``name`` in ``start`` (default: the working directory) or the
    nearest folder above it, or None."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / name).is_file():
            return folder / name
    return None


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root: the nearest folder at or above ``start`` (default:
    the working directory) holding ``dvc.yaml``."""
    here = Path(start or os.getcwd()).resolve()
    found = nearest("dvc.yaml", here)
    if found is not None:
        return found.parent
    raise FileNotFoundError(f"no dvc.yaml at or above '{here}': run from inside the ntksap repository")


def chdir_root() -> Path:
    """``cd`` to the repository root (a notebook opened from any folder then
    finds params.yaml and results/ by their pipeline paths)."""
    root = find_root()
    os.chdir(root)
    return root


# -- sparsity tags ----------------------------------------------------------------------------------
def sparsity_tag(sparsity: float) -> str:
    """File-name tag of a sparsity in percent: 0.981986 -> ``sp98_20``."""
    return "sp" + f"{100 * sparsity:05.2f}".replace(".", "_")


def sparsity_label(sparsity: float) -> str:
    """Axis label of a sparsity in percent, as the paper writes it: ``98.20``."""
    return f"{100 * sparsity:.2f}"


def mask_file(tag: str) -> str:
    """The masks of sparsity ``tag`` inside a run's masks folder: ``<tag>.pt``
    (the ``path`` column of ``masks.csv``)."""
    return f"{tag}.pt"


# -- results/<experiment>/ --------------------------------------------------------------------------
def results_dir(cfg: Params) -> Path:
    """``results/<experiment>``: everything the experiment's stages write."""
    return Path(RESULTS) / cfg.experiment


def run_name(run: str, seed: int) -> str:
    """The name of one run and seed in the layout: ``<run>-<seed>``."""
    return f"{run}-{seed}"


def seed_name(seed: int) -> str:
    """The name of one seed's stage and folders: ``seed-<seed>``."""
    return f"seed-{seed}"


def params_ok_path(cfg: Params) -> Path:
    """The check stage's stamp: ``params.ok``."""
    return results_dir(cfg) / "params.ok"


def stage_dir(what: str, cfg: Params, seed: int) -> Path:
    """One seed's output folder of a prune or train stage, holding a folder per run:
    ``masks/seed-<s>``, ``prune/seed-<s>`` (both the prune stage's) or ``train/seed-<s>``."""
    check_choice("what", what, ("masks", *SEED_STAGES))
    return results_dir(cfg) / what / seed_name(seed)


def masks_dir(cfg: Params, run: str, seed: int) -> Path:
    """What the prune stage keeps of one run and seed for training: ``masks/seed-<s>/<run>``
    (``init.pt``, ``<tag>.pt``, ``masks.csv``)."""
    return stage_dir("masks", cfg, seed) / run


def prune_dir(cfg: Params, run: str, seed: int) -> Path:
    """The prune stage's record of one run and seed: ``prune/seed-<s>/<run>``
    (``density.csv``, ``track.csv``, ``track_spectra.csv``, ``scores.csv``)."""
    return stage_dir("prune", cfg, seed) / run


def train_dir(cfg: Params, run: str, seed: int) -> Path:
    """The train stage's output for one run and seed: ``train/seed-<s>/<run>``."""
    return stage_dir("train", cfg, seed) / run


def spectrum_dir(cfg: Params) -> Path:
    """The spectrum stage's output: ``spectrum``."""
    return results_dir(cfg) / "spectrum"


def plots_dir(cfg: Params) -> Path:
    """The plot stage's figures and tables: ``plots``."""
    return results_dir(cfg) / "plots"


def series_dir(cfg: Params) -> Path:
    """The plot stage's ``dvc plots`` series: ``series`` (``accuracy/<run>.csv``, ``curves/<run>.csv``)."""
    return results_dir(cfg) / "series"


def metrics_path(cfg: Params) -> Path:
    """The plot stage's ``dvc metrics``: ``metrics.json``."""
    return results_dir(cfg) / "metrics.json"


def checkpoints_dir(cfg: Params, run: str, seed: int) -> Path:
    """Where the train stage keeps its resumable runs, outside DVC's outputs
    (DVC deletes a stage's outputs before running it again): ``checkpoints/<run>-<seed>``."""
    return results_dir(cfg) / "checkpoints" / run_name(run, seed)


def _seed_stage(function: str, stage: str, seed: int | None) -> str:
    """``seed-<s>`` of a per-seed stage; refuses a seed for the others."""
    if stage in SEED_STAGES:
        if seed is None:
            raise ValueError(f"{function}({stage!r}, ...) needs a seed (one notebook per seed)")
        return seed_name(seed)
    if seed is not None:
        raise ValueError(f"{function}({stage!r}, ...) takes no seed: the {stage} stage covers every seed")
    return stage


def notebook_path(stage: str, cfg: Params, seed: int | None = None) -> Path:
    """The executed notebook of a stage: ``notebooks/prune/seed-<s>.ipynb``,
    ``notebooks/train/seed-<s>.ipynb``, ``notebooks/spectrum.ipynb``, ``notebooks/plot.ipynb``."""
    check_choice("stage", stage, NOTEBOOK_STAGES)
    name = _seed_stage("notebook_path", stage, seed)
    folder = results_dir(cfg) / "notebooks"
    return (folder / stage if stage in SEED_STAGES else folder) / f"{name}.ipynb"


def timings_path(stage: str, cfg: Params, seed: int) -> Path:
    """What a prune or train stage measured in seconds: ``timings/<stage>/seed-<s>.csv``."""
    check_choice("stage", stage, SEED_STAGES)
    return results_dir(cfg) / "timings" / stage / f"{_seed_stage('timings_path', stage, seed)}.csv"


def prepared_path(dataset: str) -> Path:
    """The prepare stage's decoded dataset: ``data/prepared/<dataset>.pt``."""
    return PREPARED / f"{dataset}.pt"
