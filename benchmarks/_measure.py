"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measure(device: torch.device, result: dict):
    """Fill ``result`` with wall ``seconds``, process ``cpu_seconds`` (all
    threads; steadier than wall time on a busy machine) and ``peak_mb``: the
    peak resident memory above the level at entry (CPU, sampled every 2 ms;
    measure each variant in a fresh process, since freed memory stays with the
    process) or the peak CUDA allocation (GPU)."""
    stop = threading.Event()
    base = _rss_bytes()
    peak = [base]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0
        stop.set()
        thread.join()
        if device.type == "cuda":
            result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
        else:
            result["peak_mb"] = (peak[0] - base) / 2**20


def run_isolated(script: str, variant: str, extra_args: list[str]) -> dict:
    """Run ``script --only variant`` in a fresh Python process and return the
    JSON dict it prints on its last line."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, script, "--only", variant, *extra_args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ALLOCATORS = ("default", "kept")


def add_allocator_option(ap, who: str) -> None:
    """``--allocator default|kept`` on the argparse parser ``ap``; ``who``: what it applies to."""
    ap.add_argument("--allocator", choices=ALLOCATORS, default="default",
                    help=f"glibc malloc for {who}: its defaults, or freed memory kept "
                         "(ntksap.allocator.keep_freed_memory, as the pipeline's processes run)")


def use_allocator(choice: str) -> None:
    """Apply ``--allocator``'s ``choice`` to this process: ``kept`` calls
    :func:`ntksap.allocator.keep_freed_memory`, and exits where it cannot take (not glibc)."""
    from ntksap.allocator import keep_freed_memory

    if choice == "kept" and not keep_freed_memory():
        raise SystemExit("--allocator=kept: keep_freed_memory() did not take here (the C library is not glibc)")
