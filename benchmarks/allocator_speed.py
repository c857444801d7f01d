"""What ``ntksap.allocator.keep_freed_memory`` buys on a CPU: ResNet-20 training steps, the trainer and
NTK-SAP scoring, each in fresh processes with glibc's default ``malloc`` settings and with
freed memory kept for reuse, alternately, side by side.

The setting is process-wide and cannot be undone, so every measurement is its own process
(``--only WORKLOAD:SETTING``); the two settings alternate (and swap which goes first each
repeat), so a shared machine's drift hits both alike. Prints, per workload, the median
seconds, the page faults of the timed part (``ru_minflt``) and whether the results are the
same bit for bit (the trained parameters; the masks), then
``speed-up: <ratio>x (<workload>: default / kept)``.

    python benchmarks/allocator_speed.py                      # steps, train and prune, 5 repeats (~6 min on 2 cores)
    python benchmarks/allocator_speed.py --workloads train --repeats 3

steps: ``--steps`` bare SGD steps of ResNet-20 at batch 128 on one batch in memory, after 3
untimed (the arithmetic of training alone); train: ``ntksap.train.train`` of a dense ResNet-20
for ``--epochs`` of the paper's CIFAR-10 protocol (batch 128, float32, the trainer's memory
format) on ``--images`` random CIFAR-10-shaped images, evaluation of 500 and checkpoints
included, as the train stage runs it; prune: ``ntksap.prune(model, "ntksap", 0.8926)`` with
``--iterations`` (default 2), R = 5 and 100 noise inputs. Not a test: machines are noisy, read
the medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("steps", "train", "prune")
SETTINGS = ("default", "kept")


def measure_one(workload: str, setting: str, args) -> dict:
    """One workload in this (fresh) process under one allocator setting."""
    from ntksap import allocator

    applied = allocator.keep_freed_memory() if setting == "kept" else False
    import torch

    import ntksap
    from ntksap import build_model, data, train
    from ntksap.devices import channels_last_is_safe
    from ntksap.hashing import tensor_digest
    from ntksap.protocol import protocol

    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    if workload == "steps":
        cl = channels_last_is_safe(model, torch.device("cpu"))
        model = model.to(memory_format=torch.channels_last) if cl else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 3, 32, 32, generator=g)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        y = torch.randint(0, 10, (128,), generator=g)

        def work(steps=args.steps):
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            return model.state_dict()

        work(3)  # warm-up steps, untimed
    elif workload == "train":
        g = torch.Generator().manual_seed(0)
        u8 = dict(dtype=torch.uint8, generator=g)
        n = args.images
        bundle = data.from_tensors("cifar10", torch.randint(0, 256, (n, 3, 32, 32), **u8),
                                   torch.randint(0, 10, (n,), generator=g),
                                   torch.randint(0, 256, (500, 3, 32, 32), **u8), torch.randint(0, 10, (500,), generator=g))
        config = protocol("cifar10", epochs=args.epochs)

        def work():
            with tempfile.TemporaryDirectory() as out:
                train.train(model, None, bundle, config, out, seed=0, device="cpu", progress=False)
            return model.state_dict()
    else:
        def work():
            masks = ntksap.prune(model, "ntksap", 0.8926, input_shape=(3, 32, 32), iterations=args.iterations,
                                 rounds=5, num_samples=100, progress=False, apply=False)
            return masks

        work()  # a first run, untimed (the trainer is timed from its start, as a train stage runs it)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    out = work()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            "applied": applied, "digest": tensor_digest(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="steps,train,prune", help="comma-separated: steps, train, prune")
    ap.add_argument("--steps", type=int, default=20, help="timed SGD steps at batch 128 (steps)")
    ap.add_argument("--repeats", type=int, default=5, help="processes per workload and setting (median)")
    ap.add_argument("--images", type=int, default=2560, help="random CIFAR-10-shaped training images (train)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the paper's CIFAR-10 protocol (train)")
    ap.add_argument("--iterations", type=int, default=2, help="NTK-SAP iterations T (prune)")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("repeats", "steps", "images", "epochs", "iterations"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; use an integer >= 1")
    if args.only:
        workload, setting = args.only.split(":")
        print(json.dumps(measure_one(workload, setting, args)))
        return 0
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not workloads:
        raise SystemExit(f"--workloads={args.workloads!r} is not allowed; use a comma-separated subset of {WORKLOADS}")

    import torch

    print(f"ResNet-20 on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.repeats} processes per setting, alternating")
    passthrough = ["--steps", str(args.steps), "--images", str(args.images), "--epochs", str(args.epochs), "--iterations", str(args.iterations)]
    for workload in workloads:
        runs = {s: [] for s in SETTINGS}
        for r in range(args.repeats):
            for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                out = subprocess.run([sys.executable, __file__, "--only", f"{workload}:{setting}", *passthrough],
                                     check=True, capture_output=True, text=True, cwd=ROOT)
                runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not all(r["applied"] for r in runs["kept"]):
            print(f"{workload}: keep_freed_memory() did not take here (not glibc): nothing to compare")
            continue
        med = {s: statistics.median(r["seconds"] for r in runs[s]) for s in SETTINGS}
        what = {"steps": f"{args.steps} bare SGD steps of batch 128",
                "train": f"ntksap.train.train, {args.epochs} epoch(s) of {args.images} images + 500 test",
                "prune": f"NTK-SAP, T = {args.iterations}, R = 5, 100 inputs"}[workload]
        print(f"{workload} ({what}):")
        for s in SETTINGS:
            each = ", ".join(f"{r['seconds']:.2f}" for r in runs[s])
            faults = statistics.median(r["faults"] for r in runs[s])
            print(f"  {s:8s} {med[s]:7.2f} s  ({each})  page faults {faults:,.0f}")
        same = len({r["digest"] for s in SETTINGS for r in runs[s]}) == 1
        print(f"  results the same bit for bit: {'yes' if same else 'NO'}")
        print(f"speed-up: {med['default'] / med['kept']:.2f}x ({workload}: default / kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
