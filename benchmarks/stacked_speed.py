"""Stacked training against one network at a time, as the train stage runs them.

K networks of one init, each with its own random mask (densities spread from
50 % down, as a curve's sparsities), trained for ``--epochs`` epochs with the
dataset's protocol by the real trainer, side by side in this process:
``ntksap.train.train`` one after the other, then ``ntksap.train.train_stacked``
with ``kind="lockstep"`` and ``kind="grouped"``. Prints seconds per network
for each and the ratios against one at a time (``> 1``: stacked is faster).

    python benchmarks/stacked_speed.py                         # ResNet-20, CIFAR-10 shape, K = 3
    python benchmarks/stacked_speed.py --model digits_cnn --k 5 --images 1437   # the quick set's nets
    python benchmarks/stacked_speed.py --device cuda --k 9 --images 12800

Uses random uint8 images of the dataset's shape (``ntksap.data.from_tensors``):
the speed does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ntksap import Masks, build_model, data, params, train

DATASET = {"digits_cnn": "digits", "resnet20": "cifar10", "vgg16_bn": "cifar100"}


def nets(model: str, classes: int, k: int) -> tuple[list, list]:
    models, masks = [], []
    for i in range(k):
        torch.manual_seed(0)
        m = build_model(model, classes)
        g = torch.Generator().manual_seed(i + 1)
        density = 0.5 * 0.6 ** i
        models.append(m)
        masks.append(Masks({n: (torch.rand(t.shape, generator=g) < density).float()
                            for n, t in Masks.ones_like(m).items()}))
    return models, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=sorted(DATASET))
    ap.add_argument("--k", type=int, default=3, help="networks trained at once")
    ap.add_argument("--images", type=int, default=2560, help="training images per epoch")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    name = DATASET[args.model]
    spec = data.SPECS[name]
    g = torch.Generator().manual_seed(0)
    n_test = max(args.images // 5, 1)
    bundle = data.from_tensors(name, torch.randint(0, 256, (args.images, *spec.input_shape), dtype=torch.uint8,
                                                   generator=g),
                               torch.randint(0, spec.num_classes, (args.images,), generator=g),
                               torch.randint(0, 256, (n_test, *spec.input_shape), dtype=torch.uint8, generator=g),
                               torch.randint(0, spec.num_classes, (n_test,), generator=g))
    cfg = params.protocol(name, epochs=args.epochs, milestones=[])
    print(f"{args.model} on {args.images} {name}-shaped images, {args.epochs} epoch(s), batch {cfg.batch_size}, "
          f"K = {args.k}; torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{args.device or 'default'}")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("one at a time", "lockstep", "grouped"):
            models, masks = nets(args.model, spec.num_classes, args.k)
            t0 = time.perf_counter()
            if variant == "one at a time":
                for i, (m, mk) in enumerate(zip(models, masks)):
                    train.train(m, mk, bundle, cfg, Path(tmp) / "one" / str(i), device=args.device, progress=False)
            else:
                train.train_stacked(models, masks, bundle, cfg, Path(tmp) / variant, kind=variant,
                                    device=args.device, progress=False)
            seconds[variant] = (time.perf_counter() - t0) / args.k
            print(f"{variant:14s}: {seconds[variant]:8.2f} s per network")
    for variant in ("lockstep", "grouped"):
        print(f"speed-up {variant}: {seconds['one at a time'] / seconds[variant]:.2f}x (one at a time / {variant})")


if __name__ == "__main__":
    main()
