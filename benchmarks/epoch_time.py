"""Seconds per training epoch of ResNet-20 on CIFAR-10-shaped data, as the
trainer runs it: random uint8 images held on the device (50 000 train,
10 000 test), ``ntksap.data.DeviceLoader`` (crop + flip on the device),
batch 128, channels-last, bf16 autocast on CUDA, the trainer's own
``ntksap.train.train_epoch`` / ``evaluate`` (eval batch 500). One row per
variant:

* ``eager``: the model as it is;
* ``masked``: eager with an 89.26 % random mask applied the trainer's way
  (``apply_masks`` gradient hooks + ``enforce_masks_after_step``);
* ``compile``: ``torch.compile(model)``; its compile time is reported apart
  (first pass minus a timed pass), the first pass excluded;
* ``stacked``: K same-architecture networks trained at once through
  ``ntksap.stacked.stack(models, kind="grouped")`` (``engine(x)``: (B, C, H, W)
  -> (B, K, classes); loss = sum over k of cross_entropy(out[:, k], y); SGD over
  ``engine.parameters()``); per-network seconds = stacked epoch / K;
* ``stacked_masked``: the same with each member's own 89.26 % random mask,
  stacked with ``engine.stack_tensors`` and applied the trainer's way;
* opt-in, by ``--variants``: ``stacked_compile`` (``torch.compile(engine)``) and
  ``..._compile_graphs`` (``torch.compile(..., mode="reduce-overhead")``: the
  forward and backward replayed as CUDA graphs) of the one-network, masked and
  stacked rows.

Every variant runs one untimed pass (warm-up: cuDNN algorithm choice, the
device copy of the images, compilation) and then one timed pass over
``--images`` training and ``--test-images`` test images; the times are
extrapolated to a 50 000 / 10 000 image epoch. CUDA is timed with events
and synchronisation. With ``--images`` a multiple of 128 there is no partial
last batch, so the compile time leaves out the recompilation that a real
50 000-image epoch (last batch 80) triggers once.

    python benchmarks/epoch_time.py                              # a full epoch per variant
    python benchmarks/epoch_time.py --images 25600 --json t.json # 200 batches, extrapolated
    python benchmarks/epoch_time.py --device cpu --images 512 --compile off   # CPU smoke test

The JSON (``--json``) is rewritten after every row, so a run cut short keeps
the rows it finished; ``benchmarks/projected_hours.py --epoch-json`` reads it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EPOCH_TRAIN, EPOCH_TEST = 50_000, 10_000      # CIFAR-10
VARIANTS = ("eager", "stacked", "compile", "masked", "stacked_masked")  # the named three first, then the extras
# opt-in (``--variants``): torch.compile of the stacked engine, and mode="reduce-overhead" (CUDA graphs)
EXTRA_VARIANTS = ("compile_graphs", "masked_compile_graphs", "stacked_compile", "stacked_compile_graphs",
                  "stacked_masked_compile_graphs")
SPARSITY = 0.892626                           # the masked row's sparsity (1 - 0.8^10)


def import_trainer():
    """``ntksap.train``'s ``train_epoch`` and ``evaluate``, and a note. The
    module imports ``ntksap.protocol`` (pydantic) only for the ``Train`` config
    class that ``train()`` checks; where pydantic is missing a stand-in for
    that module is put in place so that the trainer's own step functions can
    still be measured (``train()`` itself is not used here)."""
    try:
        from ntksap.train import evaluate, train_epoch
        return train_epoch, evaluate, ""
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if "ntksap.protocol" in sys.modules or not missing.startswith(("pydantic", "annotated_types")):
            raise
    for name in [m for m in sys.modules if m == "ntksap.train"]:
        del sys.modules[name]
    stub = types.ModuleType("ntksap.protocol")
    stub.Train = type("Train", (), {})
    sys.modules["ntksap.protocol"] = stub
    from ntksap.train import evaluate, train_epoch
    return train_epoch, evaluate, (f"note: pydantic missing ({missing}); ntksap.train imported with a stand-in "
                                   f"for ntksap.protocol: its train_epoch/evaluate are the real ones")


class Clock:
    """Wall seconds (after synchronising) and, on CUDA, event-timed GPU seconds."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.e1.record()
            torch.cuda.synchronize(self.device)
            self.gpu = self.e0.elapsed_time(self.e1) / 1000.0
        else:
            self.gpu = None
        self.wall = time.perf_counter() - self.t0
        return False


def stacked_train_epoch(engine, loader, optimizer, k: int, amp: bool = False) -> dict:
    """``train_epoch`` for a stacked engine (output (B, K, classes)): one SGD
    step per batch on the sum over k of the networks' mean cross-entropies.
    That sum is computed as K x the mean over all B*K (row, network) pairs,
    which is the same number in one kernel instead of K."""
    engine.train()
    device = next(engine.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp)):
            out = engine(x)
            if n == 0 and (out.dim() != 3 or out.shape[:2] != (len(y), k)):
                raise RuntimeError(f"stacked engine returned shape {tuple(out.shape)}, "
                                   f"expected ({len(y)}, {k}, classes)")
            loss = F.cross_entropy(out.flatten(0, 1), y.repeat_interleave(k)) * k
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (out.detach().argmax(-1) == y.view(-1, 1)).sum(0)
        n += len(y)
    return {"loss": loss_sum.item() / max(n, 1) / k, "acc": (100.0 * correct / max(n, 1)).tolist(), "images": n}


@torch.no_grad()
def stacked_evaluate(engine, loader, k: int, amp: bool = False) -> dict:
    """``evaluate`` for a stacked engine: per-network loss and top-1 / top-5."""
    engine.eval()
    device = next(engine.parameters()).device
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    c1 = torch.zeros(k, dtype=torch.int64, device=device)
    c5 = torch.zeros(k, dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp)):
            out = engine(x)
        out = out.float()                                               # (B, K, C)
        loss_sum += F.cross_entropy(out.permute(0, 2, 1), y.view(-1, 1).expand(-1, k),
                                    reduction="none").sum(0).double()
        top = out.topk(min(5, out.shape[-1]), dim=-1).indices          # (B, K, 5)
        hit = top == y.view(-1, 1, 1)
        c1 += hit[..., 0].sum(0)
        c5 += hit.any(-1).sum(0)
        n += len(y)
    return {"loss": (loss_sum / n).tolist(), "top1": (100.0 * c1 / n).tolist(), "top5": (100.0 * c5 / n).tolist()}


def random_masks(model, sparsity: float, seed: int = 0) -> dict:
    from ntksap.masks import prunable_parameters

    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) >= sparsity).to(p.dtype)
            for n, p in prunable_parameters(model).items()}


def run_variant(variant: str, args, bundle, device, amp: bool, fns) -> dict:
    from ntksap import build_model, data

    train_epoch, evaluate = fns
    bs, k = args.batch_size, args.k
    n_train, n_test = bundle.num_train, bundle.num_test
    fmt = torch.channels_last if args.channels_last == "on" else torch.contiguous_format

    def loaders():
        tr = data.DeviceLoader(bundle, "train", bs, seed=0, device=device, drop_last=(n_train % bs == 1),
                               channels_last=args.channels_last == "on")
        te = data.DeviceLoader(bundle, "test", args.eval_batch_size, augment=False, seed=0, device=device,
                               channels_last=args.channels_last == "on")
        return tr, te

    def make(seed):
        torch.manual_seed(seed)
        return build_model("resnet20", 10).to(device).to(memory_format=fmt)

    row: dict = {"variant": variant}
    handles = []
    from ntksap.train import compiled   # loaded by import_trainer (with its stand-in where pydantic is missing)

    how = "reduce-overhead" if variant.endswith("_graphs") else "compile" in variant   # a Train.compile value

    if variant.startswith("stacked"):
        try:
            stacked = importlib.import_module("ntksap.stacked")
        except ImportError as exc:
            return {**row, "status": f"skipped: ntksap.stacked not available ({exc})"}
        members = [make(i) for i in range(k)]
        engine = stacked.stack(members, kind=args.stacked_kind)
        if isinstance(engine, torch.nn.Module):
            engine = engine.to(device)
        opt = torch.optim.SGD(engine.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        row.update(networks=k, kind=args.stacked_kind)
        if variant.startswith("stacked_masked"):
            from ntksap.masks import apply_masks, enforce_masks_after_step

            masks = engine.stack_tensors([random_masks(m, SPARSITY, seed=i) for i, m in enumerate(members)])
            handles = [apply_masks(engine, masks), enforce_masks_after_step(opt, engine, masks)]
            row["sparsity"] = SPARSITY
        del members
        net = compiled(engine, how)

        def one_pass(tr, te):
            with Clock(device) as c_tr:
                r = stacked_train_epoch(net, tr, opt, k, amp=amp)
            with Clock(device) as c_te:
                stacked_evaluate(net, te, k, amp=amp)
            return c_tr, c_te, r["images"]
    else:
        model = make(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        if variant.startswith("masked"):
            from ntksap.masks import apply_masks, enforce_masks_after_step

            masks = random_masks(model, SPARSITY)
            handles = [apply_masks(model, masks), enforce_masks_after_step(opt, model, masks)]
            row["sparsity"] = SPARSITY
        net = compiled(model, how)
        row["networks"] = 1

        def one_pass(tr, te):
            with Clock(device) as c_tr:
                r = train_epoch(net, tr, opt, amp=amp)
            with Clock(device) as c_te:
                evaluate(net, te, amp=amp)
            return c_tr, c_te, r["images"]

    try:
        tr, te = loaders()
        with Clock(device) as warm:
            one_pass(tr, te)
        c_tr, c_te, seen = one_pass(tr, te)
    finally:
        for h in handles:
            h.remove()
    train_s, test_s = c_tr.wall, c_te.wall
    epoch = train_s * EPOCH_TRAIN / seen + test_s * EPOCH_TEST / n_test
    row.update(status="ok", images=seen, test_images=n_test, warmup_s=warm.wall, train_s=train_s, eval_s=test_s,
               train_gpu_s=c_tr.gpu, eval_gpu_s=c_te.gpu, epoch_s=epoch, per_network_epoch_s=epoch / row["networks"],
               images_per_s=seen * row["networks"] / train_s)
    if how is not False:
        row.update(compile_s=max(warm.wall - (train_s + test_s), 0.0), compile_mode=how)
    return row


def describe(row: dict, eager: dict | None, masked: dict | None = None) -> str:
    name = row["variant"] + (f" (K={row['networks']})" if row["variant"].startswith("stacked") and "networks" in row
                             else "")
    if row.get("status") != "ok":
        return f"{name:<21s} {row.get('status')}"
    s = (f"{name:<21s} epoch {row['epoch_s']:8.2f} s   per network {row['per_network_epoch_s']:8.2f} s   "
         f"(timed pass: train {row['train_s']:.2f} s for {row['images']} images, eval {row['eval_s']:.2f} s for "
         f"{row['test_images']}; {row['images_per_s']:.0f} img/s)")
    if "compile" in row["variant"]:
        s += f"   compile {row['compile_s']:.1f} s (first pass {row['warmup_s']:.1f} s, not counted)"
    if eager is not None and eager.get("status") == "ok" and row is not eager:
        s += f"   speed-up vs eager {eager['per_network_epoch_s'] / row['per_network_epoch_s']:.2f}x"
    if masked is not None and masked.get("status") == "ok" and row["variant"].startswith("stacked_masked"):
        s += f" (vs masked {masked['per_network_epoch_s'] / row['per_network_epoch_s']:.2f}x)"
    return s


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--images", type=int, default=EPOCH_TRAIN, help="training images per timed pass (default 50000)")
    ap.add_argument("--test-images", type=int, default=None, help="test images per timed pass (default images / 5)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=500, help="the trainer's default eval batch (500)")
    ap.add_argument("--k", type=int, default=9, help="networks in the stacked row (default 9: one curve's sparsities)")
    ap.add_argument("--stacked-kind", choices=["grouped", "lockstep"], default="grouped",
                    help="ntksap.stacked engine of the stacked rows (default grouped)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="include the torch.compile row (auto: on for CUDA, off on a CPU)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast (auto: as the trainer, on for CUDA with bf16)")
    ap.add_argument("--channels-last", choices=["on", "off"], default="on", help="as the trainer (default on)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file (after every row)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("images", "batch_size", "eval_batch_size", "k"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; use a positive integer")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
    if bad:
        raise SystemExit(f"--variants: {bad} not allowed; use a subset of {','.join(VARIANTS + EXTRA_VARIANTS)}")

    from ntksap import data
    from ntksap.devices import resolve_device

    device = resolve_device(args.device)
    if args.compile == "off" or (args.compile == "auto" and device.type != "cuda"):
        variants = [v for v in variants if "compile" not in v]
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    train_epoch, evaluate, note = import_trainer()
    n_test = args.test_images or max(args.images // 5, 1)
    g = torch.Generator().manual_seed(0)
    u8 = dict(dtype=torch.uint8, generator=g)
    bundle = data.from_tensors("cifar10", torch.randint(0, 256, (args.images, 3, 32, 32), **u8),
                               torch.randint(0, 10, (args.images,), generator=g),
                               torch.randint(0, 256, (n_test, 3, 32, 32), **u8),
                               torch.randint(0, 10, (n_test,), generator=g))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    head = (f"ResNet-20, random uint8 CIFAR-10-shaped images on the device: {args.images} train / {n_test} test per "
            f"timed pass (extrapolated to {EPOCH_TRAIN} / {EPOCH_TEST}), batch {args.batch_size}, eval batch "
            f"{args.eval_batch_size}, channels-last {args.channels_last}, bf16 autocast {'on' if amp else 'off'}; "
            f"device {device}{' (' + gpu + ')' if gpu else ''}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads")
    print(head, flush=True)
    if note:
        print(note, flush=True)
    result = {"device": str(device), "gpu": gpu, "torch": torch.__version__, "images": args.images,
              "test_images": n_test, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
              "k": args.k, "amp": amp, "channels_last": args.channels_last == "on", "epoch_images": EPOCH_TRAIN,
              "epoch_test_images": EPOCH_TEST, "rows": {}}
    write_json(args.json, result)
    failed = 0
    for v in variants:
        try:
            row = run_variant(v, args, bundle, device, amp, (train_epoch, evaluate))
        except Exception as exc:  # noqa: BLE001  (one variant failing must not stop the others)
            traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            row = {"variant": v, "status": f"failed: {type(exc).__name__}: {first}"}
            failed += 1
        result["rows"][v] = row
        write_json(args.json, result)
        print(describe(row, result["rows"].get("eager"), result["rows"].get("masked")), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
