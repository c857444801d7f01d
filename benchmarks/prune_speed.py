"""NTK-SAP pruning speed: ``ntksap.prune`` vs the straightforward two-model
implementation of the tests (``tests/reference.py``: deep copies, a train-mode
statistics pass and two eval passes per mini-batch), side by side.

ResNet-20, CIFAR-10 settings (PAPER.md): sparsity 89.26 %, T = 20, R = 5,
epsilon = 0.01, 100 noise inputs in batches of 256. Each variant runs in a
fresh process (so peak memory is its own), one after the other. Prints wall
time, CPU time and peak memory of each and ends with ``speed-up: <ratio>x``
(wall time, reference / ours).

    python benchmarks/prune_speed.py                  # full settings
    python benchmarks/prune_speed.py --iterations 4   # shorter run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _measure import measure, run_isolated  # noqa: E402


def run_variant(variant: str, args) -> dict:
    import ntksap
    from ntksap.models import kaiming_init
    from reference import ntksap_reference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if variant == "reference":
        device = torch.device("cpu")
    settings = dict(iterations=args.iterations, rounds=args.rounds, epsilon=0.01, num_samples=args.num_samples,
                    batch_size=256, seed=0)
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20", num_classes=10).to(device)
    res: dict = {"device": str(device)}
    with measure(device, res):
        if variant == "ours":
            masks = ntksap.prune(model, "ntksap", args.sparsity, input_shape=(3, 32, 32), device=device,
                                 progress=False, **settings)
        else:
            masks, _ = ntksap_reference(model, args.sparsity, (3, 32, 32), init_fn=kaiming_init, **settings)
    res["kept"] = int(sum(m.sum() for m in masks.values()))
    res["layer_density"] = {n: float(m.mean()) for n, m in masks.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.8926)
    ap.add_argument("--device", default=None, help="for ntksap.prune; default: cuda if available, else cpu")
    ap.add_argument("--only", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_variant(args.only, args)))
        return
    passthrough = sys.argv[1:]
    print(f"NTK-SAP on ResNet-20 (3x32x32, 10 classes): sparsity {args.sparsity}, T={args.iterations}, "
          f"R={args.rounds}, {args.num_samples} noise inputs, batch 256; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    results = {v: run_isolated(__file__, v, passthrough) for v in ("ours", "reference")}
    for v, label in (("ours", "ntksap.prune"), ("reference", "two-model reference")):
        r = results[v]
        print(f"{label:22s} [{r['device']:>4s}]: wall {r['seconds']:8.2f} s   cpu {r['cpu_seconds']:8.2f} s   "
              f"peak memory {r['peak_mb']:8.1f} MB   kept {r['kept']}")
    o, r = results["ours"], results["reference"]
    worst = max(abs(o["layer_density"][n] - r["layer_density"][n]) for n in o["layer_density"])
    print(f"largest layer-density difference to the reference: {worst:.4f}")
    print(f"memory ratio (ours / reference): {o['peak_mb'] / max(r['peak_mb'], 1e-9):.2f}")
    print(f"cpu-time ratio (reference / ours): {r['cpu_seconds'] / o['cpu_seconds']:.2f}x")
    print(f"speed-up: {r['seconds'] / o['seconds']:.2f}x")


if __name__ == "__main__":
    main()
