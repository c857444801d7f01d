"""What every pipeline notebook does first: ``cd`` to the repository root, the plot style, the CPU threads and allocator."""

from __future__ import annotations

import os
from pathlib import Path

from .figures.palette import COLORS
from .layout import chdir_root


ONE_THREAD_MODELS = ("digits_cnn",)
"""Models whose pipeline stages run on one CPU thread: their tensors are so
small (8x8 digits, batch 64) that a second thread only waits; with one, a busy
machine made the quick experiment 20-70x slower in our measurements, as
waiting OpenMP threads spin for a core. The paper's models use every core:
ResNet-20 trains 1.44x faster on 2 threads than on 1 (180 s against 259 s an
epoch on the 2-core development CPU, ``python benchmarks/epoch_time.py
--variants masked --threads N``). The prune and train stages put the cores
that one thread leaves idle to work with worker processes, one run each
(:mod:`ntksap.parallel`)."""


def setup() -> Path:
    """What every notebook does first: ``cd`` to the repository root, a
    seaborn-like matplotlib style (without importing seaborn, which costs
    seconds per notebook) and freed memory kept for reuse
    (:func:`ntksap.allocator.keep_freed_memory`). Returns the root."""
    import matplotlib.pyplot as plt

    from .allocator import keep_freed_memory

    keep_freed_memory()
    root = chdir_root()
    plt.style.use("seaborn-v0_8-whitegrid")
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=COLORS)
    return root


def set_cpu_threads(model: str) -> int:
    """What every notebook does once it knows the experiment: on a CPU, one
    torch thread for the models of :data:`ONE_THREAD_MODELS`, torch's default
    (one per core) for the others, unless ``OMP_NUM_THREADS`` says otherwise.
    Returns the threads torch now uses. Only the speed depends on it (and float
    rounding, as on any other machine)."""
    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ and model in ONE_THREAD_MODELS:
        torch.set_num_threads(1)
    return torch.get_num_threads()
