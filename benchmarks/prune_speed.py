"""NTK-SAP pruning speed: ``ntksap.prune`` (BatchNorm statistics taken in the
unperturbed pass, the default) against its exact two-pass form
(``bn_mode="unperturbed_two_pass"``: a separate statistics pass, as the
authors), the straightforward two-model implementation of the tests
(``tests/reference.py``: deep copies, a train-mode statistics pass and two eval
passes per mini-batch), with ``--authors`` the authors' own code (their
``NTKSAP`` pruner and ``prune_loop``, GitHub YiteWang/NTK-SAP), and ``floor``:
the arithmetic every one of them must do and nothing else (per mini-batch, two
forward passes of a bare ResNet-20 in the memory format ``ntksap.prune``
picks, eval-mode BatchNorm, and one backward of the squared difference to the
weights; no re-draws, noise, statistics, masks or thresholds), side by side.

ResNet-20, CIFAR-10 settings (PAPER.md): sparsity 89.26 %, T = 20, R = 5,
epsilon = 0.01, 100 noise inputs in batches of 256. Each variant runs in a
fresh process (so peak memory is its own), one after the other. Prints wall
time, CPU time and peak memory of each, how far the one-pass scores (first
iteration, same draws) and masks are from the two-pass ones, and ends with
``speed-up: <ratio>x`` (wall time, the authors' code, else the reference, / ours)
and, with ``floor``, ``ceiling: <ratio>x`` (the same baseline / floor): the
speed-up ours would reach if it paid for nothing but those passes.

    python benchmarks/prune_speed.py                             # full settings
    python benchmarks/prune_speed.py --iterations 4              # shorter run
    python benchmarks/prune_speed.py --authors /path/to/NTK-SAP  # also their code
    python benchmarks/prune_speed.py --variants ours             # one variant (e.g. on a GPU)
    python benchmarks/prune_speed.py --allocator kept            # every variant keeps freed memory (ntksap.allocator)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _measure import add_allocator_option, measure, run_isolated, use_allocator  # noqa: E402


VARIANTS = ("ours", "two_pass", "reference", "authors", "floor")
LABELS = {"ours": "ntksap.prune", "two_pass": "ntksap two-pass BN", "reference": "two-model reference",
          "authors": "authors' code", "floor": "floor (bare passes)"}


def _floor_passes(model, settings, device) -> None:
    """The passes alone: T x R x (mini-batches of num_samples) times, two eval-mode
    forwards of ``model`` on one noise batch and a backward of their squared
    difference to the weights, in the memory format ``ntksap.prune`` uses."""
    from ntksap.devices import channels_last_is_safe
    from ntksap.functional import to_format
    from ntksap.scores import noise_batch_sizes

    cl = channels_last_is_safe(model, device)
    model = (model.to(memory_format=torch.channels_last) if cl else model).eval()
    sizes = noise_batch_sizes(settings["num_samples"], settings["batch_size"])
    xs = [to_format(torch.randn(b, 3, 32, 32, device=device), cl) for b in sizes]
    for _ in range(settings["iterations"] * settings["rounds"]):
        for x in xs:
            (model(x) - model(x)).pow(2).sum().backward()


def _authors_masks(args, model, settings) -> dict:
    """Their NTKSAP pruner through their prune_loop, on a copy of our init
    (one batch of ``num_samples`` inputs: their noise takes the data's shape)."""
    sys.path.insert(0, args.authors)
    from Models import lottery_resnet  # noqa: E402  (their code, from --authors)
    from Pruners import pruners
    from prune import prune_loop
    from Utils import generator

    theirs = lottery_resnet.resnet20((3, 32, 32), 10)
    dst = [v for n, v in theirs.state_dict().items() if "mask" not in n and not n.endswith(".shortcut.weight")]
    with torch.no_grad():
        for d, src in zip(dst, model.state_dict().values()):
            d.copy_(src)
    pruner = pruners.NTKSAP(generator.masked_parameters(theirs, False, False, False),
                            ntksap_epsilon=settings["epsilon"], ntksap_R=settings["rounds"])
    x = torch.randn(settings["num_samples"], 3, 32, 32)
    data = [(x, torch.zeros(len(x), dtype=torch.long))]
    prune_loop(theirs, torch.nn.CrossEntropyLoss(), pruner, data, "cpu", 1 - args.sparsity, "exponential",
               "global", settings["iterations"], train_mode=True)
    return {f"p{i}": m.clone() for i, (m, _) in enumerate(pruner.masked_parameters)}


def run_variant(variant: str, args) -> dict:
    use_allocator(args.allocator)  # in this variant's own process, as in every other variant's
    import ntksap
    from ntksap.models import kaiming_init
    from reference import ntksap_reference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if variant in ("reference", "authors"):
        device = torch.device("cpu")
    settings = dict(iterations=args.iterations, rounds=args.rounds, epsilon=0.01, num_samples=args.num_samples,
                    batch_size=256, seed=0)
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20", num_classes=10).to(device)
    res: dict = {"device": str(device)}
    first: list = []
    with measure(device, res):
        if variant in ("ours", "two_pass"):
            bn_mode = "unperturbed" if variant == "ours" else "unperturbed_two_pass"
            masks = ntksap.prune(model, "ntksap", args.sparsity, input_shape=(3, 32, 32), device=device,
                                 progress=False, bn_mode=bn_mode, **settings,
                                 callback=lambda t, m, s: first.append(s) if t == 1 else None)
        elif variant == "reference":
            masks, _ = ntksap_reference(model, args.sparsity, (3, 32, 32), init_fn=kaiming_init, **settings)
        elif variant == "authors":
            torch.manual_seed(0)
            masks = _authors_masks(args, model, settings)
        else:
            _floor_passes(model, settings, device)
            masks = {}
    res["kept"] = int(sum(m.sum() for m in masks.values()))
    res["layer_density"] = [float(m.float().mean()) for m in masks.values()]
    if variant in ("ours", "two_pass"):
        res["masks"] = torch.cat([m.reshape(-1).cpu() for m in masks.values()]).bool().tolist()
        res["scores"] = torch.cat([s.reshape(-1).double().cpu() for s in first[0].values()]).tolist()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.8926)
    ap.add_argument("--device", default=None, help="for ntksap.prune; default: cuda if available, else cpu")
    ap.add_argument("--authors", default=None, help="a checkout of the authors' repository: also time their code")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default: all that can run)")
    add_allocator_option(ap, "every variant's process alike")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_variant(args.only, args)))
        return
    variants = args.variants.split(",") if args.variants else [v for v in VARIANTS if v != "authors" or args.authors]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        ap.error(f"--variants: {bad} not allowed; allowed: {list(VARIANTS)}")
    if "authors" in variants and not args.authors:
        ap.error("--variants authors needs --authors DIR (a checkout of GitHub YiteWang/NTK-SAP)")
    passthrough = sys.argv[1:]
    print(f"NTK-SAP on ResNet-20 (3x32x32, 10 classes): sparsity {args.sparsity}, T={args.iterations}, "
          f"R={args.rounds}, {args.num_samples} noise inputs, batch 256; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, allocator {args.allocator}")
    results = {v: run_isolated(__file__, v, passthrough) for v in variants}
    for v, r in results.items():
        print(f"{LABELS[v]:22s} [{r['device']:>4s}]: wall {r['seconds']:8.2f} s   cpu {r['cpu_seconds']:8.2f} s   "
              f"peak memory {r['peak_mb']:8.1f} MB   kept {r['kept'] if r['layer_density'] else '-'}")
    if "ours" in results and "two_pass" in results:
        o, t = results["ours"], results["two_pass"]
        a, b = torch.tensor(o["scores"]), torch.tensor(t["scores"])
        rel = (a - b).abs() / b.abs().max()
        differ = sum(x != y for x, y in zip(o["masks"], t["masks"]))
        print(f"one-pass vs two-pass BN statistics: first-iteration scores differ by at most {rel.max():.2e} "
              f"(median {rel.median():.2e}) of the largest score; final masks differ in {differ} of "
              f"{len(o['masks'])} entries; largest layer-density difference "
              f"{max(abs(x - y) for x, y in zip(o['layer_density'], t['layer_density'])):.4f}")
    if "ours" in results:
        o = results["ours"]
        for v in ("two_pass", "reference", "authors"):
            if v in results:
                r = results[v]
                worst = max(abs(x - y) for x, y in zip(o["layer_density"], r["layer_density"]))
                print(f"ours vs {LABELS[v]}: largest layer-density difference {worst:.4f}, memory ratio "
                      f"(ours / it) {o['peak_mb'] / max(r['peak_mb'], 1e-9):.2f}, cpu-time ratio (it / ours) "
                      f"{r['cpu_seconds'] / o['cpu_seconds']:.2f}x, wall-time ratio {r['seconds'] / o['seconds']:.2f}x")
        base = "authors" if "authors" in results else "reference" if "reference" in results else None
        if base:
            print(f"speed-up: {results[base]['seconds'] / o['seconds']:.2f}x (against the {LABELS[base]})")
        if "floor" in results:
            f = results["floor"]["seconds"]
            print(f"ours over the floor: {o['seconds'] / f:.2f}x ({o['seconds'] - f:.2f} s beyond the bare passes)")
            if base:
                print(f"ceiling: {results[base]['seconds'] / f:.2f}x (the {LABELS[base]} / the floor: ours with no "
                      f"cost beyond its passes)")


if __name__ == "__main__":
    main()
