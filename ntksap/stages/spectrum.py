"""The spectrum stage (Figure 2): NTK eigenvalues of the dense network and of each run's pruned network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .. import layout
from ..experiment import load_dataset, new_model, probe_inputs
from ..files import atomic_write_text
from ..params import DENSE

if TYPE_CHECKING:
    from ..params import Params

DENSE_LABEL = "Dense (unpruned)"


def spectrum_run(cfg: Params, out_dir: str | os.PathLike, device=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eigenvalues of the fixed-weight NTK on ``spectrum.num_inputs`` test
    inputs: the dense network (the init of ``spectrum.seed``) and each run's
    network at ``spectrum.sparsity`` (its masks on that init), read from the
    prune stage's folders.

    Writes ``eigenvalues.csv`` (label, run, index, eigenvalue; sorted
    descending) and ``summary.csv`` (run, label, trace, max, min, condition,
    log_distance = mean |log10 lambda_i - log10 lambda_i(dense)|); returns both.
    """
    import numpy as np
    import torch

    from .. import ntk
    from ..devices import resolve_device
    from ..masks import Masks
    from ..spectra import log_distance

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_dataset(cfg)
    s = cfg.spectrum
    inputs = probe_inputs(bundle, s.num_inputs, s.seed)
    tag = layout.sparsity_tag(s.sparsity)
    any_run = next(iter(cfg.runs))
    init = torch.load(layout.masks_dir(cfg, any_run, s.seed) / "init.pt", map_location="cpu", weights_only=True)
    model = new_model(cfg, bundle.num_classes, s.seed)
    model.load_state_dict(init)
    model.to(resolve_device(device))
    spectra, summary = {}, []
    entries = [("dense", DENSE_LABEL, None)]
    entries += [(run, cfg.label(run), layout.masks_dir(cfg, run, s.seed) / layout.mask_file(tag))
                for run in cfg.runs if cfg.runs[run].method != DENSE]
    for run, label, path in entries:
        masks = Masks.load(path) if path is not None else None
        spec = ntk.ntk_spectrum(model, inputs, masks)
        spectra[label] = np.sort(spec["eigenvalues"].double().cpu().numpy())[::-1].copy()  # descending
        summary.append({"run": run, "label": label, "trace": float(spec["trace"]), "max": float(spec["max"]),
                        "min": float(spec["min"]), "condition": float(spec["condition"])})
    for row in summary:
        row["log_distance"] = log_distance(spectra[row["label"]], spectra[DENSE_LABEL])
    frame = ntk.spectra_frame(spectra)
    summ = pd.DataFrame(summary)
    atomic_write_text(frame.to_csv(index=False), out / "eigenvalues.csv")
    atomic_write_text(summ.to_csv(index=False), out / "summary.csv")
    return frame, summ
