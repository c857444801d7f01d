"""Training masked networks with the paper's protocol (PAPER.md section 5),
resumably.

``train(model, masks, bundle, config, out_dir)`` trains with SGD (momentum,
optional Nesterov, weight decay) and a multi-step learning-rate schedule
counted in batches (a milestone of 0.5 epochs drops the lr mid-epoch; whole
epochs fall exactly at an epoch's end), keeping pruned weights exactly zero. After every epoch it writes, atomically:

* ``out_dir/checkpoint.pt``: model, optimizer, scheduler, RNG states, epoch,
  metrics so far and a fingerprint of the run (config, seed, dataset, masks,
  initial weights). Rerunning after an interruption resumes from the last
  complete epoch; on CPU the result equals an uninterrupted run bit for bit.
* ``out_dir/history.csv``: one row per epoch: ``epoch, lr`` (at the epoch's
  start), ``train_loss, train_acc, test_loss, test_top1, test_top5,
  epoch_time`` (seconds).

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
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset, DeviceLoader
from .devices import channels_last_is_safe, native_bf16, resolve_device
from .files import atomic_torch_save, atomic_write_text
from .hashing import tensor_digest
from .masks import Masks, apply_masks, check_masks, enforce_masks_after_step, prunable_parameters
from .protocol import Train

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "epoch_time"]
OUTPUT_FILES = ("checkpoint.pt", "history.csv", "model.pt", "metrics.json")
CHECKPOINT_FORMAT = "ntksap-train-checkpoint"
CHECKPOINT_VERSION = 3   # 3: the lr schedule steps per batch (fractional milestones)
PROGRESS_MIN_BATCHES = 50   # show a per-epoch batch bar when an epoch has at least this many batches


STACK_KINDS = ("lockstep", "grouped")
"""How :func:`train_stacked` runs its K networks (:func:`ntksap.stacked.stack`)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


def _execution(config: Train, device: torch.device, models: list[nn.Module] = ()) -> dict:
    """The execution-only choices of ``config`` for ``device`` and ``models``:
    channels_last (``None``: on, unless :func:`ntksap.devices.channels_last_is_safe`
    says otherwise for one of ``models``), amp (bool; ``None``: on for CUDA with
    bf16 support) and compile. Warns
    when ``amp`` is asked for on a device without bf16 hardware
    (:func:`ntksap.devices.native_bf16`): it works there, but slowly."""
    amp = config.amp
    if amp is None:
        amp = bool(device.type == "cuda" and native_bf16(device))
    elif amp and not native_bf16(device):
        warnings.warn(f"train.amp=True on {device}, which has no bf16 hardware (AVX-512 BF16 or AMX on a CPU): "
                      "bf16 autocast is emulated there and training runs many times slower than in float32 "
                      "(11x for ResNet-20 on an AVX2 CPU); set train.amp to null or false", stacklevel=2)
    channels_last = config.channels_last
    if channels_last is None:
        channels_last = all(channels_last_is_safe(m, device) for m in models)
    return {"channels_last": channels_last,
            "amp": amp, "compile": config.compile}


def compiled(module: nn.Module, how: bool | str) -> nn.Module:
    """``module`` as ``Train.compile`` asks: itself (False), ``torch.compile(module)``
    (True) or ``torch.compile(module, mode="reduce-overhead")`` (CUDA graphs)."""
    if how is False:
        return module
    return torch.compile(module, mode="reduce-overhead") if how == "reduce-overhead" else torch.compile(module)


# ==================================================================================
# steps
# ==================================================================================
def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp))


def _members(out: torch.Tensor) -> torch.Tensor:
    """Outputs as (B, K, classes): a stacked engine's as they are, one network's (B, classes) as K = 1."""
    return out if out.dim() == 3 else out.unsqueeze(1)


def _per_member(rows: list[dict], stacked: bool):
    return rows if stacked else rows[0]


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, amp: bool = False,
                bar=None, max_batches: int | None = None, scheduler=None):
    """One pass of SGD over ``loader``; returns ``dict(loss, acc, images)``
    (mean cross-entropy, top-1 accuracy in %, images seen). ``model`` may be a
    ``torch.compile`` wrapper; ``bar`` a tqdm bar advanced per batch;
    ``scheduler`` an lr scheduler counted in batches, stepped after each. A stacked
    engine (:mod:`ntksap.stacked`: outputs (B, K, classes)) minimises the sum of
    its K members' mean losses, so each member gets its own gradient; then one
    dict per member is returned, in a list."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = correct = None
    n, stacked = 0, False
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with _autocast(device, amp):
            raw = model(x)
            out = _members(raw)
            losses = torch.stack([F.cross_entropy(out[:, k], y) for k in range(out.shape[1])])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if loss_sum is None:
            stacked = raw.dim() == 3
            loss_sum = torch.zeros(out.shape[1], dtype=torch.float64, device=device)
            correct = torch.zeros(out.shape[1], dtype=torch.int64, device=device)
        loss_sum += losses.detach().double() * len(y)
        correct += (out.detach().argmax(2) == y.view(-1, 1)).sum(0)
        n += len(y)
        if bar is not None:
            bar.update(1)
    if loss_sum is None:
        return _per_member([{"loss": 0.0, "acc": 0.0, "images": 0}], False)
    rows = [{"loss": ls / max(n, 1), "acc": 100.0 * c / max(n, 1), "images": n}
            for ls, c in zip(loss_sum.tolist(), correct.tolist())]
    return _per_member(rows, stacked)


def milestone_steps(milestones, steps_per_epoch: int) -> list[int]:
    """Milestones in epochs (``Train.milestones``; fractions allowed) -> the
    optimizer steps after which the lr is multiplied by gamma: ``round(m x
    steps_per_epoch)`` (halves up), at least 1. An integer milestone m falls
    exactly at the end of epoch m, as an epoch-counted schedule; 0.5 mid-epoch."""
    return [max(1, math.floor(m * steps_per_epoch + 0.5)) for m in milestones]


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: bool = False):
    """Mean cross-entropy and top-1 / top-5 accuracy (%) of ``model`` over
    ``loader`` (batches of (x, y)), in eval mode: ``dict(loss, top1, top5)``
    (one per member, in a list, for a stacked engine's (B, K, classes) outputs).
    With fewer than 5 classes, top-5 is top-k over all classes (100 %)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = c1 = c5 = None
    n, stacked = 0, False
    for x, y in loader:
        with _autocast(device, amp):
            raw = model(x)
        out = _members(raw).float()
        if loss_sum is None:
            stacked, k = raw.dim() == 3, out.shape[1]
            loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
            c1 = torch.zeros(k, dtype=torch.int64, device=device)
            c5 = torch.zeros(k, dtype=torch.int64, device=device)
        loss_sum += torch.stack([F.cross_entropy(out[:, j], y, reduction="sum") for j in range(k)]).double()
        top = out.topk(min(5, out.shape[2]), dim=2).indices          # (B, K, 5)
        hit = top == y.view(-1, 1, 1)
        c1 += hit[:, :, 0].sum(0)
        c5 += hit.any(dim=2).sum(0)
        n += len(y)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    rows = [{"loss": ls / n, "top1": 100.0 * a / n, "top5": 100.0 * b / n}
            for ls, a, b in zip(loss_sum.tolist(), c1.tolist(), c5.tolist())]
    return _per_member(rows, stacked)


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
    keys = {"format", "version", "epoch", "kind", "members", "optimizer", "scheduler", "rng"}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not keys <= set(state):
        raise CheckpointError(f"'{path}' is not an ntksap training checkpoint (format {CHECKPOINT_FORMAT} "
                              f"v{CHECKPOINT_VERSION}); it was left untouched. Move or delete it to start again.")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has version {state['version']}, this code reads "
                              f"{CHECKPOINT_VERSION}; move or delete it to start again.")
    return state


def _cpu_copy(state: dict) -> dict:
    """Detached, contiguous CPU copies of the tensors of ``state``."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _cpu_state(model: nn.Module) -> dict:
    return _cpu_copy(model.state_dict())


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


def _write_outputs(out_dir: Path, state: dict, history: list[dict], density: float,
                   final: bool, at_init: dict | None = None) -> pd.DataFrame:
    """``history.csv`` and, when ``final``, ``model.pt`` (``state``) and ``metrics.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    atomic_write_text(df.to_csv(index=False), out_dir / "history.csv")
    if final:
        atomic_torch_save(state, out_dir / "model.pt")
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
def _check_inputs(config, seed, dataset_bundle) -> None:
    if not isinstance(config, Train):
        raise ValueError(f"config must be an ntksap.params.Train (e.g. ntksap.params.protocol('digits')), "
                         f"got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer")
    if not isinstance(dataset_bundle, Dataset):
        raise ValueError(f"dataset_bundle must be an ntksap.data.Dataset, got {type(dataset_bundle).__name__}")


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
    return _train([model], [masks], dataset_bundle, config, Path(out_dir), [Path(out_dir)], None, seed, device,
                  progress, distributed)[0]


def train_stacked(models, masks, dataset_bundle: Dataset, config: Train, out_dir, names=None, seed: int = 0,
                  kind: str = "lockstep", device=None, progress: bool = True, distributed=None) -> list[pd.DataFrame]:
    """Train K networks of one architecture (``models``, each masked by its
    entry of ``masks``; ``None`` = dense) at once, in lock-step on the same
    batches: what :func:`train` does for each, with one data pipeline, one
    optimizer over all K and one checkpoint, ``out_dir/checkpoint.pt``, after
    every epoch. Member ``k``'s ``history.csv``, ``model.pt`` and
    ``metrics.json`` go to ``out_dir/<names[k]>/`` (default names ``0 .. K-1``).

    ``kind`` (:data:`STACK_KINDS`, :func:`ntksap.stacked.stack`): ``lockstep``
    runs the K networks in turn on each batch, bit-identical on a CPU to
    training them one by one with :func:`train`; ``grouped`` runs them as one
    network with K-grouped convolutions and batched products (one launch per
    layer instead of K on a GPU), equal to one by one to float rounding.
    Resume, refusal of a different run, the finished-run shortcut and
    ``distributed`` are as in :func:`train`; a checkpoint of another ``kind``
    is refused. Returns one history per member; on return each model holds its
    final weights, in eval mode, on ``device``."""
    models = list(models)
    masks = list(masks) if masks is not None else [None] * len(models)
    if not models:
        raise ValueError("models=[] is not allowed: pass at least one network")
    if len(masks) != len(models):
        raise ValueError(f"masks has {len(masks)} entries for {len(models)} models; pass one per model (None: dense)")
    if kind not in STACK_KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; allowed: {list(STACK_KINDS)}")
    names = [str(k) for k in range(len(models))] if names is None else [str(n) for n in names]
    if len(names) != len(models) or len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise ValueError(f"names={names!r} is not allowed: {len(models)} distinct folder names, one per model")
    out_dir = Path(out_dir)
    return _train(models, masks, dataset_bundle, config, out_dir, [out_dir / n for n in names], kind, seed,
                  device, progress, distributed)


def _engine(models: list[nn.Module], kind: str | None) -> nn.Module:
    """One network (``kind=None``: K = 1) or the K as one module (:func:`ntksap.stacked.stack`)."""
    if kind is None:
        return models[0]
    from .stacked import stack

    return stack(models, kind=kind)


def _member_states(engine: nn.Module, kind: str | None) -> list[dict]:
    return [_cpu_state(engine)] if kind is None else [_cpu_copy(st) for st in engine.member_states()]


def _load_member_states(engine: nn.Module, kind: str | None, states: list[dict]) -> None:
    if kind is None:
        engine.load_state_dict(states[0])
    else:
        engine.load_member_states(states)


def _train(models, masks_list, dataset_bundle: Dataset, config: Train, work: Path, dirs: list[Path],
           kind: str | None, seed: int, device, progress: bool, distributed) -> list[pd.DataFrame]:
    """The trainer of :func:`train` (``kind=None``, one model) and :func:`train_stacked`:
    checkpoint in ``work``, member ``k``'s outputs in ``dirs[k]``."""
    _check_inputs(config, seed, dataset_bundle)
    masks_list = [m if m is None or isinstance(m, Masks) else Masks(m) for m in masks_list]
    for model, masks in zip(models, masks_list):
        if masks is not None:
            check_masks(model, masks)
    device = resolve_device(device)
    ckpt_path = work / "checkpoint.pt"
    run = _execution(config, device, models)

    fps = [fingerprint(m, mk, dataset_bundle, config, seed) for m, mk in zip(models, masks_list)]
    writer = distributed is None or distributed.rank == 0
    if distributed is not None:
        for fp in fps:
            fp["world_size"] = int(distributed.world_size)
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        if state["kind"] != kind or len(state["members"]) != len(models):
            raise CheckpointError(f"checkpoint '{ckpt_path}' holds {len(state['members'])} network(s) trained as "
                                  f"{state['kind'] or 'one network'}, this call trains {len(models)} as "
                                  f"{kind or 'one network'}; refusing to mix runs. Use another out_dir.")
        diff = []
        for k, (member, fp) in enumerate(zip(state["members"], fps)):
            saved = dict(member["fingerprint"])
            if saved.get("initial_weights") != fp["initial_weights"] and \
                    member.get("final_weights") == fp["initial_weights"]:
                saved["initial_weights"] = fp["initial_weights"]   # this model already holds the result
            diff += [(f"network {k}: " if len(models) > 1 else "") + d for d in _describe_mismatch(saved, fp)]
        if diff:
            raise CheckpointError(f"checkpoint '{ckpt_path}' belongs to a different run; refusing to mix runs. "
                                  f"Differences: {'; '.join(diff)}. Use another out_dir, or move the old one.")

    for folder in {work, *dirs} if writer else ():  # temporary files of writes cut short by a kill
        for name in OUTPUT_FILES:
            for tmp in folder.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
    for model in models:
        model.to(device)
        if run["channels_last"]:
            model.to(memory_format=torch.channels_last)
    densities = [_density(m, mk) for m, mk in zip(models, masks_list)]
    engine = _engine(models, kind)
    if run["channels_last"]:
        engine.to(memory_format=torch.channels_last)
    masked = any(mk is not None for mk in masks_list)
    if not masked:
        engine_masks = None
    elif kind is None:
        engine_masks = masks_list[0]
    else:
        engine_masks = engine.stack_tensors([mk if mk is not None else Masks.ones_like(m)
                                             for m, mk in zip(models, masks_list)])
    handle = apply_masks(engine, engine_masks) if masked else None
    opt = torch.optim.SGD(engine.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)
    opt_hook = enforce_masks_after_step(opt, engine, engine_masks) if masked else None
    histories: list[list[dict]] = [[] for _ in models]
    start = 0
    if state is not None:
        _load_member_states(engine, kind, [m["model"] for m in state["members"]])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        histories = [[dict(r) for r in m["history"]] for m in state["members"]]
        start = int(state["epoch"])
        if progress and start < config.epochs:
            tqdm.write(f"resuming '{work}' from epoch {start}/{config.epochs}")

    n_train = dataset_bundle.num_train
    train_loader = DeviceLoader(dataset_bundle, "train", config.batch_size,
                                augment=None if config.augment else False, seed=seed, device=device,
                                drop_last=(n_train % config.batch_size == 1), channels_last=run["channels_last"],
                                num_workers=config.num_workers)
    test_loader = DeviceLoader(dataset_bundle, "test", config.eval_batch_size, augment=False, seed=seed,
                               device=device, channels_last=run["channels_last"], num_workers=config.num_workers)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestone_steps(config.milestones, len(train_loader)),
                                                 gamma=config.gamma)
    if state is not None:
        sched.load_state_dict(state["scheduler"])
    net = distributed.wrap(engine) if distributed is not None else engine
    net = compiled(net, run["compile"])
    # evaluation runs without the DDP wrapper (no collectives; every rank sees the whole test set)
    eval_net = net if distributed is None else compiled(engine, run["compile"])

    def as_list(metrics):
        return metrics if isinstance(metrics, list) else [metrics]

    try:
        show_batches = progress and len(train_loader) >= PROGRESS_MIN_BATCHES
        what = f"train {dataset_bundle.name}" + (f" x{len(models)} ({kind})" if kind else "")
        epochs = tqdm(range(start, config.epochs), desc=what, initial=start,
                      total=config.epochs, disable=not progress or start >= config.epochs, unit="epoch")
        for epoch in epochs:
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            train_loader.set_epoch(epoch)
            with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}", leave=False, disable=not show_batches,
                      unit="batch") as bar:
                batches = distributed.shard(train_loader) if distributed is not None else train_loader
                trs = as_list(train_epoch(net, batches, opt, amp=run["amp"], bar=bar, scheduler=sched))
                if distributed is not None:
                    trs = [distributed.reduce(tr) for tr in trs]
            for k, tr in enumerate(trs):
                if not math.isfinite(tr["loss"]):
                    raise FloatingPointError(f"training diverged: mean loss {tr['loss']} in epoch {epoch + 1} "
                                             f"(lr {lr}{f', network {k}' if len(trs) > 1 else ''}); the "
                                             f"checkpoint of epoch {epoch} is kept")
            evs = as_list(evaluate(eval_net, test_loader, amp=run["amp"]))
            seconds = time.perf_counter() - t0
            for history, tr, ev in zip(histories, trs, evs):
                history.append({"epoch": epoch + 1, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                                "test_loss": ev["loss"], "test_top1": ev["top1"], "test_top5": ev["top5"],
                                "epoch_time": seconds})
            states = _member_states(engine, kind)
            last = epoch + 1 == config.epochs
            ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1, "kind": kind,
                    "members": [{"fingerprint": fp, "model": st, "history": h,
                                 "final_weights": tensor_digest(st)[:16] if last else None}
                                for fp, st, h in zip(fps, states, histories)],
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()}
            if writer:
                atomic_torch_save(ckpt, ckpt_path)
                for d, st, h, dens in zip(dirs, states, histories, densities):
                    _write_outputs(d, st, h, dens, final=False)
            epochs.set_postfix(loss=f"{trs[0]['loss']:.3f}", top1=f"{evs[0]['top1']:.2f}")
        if kind == "grouped":
            for model, st in zip(models, engine.member_states()):
                model.load_state_dict(st)
        for model, masks in zip(models, masks_list):
            _check_masked(model, masks)
    finally:
        if handle is not None:
            handle.remove()
        if opt_hook is not None:
            opt_hook.remove()
    for model in models:
        model.eval()
    finished_before = start >= config.epochs > 0
    frames = []
    at_init = as_list(evaluate(eval_net, test_loader, amp=run["amp"])) if config.epochs == 0 and writer else None
    for k, (model, d, history, dens) in enumerate(zip(models, dirs, histories, densities)):
        if not writer or finished_before and all((d / f).exists() for f in ("model.pt", "metrics.json",
                                                                             "history.csv")):
            df = pd.DataFrame(history, columns=HISTORY_COLUMNS)      # nothing to do: leave the files alone
        else:
            df = _write_outputs(d, _cpu_state(model), history, dens, final=True,
                                at_init=at_init[k] if at_init else None)
        df.attrs["resumed_from_epoch"] = start
        frames.append(df)
    return frames
