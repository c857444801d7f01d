"""What every pipeline notebook does first: ``cd`` to the repository root, the plot style, the CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

from .figures.palette import COLORS
from .layout import chdir_root


def setup() -> Path:
    """What every notebook does first: ``cd`` to the repository root, a
    seaborn-like matplotlib style (without importing seaborn, which costs
    seconds per notebook), and on the CPU one torch thread per process unless
    ``OMP_NUM_THREADS`` says otherwise (the quick experiment's tensors are
    small; with a second thread a busy machine made them 20-70x slower in our
    measurements, as waiting OpenMP threads spin for a core)."""
    import matplotlib.pyplot as plt
    import torch

    root = chdir_root()
    plt.style.use("seaborn-v0_8-whitegrid")
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=COLORS)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return root
