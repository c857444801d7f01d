"""Memory and time of NTK-SAP pruning at ImageNet size: ResNet-50, 224 x 224
noise inputs, scored one mini-batch at a time (PAPER.md: 10 000 noise inputs
in mini-batches of 256, T = 100 iterations, R = 1).

What it shows, side by side in one invocation (each measurement in a fresh
process, so a peak is its own):

* the activations autograd keeps alive (``ntksap.profiling.SavedTensorMeter``:
  the bytes saved for backward, on any device) do not grow with the number of
  mini-batches: ``ratio`` = peak with ``--batches`` mini-batches / peak with 1,
  which is 1.00 when only one mini-batch's graphs are ever held;
* the peak per mini-batch size ``B``, fitted as ``a + b * B`` and projected to
  the paper's B = 256 against an 80 GB GPU (on CUDA, ``--sizes 256`` measures
  it directly: ``torch.cuda.max_memory_allocated``);
* the floating-point work per noise input (``torch.utils.flop_counter``) and the
  measured seconds per input on this device, projected to the whole ImageNet
  prune (T x R x 10 000 inputs).

    python benchmarks/prune_memory.py                        # CPU: B = 2, 4; 2 s to a few minutes per run
    python benchmarks/prune_memory.py --device cuda --sizes 64 256 --batches 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _measure import measure  # noqa: E402

GB = 2 ** 30
PAPER = {"inputs": 10_000, "batch": 256, "iterations": 100, "rounds": 1, "gpu_gb": 80}


def one_run(size: int, batches: int, device: str, threads: int) -> dict:
    """Prune ResNet-50 for one NTK-SAP iteration over ``batches`` noise
    mini-batches of ``size``; returns peaks, seconds and FLOPs per input."""
    import ntksap
    from ntksap.profiling import SavedTensorMeter

    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = ntksap.build_model("resnet50", 1000).to(dev)
    kw = dict(input_shape=(3, 224, 224), iterations=1, rounds=1, epsilon=0.01, batch_size=size, seed=0,
              device=dev, progress=False, apply=False)
    ntksap.prune(model, "ntksap", 0.8926, num_samples=1, **kw)           # warm-up: allocator, kernels
    result: dict = {}
    with SavedTensorMeter() as meter, measure(dev, result):
        ntksap.prune(model, "ntksap", 0.8926, num_samples=size * batches, **kw)
    result.update(size=size, batches=batches, saved_peak_gb=meter.peak_bytes / GB,
                  saved_total_gb=meter.total_bytes / GB, saved_live_after=meter.live_bytes)
    # FLOPs of one mini-batch's scoring (no-grad statistics pass, two passes, one backward)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        ntksap.prune(model, "ntksap", 0.8926, num_samples=size, **kw)
    result["gflop_per_input"] = flops.get_total_flops() / size / 1e9
    return result


def isolated(size: int, batches: int, device: str, threads: int) -> dict:
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--only", f"{size},{batches}", "--device", device,
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4], help="noise mini-batch sizes to measure")
    p.add_argument("--batches", type=int, default=3, help="mini-batches in the multi-batch run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the model's init and the host work)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        size, batches = map(int, args.only.split(","))
        print(json.dumps(one_run(size, batches, args.device, args.threads)))
        return
    for name in ("sizes", "batches", "threads"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            raise SystemExit(f"--{name}={values} is not allowed; use positive integers")

    print(f"NTK-SAP on ResNet-50 (3x224x224, 1000 classes), one iteration; device {args.device}, "
          f"torch {torch.__version__}, {args.threads} CPU threads")
    head = f"{'B':>5} {'batches':>7} {'saved peak GB':>13} {'saved total GB':>14} {'process peak GB':>15} {'s/input':>8}"
    print(head)
    rows = {}
    for size in args.sizes:
        for batches in (1, args.batches):
            r = isolated(size, batches, args.device, args.threads)
            rows[size, batches] = r
            print(f"{size:>5} {batches:>7} {r['saved_peak_gb']:>13.3f} {r['saved_total_gb']:>14.3f} "
                  f"{r['peak_mb'] / 1024:>15.3f} {r['seconds'] / (size * batches):>8.3f}")
    ratios = [rows[s, args.batches]["saved_peak_gb"] / rows[s, 1]["saved_peak_gb"] for s in args.sizes]
    print(f"ratio (saved peak with {args.batches} mini-batches / with 1): "
          + ", ".join(f"B={s}: {r:.3f}" for s, r in zip(args.sizes, ratios)))
    per_input = rows[args.sizes[-1], 1]
    if len(args.sizes) >= 2:
        (s0, s1) = args.sizes[0], args.sizes[-1]
        y0, y1 = rows[s0, 1]["saved_peak_gb"], rows[s1, 1]["saved_peak_gb"]
        slope = (y1 - y0) / (s1 - s0)
        base = y0 - slope * s0
        at = base + slope * PAPER["batch"]
        print(f"saved-for-backward peak = {base:.3f} GB + {slope * 1024:.1f} MB x B  ->  B = {PAPER['batch']}: "
              f"{at:.1f} GB (projected; the GPU has {PAPER['gpu_gb']} GB)")
    total_inputs = PAPER["inputs"] * PAPER["iterations"] * PAPER["rounds"]
    gflop = per_input["gflop_per_input"]
    size = args.sizes[-1]
    if args.batches > 1:   # the extra mini-batches' time: without prune()'s one-off setup and top-k
        secs = (rows[size, args.batches]["seconds"] - rows[size, 1]["seconds"]) / (size * (args.batches - 1))
    else:
        secs = rows[size, 1]["seconds"] / size
    print(f"work: {gflop:.1f} GFLOP per noise input; whole ImageNet prune (T={PAPER['iterations']}, "
          f"R={PAPER['rounds']}, {PAPER['inputs']} inputs): {gflop * total_inputs / 1e6:.0f} PFLOP; at "
          + ", ".join(f"{t} TFLOP/s sustained: {gflop * total_inputs / t / 1e3 / 60:.0f} min" for t in (50, 100, 200)))
    print(f"measured {secs * 1e3:.2f} ms per noise input on {args.device} at B={size} (time of the extra "
          f"mini-batches) -> whole prune {secs * total_inputs / 3600:.2f} h on this device")


if __name__ == "__main__":
    main()
