"""The prune stage: every run of one seed pruned at every sparsity of the experiment, from one original init.

Writes, per run, what training reads into ``masks/seed-<s>/<run>/`` and the record of the pruning (layer
densities, NTK snapshots, score histograms) into ``prune/seed-<s>/<run>/``: deterministic files only. The
seconds each sparsity took go to ``timings/prune/seed-<s>.csv``, which nothing downstream reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .. import layout
from ..experiment import load_dataset, new_model, probe_inputs, prune_kwargs
from ..files import atomic_write_text
from ..params import DENSE
from . import by_run

if TYPE_CHECKING:
    from ..params import Params


@dataclass
class PruneResult:
    """Frames the prune stage writes (also as CSV files)."""

    masks: pd.DataFrame    # sparsity, tag, path, kept, numel, density
    density: pd.DataFrame  # sparsity, name, shape, numel, kept, density (one row per layer, plus 'total')
    track: pd.DataFrame    # sparsity, iteration, density, trace, max, min, condition (NTK snapshots)
    track_spectra: pd.DataFrame  # sparsity, iteration, density, index, eigenvalue (spectrum mode only)
    scores: pd.DataFrame   # sparsity, left, right, pruned, kept: histogram of the last iteration's scores
    timings: pd.DataFrame  # sparsity, tag, seconds (the timings file, not in the prune folder)


def score_histogram(scores: dict, previous: dict | None, masks: dict, bins: int = 60) -> pd.DataFrame:
    """Histogram of the scores of the weights alive before the last iteration,
    split into kept and pruned by the final masks (log-spaced bins when all
    scores are >= 0)."""
    import torch

    alive = torch.cat([(previous[n] if previous is not None else torch.ones_like(masks[n])).reshape(-1) != 0
                       for n in masks])
    s = torch.cat([scores[n].reshape(-1).double() for n in masks])[alive]
    kept = torch.cat([masks[n].reshape(-1) for n in masks])[alive] != 0
    if (s >= 0).all() and (s > 0).any():
        positive = s > 0
        lo, hi = s[positive].min().log10().item(), s[positive].max().log10().item()
        edges = torch.logspace(lo, hi + 1e-9 if hi > lo else lo + 1, bins + 1, dtype=torch.float64)
        s = s.clamp(min=edges[0].item())  # zero scores fall in the first bin
    else:
        lo, hi = s.min().item(), s.max().item()
        edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(s, edges[1:-1])
    pruned = torch.bincount(idx[~kept], minlength=bins)
    kept_c = torch.bincount(idx[kept], minlength=bins)
    return pd.DataFrame({"left": edges[:-1].numpy(), "right": edges[1:].numpy(),
                         "pruned": pruned.numpy(), "kept": kept_c.numpy()})


def prune_run(cfg: Params, run: str, seed: int, out_dir: str | os.PathLike, device=None,
              timings: str | os.PathLike | None = None, stats_dir: str | os.PathLike | None = None) -> PruneResult:
    """Prune one run and seed at every sparsity of the experiment, from one
    original init, recording NTK snapshots while pruning (``prune.track``).

    Writes into ``out_dir``: ``init.pt`` (the network's weights before pruning),
    ``<tag>.pt`` (:meth:`Masks.save`) and ``masks.csv`` (written last: its
    presence marks a complete run); into ``stats_dir`` (default ``out_dir``):
    ``density.csv``, ``track.csv``, ``track_spectra.csv``, ``scores.csv``; and,
    when ``timings`` is given, the seconds each sparsity took there. Returns
    the same frames. Snapshots are taken before pruning (iteration 0), after
    iteration 1, every ``prune.track.every`` iterations and after the last.
    """
    from ..data import prune_batches, prune_loader
    from ..devices import resolve_device
    from ..files import atomic_torch_save
    from ..masks import Masks
    from ..pruning import prune
    from ..scores import METHODS

    out = Path(out_dir)
    stats = Path(stats_dir) if stats_dir is not None else out
    out.mkdir(parents=True, exist_ok=True)
    stats.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    bundle = load_dataset(cfg)
    method = cfg.runs[run].method
    model = new_model(cfg, bundle.num_classes, seed)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(init, out / "init.pt")
    model.to(device)  # the NTK snapshots run where the model is
    needs_data = (method in METHODS and METHODS[method].needs_data) or cfg.runs[run].inputs == "data"
    data = None
    if needs_data and cfg.prune_set(run) == "random":  # the authors' way: new order and crops every pass, on CPU
        data = prune_loader(bundle, per_class=cfg.prune.per_class, batch_size=cfg.prune.batch_size, seed=seed)
    elif needs_data:  # balanced: class-balanced, fixed, unaugmented
        data = prune_batches(bundle, per_class=cfg.prune.per_class, batch_size=cfg.prune.batch_size, seed=seed,
                             device="cpu")  # prune() moves one batch at a time to the scoring device
    track = cfg.prune.track
    probe = probe_inputs(bundle, track.inputs, seed) if track.mode != "none" else None
    rows, times, dens, tracks, spectra, hists = [], [], [], [], [], []
    final = cfg.runs[run].iterations or (METHODS[method].iterations if method in METHODS else 0)
    for sparsity in cfg.pruned_sparsities(run):
        model.load_state_dict(init)
        tag = layout.sparsity_tag(sparsity)
        start = time.perf_counter()
        recorder = None
        if probe is not None:
            from .. import ntk

            recorder = ntk.SpectrumRecorder(model, probe, every=track.every, mode=track.mode)
            recorder.record(0, None)  # the dense network
        state = {"previous": None, "last": None}

        def callback(iteration, masks, scores, state=state, recorder=recorder):
            state["previous"], state["last"] = state["last"], (masks, scores)
            if recorder is not None and (iteration % track.every == 0 or iteration in (1, final)):
                recorder.record(iteration, masks)

        if method == DENSE:
            masks = Masks.ones_like(model)
        else:
            masks = prune(model, method, sparsity, callback=callback,
                          **prune_kwargs(cfg, run, seed, bundle.input_shape, data, device))
        times.append({"sparsity": sparsity, "tag": tag, "seconds": time.perf_counter() - start})
        masks.save(out / layout.mask_file(tag))
        rows.append({"sparsity": sparsity, "tag": tag, "path": layout.mask_file(tag), "kept": masks.kept,
                     "numel": masks.numel, "density": masks.density})
        rep = masks.report(model, tuple(bundle.input_shape))
        rep.insert(0, "sparsity", sparsity)
        rep["shape"] = rep["shape"].map(lambda s: "x".join(map(str, s)) if s is not None else "")
        dens.append(rep)
        if recorder is not None:
            tracks.append(recorder.summary().assign(sparsity=sparsity))
            if track.mode == "spectrum":
                spectra.append(recorder.frame().assign(sparsity=sparsity))
        if state["last"] is not None:
            prev = state["previous"][0] if state["previous"] is not None else None
            hists.append(score_histogram(state["last"][1], prev, masks).assign(sparsity=sparsity))

    def frame(parts):
        if not parts:
            return pd.DataFrame()
        f = pd.concat(parts, ignore_index=True)
        return f[["sparsity", *[c for c in f.columns if c != "sparsity"]]]

    result = PruneResult(pd.DataFrame(rows), pd.concat(dens, ignore_index=True), frame(tracks), frame(spectra),
                         frame(hists), pd.DataFrame(times))
    if timings is not None:
        atomic_write_text(result.timings.to_csv(index=False), timings)
    for name in ("density", "track", "track_spectra", "scores"):
        atomic_write_text(getattr(result, name).to_csv(index=False), stats / f"{name}.csv")
    atomic_write_text(result.masks.to_csv(index=False), out / "masks.csv")  # last: a complete run
    return result


def combine(results: dict[str, PruneResult], name: str) -> pd.DataFrame:
    """One frame of :class:`PruneResult` field ``name`` (``masks``, ``density``,
    ``track``, ...) for every run of ``results`` (run -> result, as
    :func:`prune_seed` returns), with a ``run`` column first."""
    return by_run({run: getattr(r, name) for run, r in results.items()})


def prune_seed(cfg: Params, seed: int, masks_dir: str | os.PathLike | None = None,
               out_dir: str | os.PathLike | None = None, device=None,
               timings: str | os.PathLike | None = None, workers: int | None = None) -> dict[str, PruneResult]:
    """The prune stage of one seed: :func:`prune_run` for every run of the
    experiment, each from the seed's original init.

    Run ``r`` writes its masks into ``masks_dir/<r>`` (default
    :func:`ntksap.layout.stage_dir` ``("masks", cfg, seed)``) and its record into
    ``out_dir/<r>`` (default ``stage_dir("prune", cfg, seed)``); the seconds of
    every run and sparsity go to ``timings`` (default
    :func:`ntksap.layout.timings_path`; columns run, sparsity, tag, seconds).
    The runs go to ``workers`` processes (default: one per CPU core a run
    leaves idle, :func:`ntksap.parallel.default_workers`; the same results bit
    for bit). Returns run -> :class:`PruneResult`, in ``params.yaml`` order."""
    from ..parallel import resolve_workers, run_all

    workers = resolve_workers(workers, device, len(cfg.runs))
    masks_root = Path(masks_dir) if masks_dir is not None else layout.stage_dir("masks", cfg, seed)
    out_root = Path(out_dir) if out_dir is not None else layout.stage_dir("prune", cfg, seed)
    timings = Path(timings) if timings is not None else layout.timings_path("prune", cfg, seed)
    runs = list(cfg.runs)
    done = run_all(prune_run, [((cfg, run, seed, masks_root / run), {"device": device, "stats_dir": out_root / run})
                               for run in runs], workers)
    results = dict(zip(runs, done))
    atomic_write_text(combine(results, "timings").to_csv(index=False), timings)
    return results
