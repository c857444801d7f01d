"""Training masked networks with the paper's protocol (PAPER.md section 5),
resumably.

``train(model, masks, bundle, config, out_dir)`` trains with SGD (momentum,
optional Nesterov, weight decay) and a multi-step learning-rate schedule,
keeping pruned weights exactly zero. After every epoch it writes, atomically:

* ``out_dir/checkpoint.pt``: model, optimizer, scheduler, RNG states, epoch,
  metrics so far and a fingerprint of the run (config, seed, dataset, masks,
  initial weights). Rerunning after an interruption resumes from the last
  complete epoch; on CPU the result equals an uninterrupted run bit for bit.
* ``out_dir/history.csv``: one row per epoch: ``epoch, lr, train_loss,
  train_acc, test_loss, test_top1, test_top5, epoch_time`` (seconds).

At the end: ``out_dir/model.pt`` (final ``state_dict``) and
``out_dir/metrics.json`` (``test_top1, test_top5, test_loss, best_test_top1,
best_test_top5, best_epoch, train_loss, train_acc, epochs, density,
sparsity``): the ``test_*`` values are the final epoch's, the ``best_*`` ones
the epoch with the highest test top-1 (the first such; its top-5), what the
authors' training loop reports (epoch 0, the untrained network, with
``epochs: 0``). Accuracies are percentages (0-100) everywhere, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset, DeviceLoader
from .devices import resolve_device
from .files import atomic_torch_save, atomic_write_text
from .hashing import tensor_digest
from .masks import Masks, apply_masks, check_masks, enforce_masks_after_step, prunable_parameters
from .protocol import Train

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "epoch_time"]
OUTPUT_FILES = ("checkpoint.pt", "history.csv", "model.pt", "metrics.json")
CHECKPOINT_FORMAT = "ntksap-train-checkpoint"
CHECKPOINT_VERSION = 1
PROGRESS_MIN_BATCHES = 50   # show a per-epoch batch bar when an epoch has at least this many batches


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


def _execution(config: Train, device: torch.device) -> dict:
    """The execution-only choices of ``config`` for ``device``: channels_last,
    amp (bool; ``None``: on for CUDA with bf16 support) and compile."""
    amp = config.amp
    if amp is None:
        amp = bool(device.type == "cuda" and torch.cuda.is_bf16_supported())
    return {"channels_last": True if config.channels_last is None else config.channels_last,
            "amp": amp, "compile": config.compile}


# ==================================================================================
# steps
# ==================================================================================
def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp))


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, amp: bool = False,
                bar=None, max_batches: int | None = None) -> dict:
    """One pass of SGD over ``loader``; returns ``dict(loss, acc, images)``
    (mean cross-entropy, top-1 accuracy in %, images seen). ``model`` may be a
    ``torch.compile`` wrapper; ``bar`` a tqdm bar advanced per batch."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with _autocast(device, amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (out.detach().argmax(1) == y).sum()
        n += len(y)
        if bar is not None:
            bar.update(1)
    return {"loss": loss_sum.item() / max(n, 1), "acc": 100.0 * correct.item() / max(n, 1), "images": n}


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: bool = False) -> dict:
    """Mean cross-entropy and top-1 / top-5 accuracy (%) of ``model`` over
    ``loader`` (batches of (x, y)), in eval mode: ``dict(loss, top1, top5)``.
    With fewer than 5 classes, top-5 is top-k over all classes (100 %)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1 = torch.zeros((), dtype=torch.int64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y.view(-1, 1)
        c1 += hit[:, 0].sum()
        c5 += hit.any(dim=1).sum()
        n += len(y)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    return {"loss": loss_sum.item() / n, "top1": 100.0 * c1.item() / n, "top5": 100.0 * c5.item() / n}


# ==================================================================================
# fingerprints, checkpoints
# ==================================================================================
def _state_hash(model: nn.Module) -> str:
    """16 hex digits of the :func:`~ntksap.hashing.tensor_digest` of the model's state dict."""
    return tensor_digest(model.state_dict())[:16]


def fingerprint(model: nn.Module, masks: Masks | None, bundle: Dataset, config: Train, seed: int) -> dict:
    """What makes a run this run: compared on resume, field by field."""
    fp = {f"config.{k}": v for k, v in config.experiment().items()}
    fp.update({
        "seed": int(seed),
        "dataset": f"{bundle.name} train={bundle.num_train} test={bundle.num_test} "
                   f"labels={tensor_digest({'y': bundle.train_labels, 't': bundle.test_labels})[:16]}",
        "architecture": hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
                                       .encode()).hexdigest()[:16],
        "masks": "dense" if masks is None else tensor_digest(masks)[:16],
        "initial_weights": _state_hash(model),
    })
    return fp


def _describe_mismatch(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (``weights_only``); raises :class:`CheckpointError`
    naming the file when it is unreadable or not a training checkpoint."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or unreadable ({type(exc).__name__}: {exc}). It was left "
            f"untouched; move or delete it to start this run again from scratch.") from exc
    keys = {"format", "version", "epoch", "fingerprint", "model", "optimizer", "scheduler", "rng", "history"}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not keys <= set(state):
        raise CheckpointError(f"'{path}' is not an ntksap training checkpoint (format {CHECKPOINT_FORMAT} "
                              f"v{CHECKPOINT_VERSION}); it was left untouched. Move or delete it to start again.")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has version {state['version']}, this code reads "
                              f"{CHECKPOINT_VERSION}; move or delete it to start again.")
    return state


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _density(model: nn.Module, masks: Masks | None) -> float:
    """Fraction of prunable weights kept (1.0 for a dense run)."""
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    if masks is None or total == 0:
        return 1.0
    kept = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
    return kept / total


def _check_masked(model: nn.Module, masks: Masks | None) -> None:
    if masks is None:
        return
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params[name].detach()
        if bool((p[m.to(p.device) == 0] != 0).any()):
            raise RuntimeError(f"pruned weights of '{name}' are not zero after training (mask not enforced)")


def _write_outputs(out_dir: Path, model: nn.Module, history: list[dict], density: float,
                   final: bool, at_init: dict | None = None) -> pd.DataFrame:
    df = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    atomic_write_text(df.to_csv(index=False), out_dir / "history.csv")
    if final:
        atomic_torch_save(_cpu_state(model), out_dir / "model.pt")
        if history:
            last = history[-1]
        else:  # epochs == 0: the untrained model's test metrics
            last = {"epoch": 0, "test_top1": at_init["top1"], "test_top5": at_init["top5"],
                    "test_loss": at_init["loss"], "train_loss": float("nan"), "train_acc": float("nan")}
        best = max(history or [last], key=lambda r: r["test_top1"])  # the first epoch with the highest top-1
        metrics = {"test_top1": last["test_top1"], "test_top5": last["test_top5"], "test_loss": last["test_loss"],
                   "best_test_top1": best["test_top1"], "best_test_top5": best["test_top5"],
                   "best_epoch": int(best["epoch"]),
                   "train_loss": last["train_loss"], "train_acc": last["train_acc"], "epochs": int(last["epoch"]),
                   "density": density, "sparsity": 1.0 - density}
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        atomic_write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n", out_dir / "metrics.json")
    return df


# ==================================================================================
# the trainer
# ==================================================================================
def train(model: nn.Module, masks, dataset_bundle: Dataset, config: Train, out_dir, seed: int = 0,
          device=None, progress: bool = True, distributed=None) -> pd.DataFrame:
    """Train ``model`` (masked by ``masks``; ``None`` = dense) on
    ``dataset_bundle`` with ``config``; write checkpoints and metrics to
    ``out_dir`` (see the module docstring) and return the per-epoch history.

    The data order and augmentation of epoch ``e`` depend only on ``(seed, e)``.
    A compatible checkpoint in ``out_dir`` is resumed; a finished run is
    returned (its final weights loaded into ``model``) without retraining; a
    checkpoint of a different run (other config, seed, data, masks or initial
    weights) raises :class:`CheckpointError` listing the differences. The
    returned frame has ``attrs["resumed_from_epoch"]`` (0 for a fresh start).
    On return ``model`` holds the final weights, in eval mode, on ``device``.

    ``distributed``: ``None`` (one process) or a hook object such as
    :class:`ntksap.distributed.DDPHook` with ``world_size``, ``rank``,
    ``wrap(model) -> net``, ``shard(batches)`` (this rank's part of each global
    batch) and ``reduce(train_metrics) -> train_metrics``; only rank 0 writes.
    """
    if not isinstance(config, Train):
        raise ValueError(f"config must be an ntksap.params.Train (e.g. ntksap.params.protocol('digits')), "
                         f"got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer")
    if not isinstance(dataset_bundle, Dataset):
        raise ValueError(f"dataset_bundle must be an ntksap.data.Dataset, got {type(dataset_bundle).__name__}")
    if masks is not None:
        masks = masks if isinstance(masks, Masks) else Masks(masks)
        check_masks(model, masks)
    device = resolve_device(device)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    run = _execution(config, device)

    fp = fingerprint(model, masks, dataset_bundle, config, seed)
    writer = distributed is None or distributed.rank == 0
    if distributed is not None:
        fp["world_size"] = int(distributed.world_size)
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        saved = dict(state["fingerprint"])
        if saved.get("initial_weights") != fp["initial_weights"] and \
                state.get("final_weights") == fp["initial_weights"]:
            saved["initial_weights"] = fp["initial_weights"]   # this model already holds the result
        diff = _describe_mismatch(saved, fp)
        if diff:
            raise CheckpointError(f"checkpoint '{ckpt_path}' belongs to a different run; refusing to mix runs. "
                                  f"Differences: {'; '.join(diff)}. Use another out_dir, or move the old one.")

    for name in OUTPUT_FILES if writer else ():  # temporary files of writes cut short by a kill
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    model.to(device)
    if run["channels_last"]:
        model.to(memory_format=torch.channels_last)
    handle = apply_masks(model, masks) if masks is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)
    opt_hook = enforce_masks_after_step(opt, model, masks) if masks is not None else None
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
    history: list[dict] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history = [dict(r) for r in state["history"]]
        start = int(state["epoch"])
        if progress and start < config.epochs:
            tqdm.write(f"resuming '{out_dir}' from epoch {start}/{config.epochs}")

    n_train = dataset_bundle.num_train
    train_loader = DeviceLoader(dataset_bundle, "train", config.batch_size,
                                augment=None if config.augment else False, seed=seed, device=device,
                                drop_last=(n_train % config.batch_size == 1), channels_last=run["channels_last"],
                                num_workers=config.num_workers)
    test_loader = DeviceLoader(dataset_bundle, "test", config.eval_batch_size, augment=False, seed=seed,
                               device=device, channels_last=run["channels_last"], num_workers=config.num_workers)
    net = distributed.wrap(model) if distributed is not None else model
    net = torch.compile(net) if run["compile"] else net
    # evaluation runs without the DDP wrapper (no collectives; every rank sees the whole test set)
    eval_net = net if distributed is None else (torch.compile(model) if run["compile"] else model)
    density = _density(model, masks)

    try:
        show_batches = progress and len(train_loader) >= PROGRESS_MIN_BATCHES
        epochs = tqdm(range(start, config.epochs), desc=f"train {dataset_bundle.name}", initial=start,
                      total=config.epochs, disable=not progress or start >= config.epochs, unit="epoch")
        for epoch in epochs:
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            train_loader.set_epoch(epoch)
            with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}", leave=False, disable=not show_batches,
                      unit="batch") as bar:
                batches = distributed.shard(train_loader) if distributed is not None else train_loader
                tr = train_epoch(net, batches, opt, amp=run["amp"], bar=bar)
                if distributed is not None:
                    tr = distributed.reduce(tr)
            if not math.isfinite(tr["loss"]):
                raise FloatingPointError(f"training diverged: mean loss {tr['loss']} in epoch {epoch + 1} "
                                         f"(lr {lr}); the checkpoint of epoch {epoch} is kept")
            ev = evaluate(eval_net, test_loader, amp=run["amp"])
            sched.step()
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "test_loss": ev["loss"], "test_top1": ev["top1"], "test_top5": ev["top5"],
                   "epoch_time": time.perf_counter() - t0}
            history.append(row)
            ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
                    "fingerprint": fp, "model": _cpu_state(model), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history,
                    "final_weights": _state_hash(model) if epoch + 1 == config.epochs else None}
            if writer:
                atomic_torch_save(ckpt, ckpt_path)
                _write_outputs(out_dir, model, history, density, final=False)
            epochs.set_postfix(loss=f"{tr['loss']:.3f}", top1=f"{ev['top1']:.2f}")
        _check_masked(model, masks)
    finally:
        if handle is not None:
            handle.remove()
        if opt_hook is not None:
            opt_hook.remove()
    model.eval()
    finished_before = start >= config.epochs > 0
    if not writer or finished_before and all((out_dir / f).exists()
                                             for f in ("model.pt", "metrics.json", "history.csv")):
        df = pd.DataFrame(history, columns=HISTORY_COLUMNS)      # nothing to do: leave the files alone
    else:
        at_init = evaluate(eval_net, test_loader, amp=run["amp"]) if config.epochs == 0 else None
        df = _write_outputs(out_dir, model, history, density, final=True, at_init=at_init)
    df.attrs["resumed_from_epoch"] = start
    return df
