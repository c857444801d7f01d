"""Independent runs in worker processes (ntksap.parallel): how many, in order, errors, and that a stage's
results do not depend on it (the prune and train stages of one seed, bit for bit)."""

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from ntksap import config, params, parallel
from ntksap.stages import prune as prune_stage
from ntksap.stages import train as train_stage

ROOT = Path(__file__).resolve().parents[1]


def _slow_square(x):
    """x squared and the process that computed it, after a second (so the workers get some)."""
    time.sleep(1.0)
    return x * x, os.getpid(), torch.get_num_threads()


def _fail_on_three(x):
    if x == 3:
        raise ValueError(f"no {x}")
    return x


def test_default_workers_fill_the_idle_cores_on_a_cpu_only(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(parallel, "cpu_cores", lambda: 4)
    try:
        torch.set_num_threads(1)
        assert parallel.default_workers(torch.device("cpu"), 7) == 4
        assert parallel.default_workers(torch.device("cpu"), 3) == 3     # no more than the runs
        assert parallel.default_workers(torch.device("cpu"), 1) == 1
        assert parallel.default_workers(torch.device("cuda"), 7) == 1    # one GPU: one process
        torch.set_num_threads(2)
        assert parallel.default_workers(torch.device("cpu"), 7) == 2
        torch.set_num_threads(4)
        assert parallel.default_workers(torch.device("cpu"), 7) == 1     # a run uses every core
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_workers_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=f"workers={bad!r} is not allowed"):
        parallel.run_all(_fail_on_three, [((1,), {})], bad)
    with pytest.raises(ValueError, match="workers="):
        train_stage.train_seed(params.parse_params(config.compose("micro")), 0, workers=bad)


def test_calls_run_in_order_on_this_process_and_workers_with_its_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls = [((x,), {}) for x in range(10)]
        done = parallel.run_all(_slow_square, calls, 2)
    finally:
        torch.set_num_threads(before)
    assert [d[0] for d in done] == [x * x for x in range(10)]
    pids = [d[1] for d in done]
    assert os.getpid() in pids and len(set(pids)) == 2          # this process and one worker
    assert pids[-1] == os.getpid() and pids[0] != os.getpid()   # the worker from the front, this one from the back
    assert {d[2] for d in done} == {1}                          # the caller's thread count everywhere
    assert parallel.run_all(_slow_square, calls[:2], 1) == [(0, os.getpid(), before), (1, os.getpid(), before)]
    assert not multiprocessing.active_children()                # the workers are gone


def test_a_failing_call_raises_here_and_leaves_no_worker():
    with pytest.raises(ValueError, match="no 3"):
        parallel.run_all(_fail_on_three, [((x,), {}) for x in range(6)], 2)
    assert not multiprocessing.active_children()


def _sleep_or_fail(x):
    if x < 0:
        raise KeyboardInterrupt  # as an interrupt of the caller while the workers compute
    time.sleep(x)
    return x


def test_a_failure_in_the_caller_stops_the_workers_at_once():
    """The caller computes from the back: its failure (or an interrupt) must not wait for the workers'
    long calls, and leaves no worker running."""
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        parallel.run_all(_sleep_or_fail, [((60,), {}), ((60,), {}), ((-1,), {})], 2)
    assert time.perf_counter() - t < 30 and not multiprocessing.active_children()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_seeds_stages_give_the_same_bits_on_one_process_and_on_two(tmp_path, monkeypatch):
    """What the prune and train stages of one seed write (masks, init, records, trained weights, histories,
    metrics) does not depend on how many processes ran its runs; only the timings may."""
    monkeypatch.setenv("NTKSAP_DATA_ROOT", str(ROOT / "data"))
    cfg = params.parse_params({**config.compose("micro", ["train.epochs=2"]), "seeds": [0]})
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the digits net's stages: one thread, so two workers on two cores
    out = {}
    try:
        for workers in (1, 2):
            work = tmp_path / f"w{workers}"
            work.mkdir()
            monkeypatch.chdir(work)  # its own checkpoints folder: nothing is restored from the other's
            prune_stage.prune_seed(cfg, 0, work / "masks", work / "prune", workers=workers)
            res, hist = train_stage.train_seed(cfg, 0, work / "masks", work / "train", workers=workers)
            out[workers] = {k: _digests(work / k) for k in ("masks", "prune", "train")}
            assert list(res["run"].unique()) == list(cfg.runs)
            timings = (work / "results" / cfg.experiment / "timings")
            assert sorted(p.name for p in timings.rglob("*.csv")) == ["seed-0.csv", "seed-0.csv"]
    finally:
        torch.set_num_threads(before)
    assert out[1]["train"] and any(name.endswith("model.pt") for name in out[1]["train"])
    for k in ("masks", "prune", "train"):
        assert out[1][k] == out[2][k], k
