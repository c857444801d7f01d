"""The train stage: every pruned network of every run of one seed trained from its original init.

Training runs (and resumes) in ``checkpoints/<run>-<seed>/<tag>-<key>/``; the finished run's weights,
metrics and history (without timings) are published to ``train/seed-<s>/<run>/``, the seconds per epoch to
``timings/train/seed-<s>.csv``. A run whose networks finished before (same masks, init, protocol and
trainer code: the same keys) is published from its checkpoints without training again.
``train.processes > 1`` trains under ``torchrun`` with DistributedDataParallel (:mod:`ntksap.distributed`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .. import layout
from ..checks import not_allowed
from ..experiment import load_dataset, new_model
from ..files import atomic_write_text
from . import by_run

if TYPE_CHECKING:
    from ..params import Params, Train

TRAINER_MODULES = ("ntksap.train", "ntksap.distributed")
"""The modules a training run executes (with what they import): their source is part of the resume key."""
TIMING_COLUMNS = ("epoch_time",)
"""Columns of the trainer's ``history.csv`` that measure time: they go to the timings file, not the results."""


def resume_key(fingerprint: dict, processes: int, code: str | None = None) -> str:
    """16 hex digits naming one training run: a hash of the trainer's
    fingerprint (``ntksap.train.fingerprint``: config, seed, dataset, masks,
    initial weights), the number of processes and the source of the code that
    trains (:data:`TRAINER_MODULES` and the modules they import,
    ``ntksap.code_deps.source_digest``). A changed parameter or a changed line
    of training code gives a new key, so a stale checkpoint is never resumed,
    republished or overwritten. ``code``: that digest, when the caller has it
    already (:func:`train_run` reads the sources once for all sparsities)."""
    from ..code_deps import source_digest

    code = code if code is not None else source_digest(list(TRAINER_MODULES))
    return _key({"fingerprint": fingerprint, "processes": int(processes), "code": code})


def _key(obj) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_processes(processes: int | str, device=None) -> int:
    """``train.processes`` as a number for this machine (``auto``: one per
    visible GPU, 1 on a CPU); refuses a count that cannot run here, before
    any work."""
    import torch

    from ..devices import resolve_device

    device = resolve_device(device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if processes == "auto":
        return max(gpus, 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise not_allowed("train.processes", processes, "an integer >= 1 or 'auto'")
    if processes > 1 and device.type == "cuda" and processes > gpus:
        raise ValueError(f"train.processes={processes} is not allowed here: DistributedDataParallel runs one "
                         f"process per GPU and this machine has {gpus}; use at most that many, or 'auto'")
    return processes


def stack_kind(tc: Train, models: list, bundle, device=None) -> str | None:
    """How the train stage trains the K networks of one run and seed
    (``train.stack``): ``grouped`` or ``lockstep`` (:func:`ntksap.train.train_stacked`),
    or ``None``, one after another: for ``off``, for a single network, and for
    ``auto`` where the K do not fit in memory (:func:`ntksap.stacked.fits`;
    the reason is printed). ``auto`` is ``grouped`` on CUDA, ``lockstep`` on a
    CPU, where grouped convolutions are slower than K dense ones
    (``benchmarks/epoch_time.py``)."""
    from ..devices import resolve_device
    from ..stacked import fits

    if tc.stack == "off" or len(models) < 2:
        return None
    if tc.stack != "auto":
        return tc.stack
    device = resolve_device(device)
    kind = "grouped" if device.type == "cuda" else "lockstep"
    ok, why = fits(models[0], len(models), tc.batch_size, tuple(bundle.input_shape), device, kind)
    if not ok:
        print(f"train.stack=auto: training one network at a time: {why}", flush=True)
        return None
    return kind


def group_key(kind: str, keys: list[str]) -> str:
    """16 hex digits naming one stacked training: its kind and its members' :func:`resume_key` s, in order."""
    return _key({"kind": kind, "members": keys})


def _published_columns() -> list[str]:
    """The columns of a published ``history.csv``: the trainer's, less :data:`TIMING_COLUMNS`."""
    from ..train import HISTORY_COLUMNS

    return [c for c in HISTORY_COLUMNS if c not in TIMING_COLUMNS]


def _evaluate_at_init(model, masks, bundle, tc: Train, seed: int, out_dir: Path, device=None) -> None:
    """``train.epochs: 0``: evaluate the masked network at its init; writes
    ``metrics.json`` and an empty ``history.csv`` into ``out_dir``."""
    from ..data import DeviceLoader
    from ..devices import resolve_device
    from ..masks import apply_masks
    from ..train import evaluate

    device = resolve_device(device)
    model.to(device)
    apply_masks(model, masks, hooks=False)
    ev = evaluate(model, DeviceLoader(bundle, "test", tc.eval_batch_size, augment=False, seed=seed, device=device,
                                      num_workers=tc.num_workers))
    metrics = {"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"],
               "best_test_top1": ev["top1"], "best_test_top5": ev["top5"], "best_epoch": 0,  # best = final: no epochs
               "epochs": 0, "density": masks.density, "sparsity": masks.sparsity}
    atomic_write_text(json.dumps(metrics, indent=1) + "\n", out_dir / "metrics.json")
    atomic_write_text(pd.DataFrame(columns=_published_columns()).to_csv(index=False), out_dir / "history.csv")


def torchrun_command(cfg: Params, processes: int, masks: list[Path], init: Path, train_json: Path, seed: int,
                     out_dir: Path, device=None, kind: str | None = None, names: list[str] | None = None) -> list[str]:
    """The ``torchrun`` command line (``python -m torch.distributed.run``) that
    trains the pruned network(s) of ``masks`` with ``processes`` DDP processes on
    this machine, several stacked as ``kind`` into ``out_dir/<names[k]>``; the
    dataset is found where this machine keeps it (:mod:`ntksap.locations`)."""
    import sys

    from ..locations import dataset_location

    where = dataset_location(cfg.dataset)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "ntksap.distributed", "--masks", *map(str, masks), "--init", str(init), "--model", cfg.model,
           "--dataset", cfg.dataset, "--train-config", str(train_json), "--seed", str(seed),
           "--out-dir", str(out_dir), "--data-root", str(where["root"]), "--no-progress"]
    if where.get("local_path"):
        cmd += ["--local-path", str(where["local_path"])]
    if not where.get("download", True):
        cmd.append("--no-download")
    if device is not None:
        cmd += ["--device", str(device).split(":")[0]]
    if kind is not None:
        cmd += ["--stack", kind, "--names", *names]
    return cmd


def _train_distributed(cfg: Params, processes: int, masks: list[Path], init: Path, tc: Train, seed: int,
                       out_dir: Path, device=None, kind: str | None = None, names: list[str] | None = None) -> None:
    """Train the pruned network(s) of ``masks`` with ``torchrun`` and ``processes``
    DDP processes into ``out_dir`` (``ntksap.distributed``; several: stacked as
    ``kind``, member ``k`` in ``out_dir/<names[k]>``); its output is printed
    (so it lands in the executed notebook); a failure raises with its tail."""
    import subprocess
    import sys

    import ntksap

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(tc.model_dump(mode="json"), indent=1) + "\n", out_dir / "train_config.json")
    env = dict(os.environ)
    package_root = str(Path(ntksap.__file__).resolve().parents[1])   # the same ntksap in every process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    cmd = torchrun_command(cfg, processes, masks, init, out_dir / "train_config.json", seed, out_dir, device,
                           kind, names)
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = proc.stdout[-6000:]
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training ({processes} processes) failed with exit code {proc.returncode}; "
                           f"its checkpoint in '{out_dir}' is kept for a resume. Output:\n{tail}")
    sys.stdout.write(tail)


def _without_timings(csv_text: str) -> str:
    """A CSV text without its :data:`TIMING_COLUMNS`, every other cell exactly
    as written (no float is parsed and printed again)."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(csv_text)))
    keep = [i for i, name in enumerate(rows[0]) if name not in TIMING_COLUMNS] if rows else []
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([row[i] for i in keep] for row in rows)
    return out.getvalue()


def _publish(src: Path, dst: Path) -> pd.DataFrame:
    """Publish the finished run in its resume folder ``src`` to the stage
    output ``dst`` (each file atomically): ``history.csv`` without
    :data:`TIMING_COLUMNS`, ``metrics.json`` and ``model.pt`` as they are.
    Returns the timings (epoch and :data:`TIMING_COLUMNS`)."""
    from ..files import atomic_copy

    history = (src / "history.csv").read_text()
    atomic_write_text(_without_timings(history), dst / "history.csv")
    for name in ("metrics.json", "model.pt"):
        atomic_copy(src / name, dst / name)
    return pd.read_csv(src / "history.csv", usecols=["epoch", *TIMING_COLUMNS])


def train_run(cfg: Params, run: str, seed: int, masks_dir: str | os.PathLike, out_dir: str | os.PathLike,
              device=None, progress: bool = False, checkpoints: str | os.PathLike | None = None,
              timings: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every pruned network of one run and seed from its original init;
    returns (results, history). :func:`_train_run` says what it reads and writes."""
    return _train_run(cfg, run, seed, masks_dir, out_dir, device, progress, checkpoints, timings)[:2]


def _train_run(cfg: Params, run: str, seed: int, masks_dir: str | os.PathLike, out_dir: str | os.PathLike,
               device=None, progress: bool = False, checkpoints: str | os.PathLike | None = None,
               timings: str | os.PathLike | None = None,
               code: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train every pruned network of one run and seed from its original init.

    Reads ``masks_dir`` (``init.pt``, ``masks.csv``, ``<tag>.pt``), trains with
    the experiment's protocol (``cfg.train``) and writes ``out_dir/<tag>/``
    (``history.csv``, ``metrics.json``, ``model.pt``), ``results.csv`` (one row
    per sparsity, the final metrics) and ``history.csv`` (per epoch and
    sparsity); the seconds per epoch go to ``timings`` when it is given
    (sparsity, epoch, epoch_time; :func:`train_seed` writes them), not into
    the histories. With ``train.epochs: 0`` the networks are only evaluated at
    init. Returns (results, history, timings). ``code``: the trainer's source
    digest (:func:`resume_key`), when the caller has it already.

    Training happens in ``checkpoints/<tag>-<key>/`` (default
    :func:`ntksap.layout.checkpoints_dir`; ``key``: :func:`resume_key`), where
    the trainer writes its checkpoint after every epoch: a run stopped by
    anything, ``dvc repro`` included, resumes there from its last epoch, and a
    finished one is not trained again. ``train.processes > 1`` trains each
    network with DistributedDataParallel under ``torchrun`` (:mod:`ntksap.distributed`).
    """
    import torch

    from ..code_deps import source_digest
    from ..masks import Masks
    from ..train import fingerprint, train, train_stacked

    src, out = Path(masks_dir), Path(out_dir)
    tc = cfg.train
    processes = resolve_processes(tc.processes, device)
    resume_root = Path(checkpoints) if checkpoints is not None else layout.checkpoints_dir(cfg, run, seed)
    bundle = load_dataset(cfg)
    init = torch.load(src / "init.pt", map_location="cpu", weights_only=True)
    rows = list(pd.read_csv(src / "masks.csv").itertuples())
    code = code or (source_digest(list(TRAINER_MODULES)) if tc.epochs else None)
    results, histories, times = [], [], []
    models, masks = [], [Masks.load(src / row.path) for row in rows]
    for _ in rows:
        models.append(new_model(cfg, bundle.num_classes, seed))
        models[-1].load_state_dict(init)
    if tc.epochs == 0:
        for model, mk, row in zip(models, masks, rows):
            _evaluate_at_init(model, mk, bundle, tc, seed, out / row.tag, device)
    else:
        keys = [resume_key(fingerprint(m, mk, bundle, tc, seed), processes, code) for m, mk in zip(models, masks)]
        kind = stack_kind(tc, models, bundle, device)
        tags = [row.tag for row in rows]
        if kind is not None:
            work = resume_root / f"{kind}{len(rows)}-{group_key(kind, keys)}"
            works = [work / tag for tag in tags]
            if processes > 1:
                _train_distributed(cfg, processes, [src / row.path for row in rows], src / "init.pt", tc, seed,
                                   work, device, kind=kind, names=tags)
            else:
                train_stacked(models, masks, bundle, tc, work, names=tags, seed=seed, kind=kind, device=device,
                              progress=progress)
        else:
            works = [resume_root / f"{tag}-{key}" for tag, key in zip(tags, keys)]
            for model, mk, row, work in zip(models, masks, rows, works):
                if processes > 1:
                    _train_distributed(cfg, processes, [src / row.path], src / "init.pt", tc, seed, work, device)
                else:
                    train(model, mk, bundle, tc, work, seed=seed, device=device, progress=progress)
        for row, work in zip(rows, works):
            epoch_times = _publish(work, out / row.tag)
            epoch_times.insert(0, "sparsity", row.sparsity)
            times.append(epoch_times)
    for row in rows:
        metrics = json.loads((out / row.tag / "metrics.json").read_text())
        results.append({"sparsity": row.sparsity, "tag": row.tag, "density": row.density,
                        **{k: v for k, v in metrics.items() if k not in ("density", "sparsity")}})
        hist = pd.read_csv(out / row.tag / "history.csv") if tc.epochs else pd.DataFrame(columns=_published_columns())
        hist.insert(0, "sparsity", row.sparsity)
        histories.append(hist)
    res, hist = pd.DataFrame(results), pd.concat(histories, ignore_index=True)
    spent = pd.concat(times, ignore_index=True) if times else pd.DataFrame(columns=["sparsity", "epoch",
                                                                                   *TIMING_COLUMNS])
    if timings is not None:
        atomic_write_text(spent.to_csv(index=False), Path(timings))
    atomic_write_text(hist.to_csv(index=False), out / "history.csv")
    atomic_write_text(res.to_csv(index=False), out / "results.csv")
    return res, hist, spent


def train_seed(cfg: Params, seed: int, masks_dir: str | os.PathLike | None = None,
               out_dir: str | os.PathLike | None = None, device=None, progress: bool = False,
               timings: str | os.PathLike | None = None, workers: int | None = None,
               checkpoints: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train stage of one seed: :func:`train_run` for every run of the
    experiment, reading ``masks_dir/<run>`` (default
    :func:`ntksap.layout.stage_dir` ``("masks", cfg, seed)``) and writing
    ``out_dir/<run>`` (default ``stage_dir("train", cfg, seed)``); the seconds
    per epoch of every run go to ``timings`` (default
    :func:`ntksap.layout.timings_path`; columns run, sparsity, epoch,
    epoch_time). The runs go to ``workers`` processes (default: one per CPU
    core a run leaves idle, :func:`ntksap.parallel.default_workers`; one with
    ``train.processes`` > 1; the same results bit for bit). Run ``r`` trains
    in ``checkpoints/<r>-<seed>/`` (default :func:`ntksap.layout.checkpoints_dir`).
    Returns (results, history) of every run in ``params.yaml`` order, with a
    ``run`` column first."""
    from ..code_deps import source_digest
    from ..parallel import resolve_workers, run_all

    workers = resolve_workers(workers, device, len(cfg.runs))
    if resolve_processes(cfg.train.processes, device) > 1:
        workers = 1  # each run is a torchrun launch of its own processes
    masks_root = Path(masks_dir) if masks_dir is not None else layout.stage_dir("masks", cfg, seed)
    out_root = Path(out_dir) if out_dir is not None else layout.stage_dir("train", cfg, seed)
    timings = Path(timings) if timings is not None else layout.timings_path("train", cfg, seed)
    runs = list(cfg.runs)
    code = source_digest(list(TRAINER_MODULES)) if cfg.train.epochs else None  # read once for every run
    done = run_all(_train_run, [((cfg, run, seed, masks_root / run, out_root / run),
                                 {"device": device, "progress": progress and workers == 1, "code": code,
                                  "checkpoints": None if checkpoints is None else
                                  Path(checkpoints) / layout.run_name(run, seed)})
                                for run in runs], workers)
    results, histories, spent = ({run: d[k] for run, d in zip(runs, done)} for k in range(3))
    atomic_write_text(by_run(spent).to_csv(index=False), timings)
    return by_run(results), by_run(histories)
