"""Layer-wise densities of pruning methods side by side, on a paper model and real data.

    python benchmarks/layer_profiles.py --model resnet20 --sparsity 0.981986 \
        --methods synflow,ntksap,random_erk,synflow_l2,px --cifar10 ../shared/data/cifar10-jpeg.tar.gz

prints one row per prunable layer and one column per method (the fraction of
the layer's weights kept), then the seconds each method took. Data-driven
methods read the class-balanced prune set of 10 images per class
(``ntksap.data.prune_batches``) of CIFAR-10 (``--cifar10``: the torchvision
folder or the JPEG tarball); without it, of Gaussian noise with random labels
(say so in any figure quoted). Each method prunes the same initialisation
(``--seed``) with its paper's settings (``--iterations`` overrides T).
``--csv FILE`` also writes the table.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

import ntksap
from ntksap.data import get_dataset, prune_batches
from ntksap.scores import METHODS


def prune_set(cifar10: str | None, num_classes: int, seed: int):
    if cifar10:
        bundle = get_dataset("cifar10", local_path=cifar10)
        return prune_batches(bundle, per_class=10, seed=seed), "CIFAR-10, 10 images per class"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10 * num_classes, 3, 32, 32, generator=g)
    y = torch.arange(num_classes).repeat(10)
    return [(x, y)], "Gaussian noise (no --cifar10)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "vgg16_bn"])
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.981986)
    ap.add_argument("--methods", default="synflow,ntksap,random_erk,synflow_l2,px")
    ap.add_argument("--iterations", type=int, default=None, help="T for every iterative method (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cifar10", default=None, help="CIFAR-10 folder or cifar10-jpeg.tar.gz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: {unknown} not allowed; allowed: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    data, source = prune_set(args.cifar10, args.num_classes, args.seed)
    torch.manual_seed(args.seed)
    init = ntksap.build_model(args.model, num_classes=args.num_classes).state_dict()
    columns, seconds = {}, {}
    for method in methods:
        model = ntksap.build_model(args.model, num_classes=args.num_classes)
        model.load_state_dict(init)
        kw = {}
        if args.iterations is not None and METHODS[method].iterations > 1:
            kw["iterations"] = args.iterations
        t0 = time.perf_counter()
        masks = ntksap.prune(model, method, args.sparsity, input_shape=(3, 32, 32),
                             data=data if METHODS[method].needs_data else None, seed=args.seed, **kw)
        seconds[method] = time.perf_counter() - t0
        columns[method] = masks.report(model, (3, 32, 32)).set_index("name")["density"]
    table = pd.DataFrame(columns)
    print(f"{args.model}, {100 * args.sparsity:.2f} % sparsity, seed {args.seed}, prune set: {source}")
    print(table.round(4).to_string())
    print("seconds: " + ", ".join(f"{m} {s:.1f}" for m, s in seconds.items()))
    if args.csv:
        table.to_csv(args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
