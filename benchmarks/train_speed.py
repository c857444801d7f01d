"""Training throughput of ResNet-20 on CIFAR-10-shaped data: our pipeline
(uint8 images held on the device, batch-vectorised crop + flip, channels-last where the trainer
uses it (NCHW for ResNets on AVX2 CPUs: devices.channels_last_is_safe),
optional torch.compile, bf16 autocast on CUDA) versus a plain torchvision
``DataLoader`` with per-image PIL transforms (RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize) and ``num_workers=2`` feeding a
default float32 NCHW model.

    python benchmarks/train_speed.py                 # 3 x 5120 images (40 batches), 2-3 minutes on 2 idle cores
    python benchmarks/train_speed.py --full          # one full epoch (50000 images)
    python benchmarks/train_speed.py --compile on    # also torch.compile the model (slow to compile on a CPU)
    python benchmarks/train_speed.py --no-extra      # only the PIL / ours / compute-only rows (faster)
    python benchmarks/train_speed.py --allocator kept  # both in a process that keeps freed memory (ntksap.allocator)

Uses the shared CIFAR-10 (``../shared/data/cifar10-jpeg.tar.gz``) when present,
else random uint8 images of the same shape. Prints images per second of a
pass over the images for each pipeline (median of ``--repeats`` passes, run
in alternating order so a shared machine's load hits both alike), the compute-only rates (training steps
on batches already in memory, for the baseline's and our model settings) and
finally ``speed-up: <ours / PIL>x`` and ``ceiling: ...x``, the speed-up
if loading cost nothing (best compute-only rate / PIL). "ours" is run as ``ntksap.train.train``
runs it: ``DeviceLoader`` with the trainer's ``drop_last`` rule and the
device's default ``prefetch`` (a background thread on CUDA, none on a CPU),
``train_epoch`` with the ``amp`` default of the device (bf16 on CUDA only).
Extra rows (unless ``--no-extra``): ours with the other ``prefetch`` setting,
ours and compute-only with bf16 autocast (``amp=True``; a CPU with
AVX-512 BF16 / AMX runs it in oneDNN bf16 kernels), and the evaluation pass
(``evaluate`` over batches of ``--eval-batch-size``, fp32 and bf16; images/s
of a forward pass). A second ratio line ``speed-up with bf16: ...x`` follows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _measure import add_allocator_option, use_allocator
from ntksap import build_model, data, train
from ntksap.devices import channels_last_is_safe, resolve_device

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def load_images(n: int, source: str, root: str, seed: int = 0):
    """n CIFAR-10 training images (uint8 (n, 3, 32, 32)) and labels."""
    if source == "auto":
        source = "shared" if SHARED_CIFAR.exists() else "random"
    if source == "shared":
        b = data.get_dataset("cifar10", root=root, local_path=SHARED_CIFAR)
        idx = torch.randperm(b.num_train, generator=torch.Generator().manual_seed(seed))[:n]
        return b.train_images[idx].clone(), b.train_labels[idx].clone(), "shared CIFAR-10"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g), "random uint8"


class PILDataset(torch.utils.data.Dataset):
    """CIFAR-style dataset: HWC uint8 array -> PIL image -> transforms, per image."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def make_model(device, channels_last: bool):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, opt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm_up(net, opt, x, y, amp, steps=3):
    """A few steps so that kernels are chosen / compiled before timing; seconds taken."""
    t0 = time.perf_counter()
    for _ in range(steps):
        train.train_epoch(net, [(x, y)], opt, amp=amp)
    sync(x.device)
    return time.perf_counter() - t0


def timed(fn, device) -> tuple[float, int]:
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return time.perf_counter() - t0, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5120, help="images per timed pass (default 5120 = 40 batches)")
    ap.add_argument("--full", action="store_true", help="a full CIFAR-10 epoch: 50000 images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", choices=["auto", "shared", "random"], default="auto")
    ap.add_argument("--root", default=str(ROOT / "data"), help="data cache folder for the shared CIFAR-10")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile our model (auto: on for CUDA, off on a CPU)")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: CUDA only)")
    ap.add_argument("--no-extra", action="store_true", help="skip the prefetch, bf16 and evaluation rows")
    ap.add_argument("--eval-batch-size", type=int, default=500, help="batch of the evaluation rows (trainer: 500)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per set-up (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    add_allocator_option(ap, "the whole process, both pipelines alike")
    args = ap.parse_args(argv)
    use_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = 50000 if args.full else args.images
    bs = args.batch_size
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    x_u8, y, source = load_images(n, args.data, args.root)
    n = len(y)
    bundle = data.from_tensors("cifar10", x_u8, y, x_u8[:bs], y[:bs])
    print(f"ResNet-20, {n} {source} images, batch {bs}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, allocator {args.allocator}")

    # -- the two set-ups -----------------------------------------------------------------
    # plain: PIL transforms per image in DataLoader(num_workers=2), float32 NCHW model
    import torchvision.transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(bundle.mean, bundle.std)])
    ds = PILDataset(x_u8.permute(0, 2, 3, 1).numpy().copy(), y.numpy(), tf)
    pil_loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=2,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
    base_model, base_opt = make_model(device, channels_last=False)
    xb = data.normalise(bundle, x_u8[:bs].to(device))
    yb = y[:bs].to(device)
    warm_up(base_model, base_opt, xb, yb, amp=False)

    # ours: uint8 images on the device, DeviceLoader, the trainer's layout (+ compile, + bf16 on CUDA)
    cl = channels_last_is_safe(base_model, device)         # the trainer's rule: NCHW on AVX2 ResNets
    layout = "channels-last" if cl else "NCHW (channels-last unsafe on this CPU)"
    model, opt = make_model(device, channels_last=cl)
    net = torch.compile(model) if use_compile else model
    drop_last = use_compile or n % bs == 1                  # the trainer's rule (+ static shapes for compile)
    ours = data.DeviceLoader(bundle, "train", batch_size=bs, seed=0, device=device, channels_last=cl,
                             drop_last=drop_last)
    other_prefetch = 0 if ours.prefetch else 1
    ours_other = data.DeviceLoader(bundle, "train", batch_size=bs, seed=0, device=device, channels_last=cl,
                                   drop_last=drop_last, prefetch=other_prefetch)
    xc = xb.contiguous(memory_format=torch.channels_last) if cl else xb
    tw = warm_up(net, opt, xc, yb, amp=amp)
    if use_compile:
        print(f"torch.compile warm-up: {tw:.1f} s (not counted)")
    if not args.no_extra and not amp:       # the bf16 rows: their own model, so fp32 and bf16 weights evolve apart
        bf_model, bf_opt = make_model(device, channels_last=cl)
        bf_net = torch.compile(bf_model) if use_compile else bf_model
        warm_up(bf_net, bf_opt, xc, yb, amp=True)
    eb = min(args.eval_batch_size, n)
    test_loader = data.DeviceLoader(bundle, "train", batch_size=eb, augment=False, shuffle=False, seed=0,
                                    device=device, channels_last=cl)

    def pil_pass():
        seen = 0
        for xs, ys in pil_loader:
            xs, ys = xs.to(device, non_blocking=True), ys.to(device, non_blocking=True)
            seen += train.train_epoch(base_model, [(xs, ys)], base_opt)["images"]
        return seen

    def loader_only():
        return sum(len(xs) for xs, _ in ours)

    base_batches = [(xb, yb)] * (n // bs)
    our_batches = [(xc, yb)] * (n // bs)
    passes = {
        "PIL DataLoader (2 workers) + fp32 NCHW": pil_pass,
        "ours: DeviceLoader + " + layout + (" + compile" if use_compile else "") + (" + bf16" if amp else ""):
            lambda: train.train_epoch(net, ours, opt, amp=amp)["images"],
        "  compute only, fp32 NCHW": lambda: train.train_epoch(base_model, base_batches, base_opt)["images"],
        "  compute only, our model settings": lambda: train.train_epoch(net, our_batches, opt, amp=amp)["images"],
        "  our loader alone (no training)": loader_only,
    }
    if not args.no_extra:
        passes[f"ours, prefetch={other_prefetch}" + (" + bf16" if amp else "")] = \
            lambda: train.train_epoch(net, ours_other, opt, amp=amp)["images"]
        if not amp:
            passes["ours + bf16 autocast"] = lambda: train.train_epoch(bf_net, ours, bf_opt, amp=True)["images"]
            passes["  compute only, bf16 autocast"] = \
                lambda: train.train_epoch(bf_net, our_batches, bf_opt, amp=True)["images"]

        def eval_pass(a):
            train.evaluate(net, test_loader, amp=a)
            return n

        for a in (False, True):
            passes[f"  evaluation pass, batch {eb}" + (", bf16" if a else ", fp32")] = lambda a=a: eval_pass(a)
    # repeats in alternating order, so that both pipelines see the same load on a shared machine
    rates: dict[str, list[float]] = {k: [] for k in passes}
    names = list(passes)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            dt, seen = timed(passes[name], device)
            rates[name].append(seen / dt)
    width = max(map(len, names))
    print(f"images/s, median of {args.repeats} passes of {n} images (each pass listed):")
    for name in names:
        each = ", ".join(f"{v:.0f}" for v in rates[name])
        print(f"{name:<{width}}  {np.median(rates[name]):8.0f}   ({each})")
    print(f"speed-up: {np.median(rates[names[1]]) / np.median(rates[names[0]]):.2f}x")
    best = max(np.median(rates["  compute only, fp32 NCHW"]), np.median(rates["  compute only, our model settings"]))
    print(f"ceiling (best compute-only rate / PIL, i.e. data loading free): {best / np.median(rates[names[0]]):.2f}x")
    if "ours + bf16 autocast" in rates:
        print(f"speed-up with bf16: {np.median(rates['ours + bf16 autocast']) / np.median(rates[names[0]]):.2f}x")


if __name__ == "__main__":
    main()
