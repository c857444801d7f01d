"""Seconds per NTK snapshot while pruning (``prune.track``): the full spectrum
against the trace estimate, per model and number of probe inputs, and what
that makes per prune stage for each named set.

    python benchmarks/track_cost.py          # digits_cnn and ResNet-20: about a minute on 2 cores
    python benchmarks/track_cost.py --all    # also VGG-16-BN (100 classes) and ResNet-18 (200): ~10 minutes

Random inputs of the dataset's shape on a network at its init (the cost does not depend on the values),
every core as in the pipeline's notebooks of these models (``--threads``); run it on an otherwise idle machine.
Each figure is the median of ``--repeats`` snapshots after one warm-up. The second table counts the
snapshots one prune stage (one run, every sparsity) takes for each named set (iteration 0, 1, every
``prune.track.every``-th and the last) and multiplies by the measured cost of that set's model, mode and
inputs, where it was measured. ``python -m ntksap.config describe`` quotes the figures of ``--threads 2``
(both cores); on one thread ResNet-20 took 1.1 s at 20 inputs (0.6 s on two).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ntksap import ntk
from ntksap.config import compose, experiment_sets
from ntksap.models import build_model
from ntksap.params import parse_params

CASES = [  # model, classes, input shape, [(mode, inputs)]
    ("digits_cnn", 10, (1, 8, 8), [("spectrum", 10), ("trace", 10)]),
    ("resnet20", 10, (3, 32, 32), [("spectrum", 20), ("spectrum", 100), ("trace", 20), ("trace", 100)]),
]
BIG = [
    ("vgg16_bn", 100, (3, 32, 32), [("spectrum", 5), ("trace", 10), ("trace", 100)]),
    ("resnet18_tiny", 200, (3, 64, 64), [("spectrum", 5), ("trace", 5), ("trace", 100)]),
]


def seconds_per_snapshot(model, inputs, mode: str, repeats: int) -> float:
    rec = ntk.SpectrumRecorder(model, inputs, mode=mode)
    rec.record(0)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rec.record(0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def snapshots_per_stage(cfg, run: str) -> int:
    """Snapshots one prune stage of ``run`` records: per sparsity, iteration 0, 1, each multiple of every, T."""
    from ntksap.scores import METHODS

    r = cfg.runs[run]
    if r.method == "dense":
        return 1
    t = r.iterations or METHODS[r.method].iterations
    every = cfg.prune.track.every
    recorded = {0, 1, t} | set(range(every, t + 1, every))
    return len(recorded) * len(cfg.sparsities)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also VGG-16-BN / CIFAR-100 and ResNet-18 / Tiny-ImageNet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's, one per core, as a pipeline notebook of these models "
                         "uses: ntksap.notebook.set_cpu_threads)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cost = {}
    print(f"{'model':<14} {'mode':<9} {'inputs':>6} {'rows':>6} {'s/snapshot':>11}")
    for name, classes, shape, cases in CASES + (BIG if args.all else []):
        model = build_model(name, classes)
        for mode, n in cases:
            repeats = 1 if (name, classes, shape, cases) in BIG else args.repeats  # minutes each
            s = seconds_per_snapshot(model, torch.randn(n, *shape), mode, repeats)
            cost[(name, mode, n)] = s
            print(f"{name:<14} {mode:<9} {n:>6} {n * classes:>6} {s:>11.3f}", flush=True)
    print("\nper prune stage (one run, all sparsities), for each named set whose model, mode and inputs were measured:")
    print(f"{'set':<28} {'run':<16} {'snapshots':>9} {'seconds':>8}")
    for exp in experiment_sets():
        cfg = parse_params(compose(exp))
        tr = cfg.prune.track
        key = (cfg.model, tr.mode, tr.inputs)
        if tr.mode == "none" or key not in cost:
            continue
        for run in cfg.runs:
            k = snapshots_per_stage(cfg, run)
            print(f"{exp:<28} {run:<16} {k:>9} {k * cost[key]:>8.1f}")


if __name__ == "__main__":
    main()
