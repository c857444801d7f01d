"""Multi-process training with PyTorch DistributedDataParallel (DDP).

Launch one process per device with ``torchrun``::

    torchrun --nproc_per_node 2 -m ntksap.distributed \\
        --masks mask.pt --model digits_cnn --dataset digits --out-dir runs/ddp --epochs 15

Semantics (``ntksap.train.train`` with a :class:`DDPHook`):

* Every rank builds the same initial model (same ``--init-seed``); DDP also
  broadcasts rank 0's weights. The masks are read by rank 0 and broadcast, and
  a SHA-256 of the masks is all-gathered and compared: a mismatch stops the run.
* Each global batch of ``batch_size`` images (the same order and augmentation as
  a one-process run: they depend only on ``(seed, epoch)``) is split into
  ``world_size`` contiguous shards (``torch.tensor_split``: sizes differ by at
  most one), like ``DistributedSampler`` applied per batch. DDP averages the
  per-rank mean gradients, which equals the one-process gradient when the
  shards are equally large (``batch_size`` and the last batch divisible by
  ``world_size``).
* BatchNorm statistics are per rank (per shard), as in plain DDP: ``SyncBatchNorm``
  needs a GPU, so it is used (``--sync-bn``) only on CUDA. With BatchNorm the
  result therefore differs slightly from a one-process run; without it the two
  agree to float rounding (see ``tests/test_ddp.py``).
* Training loss / accuracy are summed over ranks (``all_reduce``); the test set
  is evaluated whole on every rank. Only rank 0 writes ``out_dir`` (atomic
  checkpoints, history, model, metrics); rerunning resumes, as in one process.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .hashing import tensor_digest
from .masks import Masks


class DDPHook:
    """What :func:`ntksap.train.train` needs to run under DDP (its
    ``distributed=`` argument). Requires an initialised process group."""

    def __init__(self, device: torch.device | None = None, sync_bn: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("DDPHook: torch.distributed is not initialised (launch with torchrun)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device, self.sync_bn = device, sync_bn

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` (already on its device) wrapped in ``DistributedDataParallel``."""
        if self.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, batches):
        """This rank's contiguous part of each global batch ``(x, y)``."""
        for x, y in batches:
            yield torch.tensor_split(x, self.world_size)[self.rank], torch.tensor_split(y, self.world_size)[self.rank]

    def reduce(self, metrics: dict) -> dict:
        """Per-rank ``dict(loss, acc, images)`` -> the same over all ranks."""
        n = metrics["images"]
        t = torch.tensor([metrics["loss"] * n, metrics["acc"] * n, float(n)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        total = max(t[2].item(), 1.0)
        return {"loss": t[0].item() / total, "acc": t[1].item() / total, "images": int(t[2].item())}


def broadcast_masks(masks: Masks | None) -> Masks:
    """Rank 0's ``masks`` on every rank (others pass ``None``), checked by an
    all-gather of their :func:`~ntksap.hashing.tensor_digest`; raises ``RuntimeError`` on a mismatch."""
    box = [None if masks is None else {n: m.cpu() for n, m in masks.items()}]
    dist.broadcast_object_list(box, src=0)       # CPU tensors only; no user pickles are loaded
    got = Masks(box[0])
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, tensor_digest(got))
    if len(set(digests)) != 1:
        raise RuntimeError(f"masks differ between ranks: digests {digests}")
    return got


def _epochs(text: str) -> int | float:
    """A milestone on the command line: ``2`` stays an int, ``0.5`` is a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ntksap.distributed",
                                description="Train a saved mask with DistributedDataParallel "
                                            "(launch with: torchrun --nproc_per_node N -m ntksap.distributed ...).")
    p.add_argument("--masks", required=True, nargs="+",
                   help="mask file(s) written by Masks.save; several train stacked (--stack), one folder each")
    p.add_argument("--stack", default="lockstep", choices=["lockstep", "grouped"],
                   help="how several networks train at once (ntksap.train.train_stacked)")
    p.add_argument("--names", nargs="+", default=None,
                   help="folder names of several networks under --out-dir (default: the mask files' stems)")
    p.add_argument("--model", required=True, help="model name (ntksap.MODELS)")
    p.add_argument("--dataset", required=True, help="dataset name (ntksap.data.DATASETS)")
    p.add_argument("--out-dir", required=True, help="run folder (checkpoints, history.csv, model.pt, metrics.json)")
    p.add_argument("--data-root", default="data", help="dataset cache folder")
    p.add_argument("--local-path", default=None, help="a local copy of the dataset (archive or folder)")
    p.add_argument("--no-download", action="store_true", help="a missing dataset is an error, not a download")
    p.add_argument("--init", default=None,
                   help="state dict (torch.save, e.g. a prune stage's init.pt) to start from, instead of --init-seed")
    p.add_argument("--train-config", default=None,
                   help="JSON file of ntksap.params.Train fields over the dataset's protocol "
                        "(the train stage writes Train.model_dump())")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the protocol's global batch size")
    p.add_argument("--milestones", type=_epochs, nargs="*", default=None,
                   help="override the lr milestones (epochs; fractions fall at the nearest batch)")
    p.add_argument("--train-subset", type=int, default=None, help="use this many random training images")
    p.add_argument("--test-subset", type=int, default=None, help="use this many random test images")
    p.add_argument("--seed", type=int, default=0, help="data order / augmentation seed")
    p.add_argument("--init-seed", type=int, default=0, help="torch.manual_seed before building the model")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="cpu, or cuda (one GPU per rank: cuda:LOCAL_RANK); default cuda when available")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl on CUDA, else gloo)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (CUDA only)")
    p.add_argument("--timeout", type=float, default=600, help="collective timeout in seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (rank 0 shows them otherwise)")
    return p


def main(argv=None) -> dict:
    """Entry point; returns (and rank 0 prints as one JSON line) the final metrics."""
    from . import build_model, data, train
    from .allocator import keep_freed_memory
    from .protocol import protocol

    args = _parser().parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("ntksap.distributed: launch with torchrun (RANK / WORLD_SIZE are not set)")
    keep_freed_memory()  # a process of ours: freed memory kept for the next step (ntksap.allocator)
    cuda = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device=cuda but CUDA is not available; use --device cpu")
    backend = args.backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"--backend={backend!r} is not allowed; use gloo or nccl")
    if args.sync_bn and not cuda:
        raise ValueError("--sync-bn needs CUDA (SyncBatchNorm does not run on a CPU)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s): use at most that many "
                         f"processes per node, or --device cpu")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    try:
        rank = dist.get_rank()
        def load():
            return data.get_dataset(args.dataset, root=args.data_root, local_path=args.local_path,
                                    download=not args.no_download)

        bundle = load() if rank == 0 else None
        dist.barrier()                                       # rank 0 downloads / caches first
        if rank != 0:
            bundle = load()
        if args.train_subset or args.test_subset:
            bundle = data.subset(bundle, train=args.train_subset, test=args.test_subset, seed=args.seed)
        models = []
        for _ in args.masks:
            torch.manual_seed(args.init_seed)
            models.append(build_model(args.model, bundle.num_classes))
            if args.init is not None:                        # every rank reads it; DDP also broadcasts rank 0's
                models[-1].load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        masks = [broadcast_masks(Masks.load(path) if rank == 0 else None) for path in args.masks]
        over = json.loads(Path(args.train_config).read_text()) if args.train_config else {}
        over.update({k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size,
                                       "milestones": None if args.milestones is None else tuple(args.milestones)
                                       }.items() if v is not None})
        config = protocol(args.dataset, **over)
        hook = DDPHook(device, sync_bn=args.sync_bn)
        show = rank == 0 and not args.no_progress
        out = Path(args.out_dir)
        if len(models) == 1:
            train.train(models[0], masks[0], bundle, config, out, seed=args.seed, device=device, progress=show,
                        distributed=hook)
            folders = [out]
        else:
            names = args.names or [Path(m).stem for m in args.masks]
            if len(names) != len(models):
                raise ValueError(f"--names has {len(names)} entries for {len(models)} --masks; give one per mask")
            train.train_stacked(models, masks, bundle, config, out, names=names, seed=args.seed, kind=args.stack,
                                device=device, progress=show, distributed=hook)
            folders = [out / n for n in names]
        dist.barrier()                                       # rank 0's files are complete
        metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
        if rank == 0:
            for mk, m in zip(masks, metrics):
                print(json.dumps({"world_size": hook.world_size, "masks_sha256": tensor_digest(mk), **m}),
                      flush=True)
        return metrics[0] if len(metrics) == 1 else metrics
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
