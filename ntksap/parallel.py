"""The independent runs of one stage in worker processes, one per CPU core the runs leave idle.

A prune or train stage covers every run of one seed, and the runs do not depend on one another:
each starts from the seed's init and its own seeded random streams. Where a run computes on fewer
torch threads than the machine has cores (the digits net of ``quick`` runs on one thread:
``ntksap.notebook.set_cpu_threads``), the other cores would idle, so the stage hands its runs to
that many processes instead (the caller and fresh ones), each with the caller's thread count. Every run computes exactly
what it computes in the caller (the same ops on the same thread count): the results are the same
bit for bit, only sooner (``tests/test_parallel.py``). On CUDA, and where one run already uses every
core, the runs stay in the caller, one after another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .checks import not_allowed


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity; the core count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(device, jobs: int) -> int:
    """How many processes run ``jobs`` independent runs on ``device`` (anything
    :func:`ntksap.devices.resolve_device` takes): on a CPU, the cores over the torch threads one run
    uses (:func:`cpu_cores` // ``torch.get_num_threads()``), at most ``jobs``; 1 on any other device
    (one GPU is shared by one process) or for one job."""
    import torch

    from .devices import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if device.type != "cpu" or jobs < 2:
        return 1
    return max(1, min(jobs, cpu_cores() // max(1, torch.get_num_threads())))


def check_workers(workers) -> None:
    """``workers`` is None (automatic) or an integer >= 1, else a ValueError naming it."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise not_allowed("workers", workers, "None (one per idle CPU core) or an integer >= 1")


def resolve_workers(workers, device, jobs: int) -> int:
    """``workers`` as a number for ``jobs`` runs on ``device``: itself when given (checked by
    :func:`check_workers`, before any work), else :func:`default_workers`."""
    check_workers(workers)
    return workers if workers is not None else default_workers(device, jobs)


def _init_worker(threads: int, keep_freed: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    if keep_freed:
        from .allocator import keep_freed_memory

        keep_freed_memory()


def run_all(fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]], workers: int) -> list:
    """``[fn(*args, **kwargs) for args, kwargs in calls]``, in that order, on ``workers`` processes:
    this one and ``workers - 1`` fresh (``spawn``) ones, each on this process's torch thread count,
    allocator setting (:mod:`ntksap.allocator`) and working directory. The workers take the calls
    from the front, this process from the back (so it computes while they start), until they meet.
    ``fn`` and its arguments must be picklable (a module-level function), and a script that calls
    this with ``workers`` > 1 must guard its top level with ``if __name__ == "__main__":``
    (multiprocessing's rule for ``spawn``). The first call to fail raises here (a worker's traceback
    as its cause); on any exception, an interrupt included, the workers are stopped before it
    propagates."""
    check_workers(workers)
    workers = min(workers, len(calls))
    if workers < 2:
        return [fn(*args, **kwargs) for args, kwargs in calls]
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from . import allocator

    results: list = [None] * len(calls)
    futures: dict = {}
    lock = threading.Lock()
    ends = {"front": 0, "back": len(calls) - 1}  # the next call from each end; they meet in between

    def take(end: str) -> int | None:
        """The next call from ``end``, or None once every call is taken."""
        if ends["front"] > ends["back"]:
            return None
        i = ends[end]
        ends[end] += 1 if end == "front" else -1
        return i

    def feed(done=None) -> None:
        """Give a worker the next call from the front (when it starts, or has finished one cleanly)."""
        if done is not None and (done.cancelled() or done.exception() is not None):
            return
        with lock:
            i = take("front")
            if i is not None:
                try:
                    futures[i] = executor.submit(fn, *calls[i][0], **calls[i][1])
                except RuntimeError:  # the pool is shut down or broken: the caller is raising already
                    return
                futures[i].add_done_callback(feed)

    before = set(multiprocessing.active_children())
    executor = ProcessPoolExecutor(max_workers=workers - 1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(torch.get_num_threads(), allocator.applied()))
    try:
        for _ in range(workers - 1):
            feed()
        while True:
            with lock:
                failed = any(f.done() and not f.cancelled() and f.exception() is not None for f in futures.values())
                i = None if failed else take("back")  # a worker's call failed: raise it below, now
            if i is None:
                break
            results[i] = fn(*calls[i][0], **calls[i][1])
        for i in sorted(futures):
            results[i] = futures[i].result()
    except BaseException:
        for child in set(multiprocessing.active_children()) - before:  # this pool's workers
            child.terminate()
            child.join()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)
    return results
