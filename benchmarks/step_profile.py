"""Where one stacked training step's time goes: ``torch.profiler`` over a few
SGD steps of K stacked ResNet-20s (``ntksap.stacked.stack(kind="grouped")``),
unmasked and with each member's own 89.26 % random mask applied the trainer's
way, as ``benchmarks/epoch_time.py`` trains them (bf16 autocast on CUDA,
channels-last, ``ntksap.data.DeviceLoader``). Prints ms per step, CUDA kernel
events per step and the top operators by host time and by device time.

    python benchmarks/step_profile.py                 # CUDA: K = 9, 30 steps
    python benchmarks/step_profile.py --device cpu --k 2 --steps 3

Measured on an H200 (docs/scaling.md, "Measured on one H200"): 8.9 ms of GPU
time per K = 9 step, 17 % of it cuDNN's layout conversions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--k", type=int, default=9, help="stacked networks (default 9)")
    ap.add_argument("--steps", type=int, default=30, help="profiled steps, after as many untimed ones")
    ap.add_argument("--rows", type=int, default=12, help="operators per table")
    args = ap.parse_args(argv)
    for name in ("k", "steps", "rows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)} is not allowed; use a positive integer")

    import epoch_time as et
    from torch.profiler import ProfilerActivity, profile

    from ntksap import build_model, data, stacked
    from ntksap.devices import resolve_device
    from ntksap.masks import apply_masks, enforce_masks_after_step

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    n = 128 * args.steps
    u8 = dict(dtype=torch.uint8, generator=g)
    bundle = data.from_tensors("cifar10", torch.randint(0, 256, (n, 3, 32, 32), **u8),
                               torch.randint(0, 10, (n,), generator=g), torch.randint(0, 256, (8, 3, 32, 32), **u8),
                               torch.randint(0, 10, (8,), generator=g))
    print(f"{args.k} stacked ResNet-20s, batch 128, {args.steps} profiled steps; device {dev}, torch {torch.__version__}")
    for masked in (False, True):
        members = []
        for i in range(args.k):
            torch.manual_seed(i)
            members.append(build_model("resnet20", 10).to(dev).to(memory_format=torch.channels_last))
        engine = stacked.stack(members, kind="grouped").to(dev)
        opt = torch.optim.SGD(engine.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        handles = []
        if masked:
            masks = engine.stack_tensors([et.random_masks(m, et.SPARSITY, seed=i) for i, m in enumerate(members)])
            handles = [apply_masks(engine, masks), enforce_masks_after_step(opt, engine, masks)]
        loader = data.DeviceLoader(bundle, "train", 128, seed=0, device=dev, channels_last=True)
        et.stacked_train_epoch(engine, loader, opt, args.k, amp=cuda)            # untimed: cuDNN's choices
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            r = et.stacked_train_epoch(engine, loader, opt, args.k, amp=cuda)
            if cuda:
                torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t0
        steps = r["images"] // 128
        ev = prof.key_averages()
        on_device = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]   # the kernels themselves
        gpu_ms = sum(e.self_device_time_total for e in on_device) / 1e3 / steps if cuda else float("nan")
        print(f"\n=== masked={masked}: {wall / steps * 1e3:.2f} ms per step (profiler on), "
              f"{gpu_ms:.2f} ms device time per step, {sum(e.count for e in on_device) / steps:.0f} CUDA kernel events per step")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))
        if cuda:
            print(ev.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=48))
        for h in handles:
            h.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
