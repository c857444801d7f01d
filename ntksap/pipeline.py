"""What the pipeline's notebooks call: where every result lives, the work of
one prune or train stage (one run and seed, every sparsity), and loading all
results of an experiment into DataFrames and figures.

Layout of ``results/<experiment>/`` (``dvc.yaml`` writes the same paths)::

    params.ok                        the check stage passed
    prune/<run>-<seed>/              prune.ipynb (executed), init.pt (the original init),
                                     masks/<tag>.pt, masks.csv, density.csv, track.csv, scores.csv
    train/<run>-<seed>/              train.ipynb, <tag>/ (model.pt, history.csv, metrics.json),
                                     results.csv, history.csv
    checkpoints/<run>-<seed>/        <tag>-<key>/: where training runs and resumes (checkpoint.pt after
                                     every epoch); not a DVC output, so `dvc repro` after an interruption
                                     resumes instead of starting over; safe to delete to free space
    spectrum/                        spectrum.ipynb, eigenvalues.csv, summary.csv, ntk_spectrum.png/pdf
    plots/                           plot.ipynb, accuracy.csv, table.md/csv, figures (png, pdf),
                                     accuracy/<run>.csv and curves/<run>.csv for `dvc plots`
    metrics.json                     mean test accuracy per run and sparsity, final and best over epochs
                                     (`dvc metrics show`)

``<tag>`` names a sparsity: 0.981986 -> ``sp98_20`` (percent, two decimals).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import DENSE, Params
from .files import atomic_write_text

RESULTS = "results"


# -- places ---------------------------------------------------------------------------
def find_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root: the nearest folder at or above ``start`` (default:
    the working directory) holding ``dvc.yaml``."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above '{here}': run from inside the ntksap repository")


def chdir_root() -> Path:
    """``cd`` to the repository root (a notebook opened from any folder then
    finds params.yaml and results/ by their pipeline paths)."""
    root = find_root()
    os.chdir(root)
    return root


def setup() -> Path:
    """What every notebook does first: ``cd`` to the repository root, a
    seaborn-like matplotlib style (without importing seaborn, which costs
    seconds per notebook), and on the CPU one torch thread per process unless
    ``OMP_NUM_THREADS`` says otherwise (the quick experiment's tensors are
    small; with a second thread a busy machine made them 20-70x slower in our
    measurements, as waiting OpenMP threads spin for a core)."""
    import matplotlib.pyplot as plt
    import torch

    root = chdir_root()
    plt.style.use("seaborn-v0_8-whitegrid")
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=COLORS)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return root


COLORS = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133",
          "#56b4e9"]
"""seaborn's ``colorblind`` palette."""


def sparsity_tag(sparsity: float) -> str:
    """File-name tag of a sparsity in percent: 0.981986 -> ``sp98_20``."""
    return "sp" + f"{100 * sparsity:05.2f}".replace(".", "_")


def sparsity_label(sparsity: float) -> str:
    """Axis label of a sparsity in percent, as the paper writes it: ``98.20``."""
    return f"{100 * sparsity:.2f}"


def results_dir(cfg: Params) -> Path:
    return Path(RESULTS) / cfg.experiment


def prune_dir(cfg: Params, run: str, seed: int) -> Path:
    return results_dir(cfg) / "prune" / f"{run}-{seed}"


def train_dir(cfg: Params, run: str, seed: int) -> Path:
    return results_dir(cfg) / "train" / f"{run}-{seed}"


def spectrum_dir(cfg: Params) -> Path:
    return results_dir(cfg) / "spectrum"


def plots_dir(cfg: Params) -> Path:
    return results_dir(cfg) / "plots"


# -- shared pieces ----------------------------------------------------------------------
def load_dataset(cfg: Params):
    """The experiment's dataset bundle (``ntksap.data.get_dataset``)."""
    from .data import get_dataset

    return get_dataset(cfg.dataset, root=cfg.data.root, local_path=cfg.data.local_path, download=cfg.data.download)


def new_model(cfg: Params, num_classes: int, seed: int):
    """The experiment's network with the init of ``seed`` (the same for every run)."""
    import torch

    from .models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg.model, num_classes)


def probe_inputs(bundle, n: int, seed: int = 0):
    """``n`` test inputs (a fixed random subset, normalised as in training) to
    probe the NTK with: float32 (n, C, H, W) on the CPU."""
    import torch

    from .data import normalise

    g = torch.Generator().manual_seed(10_000 + seed)
    n = min(n, bundle.num_test)
    idx = torch.randperm(bundle.num_test, generator=g)[:n]
    if bundle.on_disk:  # ImageNet: read and transform a few validation images
        return torch.stack([bundle.test_set[i][0] for i in idx.tolist()])
    return normalise(bundle, bundle.test_images[idx])


def prune_kwargs(cfg: Params, run: str, seed: int, input_shape, data=None, device=None) -> dict:
    """Keyword arguments of :func:`ntksap.prune` for one run of the experiment
    (``None`` settings are the method's paper defaults)."""
    r = cfg.runs[run]
    return dict(input_shape=tuple(input_shape), data=data, iterations=r.iterations, rounds=r.rounds,
                epsilon=r.epsilon, num_samples=cfg.prune.num_samples, batch_size=cfg.prune.batch_size, seed=seed,
                scope=cfg.prune.scope, schedule=cfg.prune.schedule, redraw=r.weights == "redraw",
                noise_inputs=r.inputs == "noise", bn_mode=r.bn_mode, count_rule=cfg.prune.count_rule,
                device=device, progress=False, apply=False)


# -- the prune stage -------------------------------------------------------------------------
@dataclass
class PruneResult:
    """Frames the prune stage writes (also as CSV files in its folder)."""

    masks: pd.DataFrame    # sparsity, tag, path, kept, numel, density, seconds
    density: pd.DataFrame  # sparsity, name, shape, numel, kept, density (one row per layer, plus 'total')
    track: pd.DataFrame    # sparsity, iteration, density, trace, max, min, condition (NTK snapshots)
    track_spectra: pd.DataFrame  # sparsity, iteration, density, index, eigenvalue (spectrum mode only)
    scores: pd.DataFrame   # sparsity, left, right, pruned, kept: histogram of the last iteration's scores


def _score_histogram(scores: dict, previous: dict | None, masks: dict, bins: int = 60) -> pd.DataFrame:
    """Histogram of the scores of the weights alive before the last iteration,
    split into kept and pruned by the final masks (log-spaced bins when all
    scores are >= 0)."""
    import torch

    alive = torch.cat([(previous[n] if previous is not None else torch.ones_like(masks[n])).reshape(-1) != 0
                       for n in masks])
    s = torch.cat([scores[n].reshape(-1).double() for n in masks])[alive]
    kept = torch.cat([masks[n].reshape(-1) for n in masks])[alive] != 0
    if (s >= 0).all() and (s > 0).any():
        positive = s > 0
        lo, hi = s[positive].min().log10().item(), s[positive].max().log10().item()
        edges = torch.logspace(lo, hi + 1e-9 if hi > lo else lo + 1, bins + 1, dtype=torch.float64)
        s = s.clamp(min=edges[0].item())  # zero scores fall in the first bin
    else:
        lo, hi = s.min().item(), s.max().item()
        edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(s, edges[1:-1])
    pruned = torch.bincount(idx[~kept], minlength=bins)
    kept_c = torch.bincount(idx[kept], minlength=bins)
    return pd.DataFrame({"left": edges[:-1].numpy(), "right": edges[1:].numpy(),
                         "pruned": pruned.numpy(), "kept": kept_c.numpy()})


def prune_run(cfg: Params, run: str, seed: int, out_dir: str | os.PathLike, device=None) -> PruneResult:
    """Prune one run and seed at every sparsity of the experiment, from one
    original init, recording NTK snapshots while pruning (``prune.track``).

    Writes into ``out_dir``: ``init.pt`` (the network's weights before pruning),
    ``masks/<tag>.pt`` (:meth:`Masks.save`), ``masks.csv``, ``density.csv``,
    ``track.csv``, ``track_spectra.csv``, ``scores.csv``; returns the same frames.
    Snapshots are taken before pruning (iteration 0), after iteration 1, every
    ``prune.track.every`` iterations and after the last.
    """
    from .data import prune_batches, prune_loader, resolve_device
    from .files import atomic_torch_save
    from .masks import Masks
    from .pruning import prune
    from .scores import METHODS

    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    bundle = load_dataset(cfg)
    method = cfg.runs[run].method
    model = new_model(cfg, bundle.num_classes, seed)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(init, out / "init.pt")
    model.to(device)  # the NTK snapshots run where the model is
    needs_data = (method in METHODS and METHODS[method].needs_data) or cfg.runs[run].inputs == "data"
    data = None
    if needs_data and cfg.prune.prune_set == "random":  # the authors' way: new order and crops every pass, on CPU
        data = prune_loader(bundle, per_class=cfg.prune.per_class, batch_size=cfg.prune.batch_size, seed=seed)
    elif needs_data:  # balanced: class-balanced, fixed, unaugmented
        data = prune_batches(bundle, per_class=cfg.prune.per_class, batch_size=cfg.prune.batch_size, seed=seed,
                             device="cpu")  # prune() moves one batch at a time to the scoring device
    track = cfg.prune.track
    probe = probe_inputs(bundle, track.inputs, seed) if track.mode != "none" else None
    rows, dens, tracks, spectra, hists = [], [], [], [], []
    final = cfg.runs[run].iterations or (METHODS[method].iterations if method in METHODS else 0)
    for sparsity in cfg.pruned_sparsities(run):
        model.load_state_dict(init)
        tag = sparsity_tag(sparsity)
        start = time.perf_counter()
        recorder = None
        if probe is not None:
            from . import ntk

            recorder = ntk.SpectrumRecorder(model, probe, every=track.every, mode=track.mode)
            recorder.record(0, None)  # the dense network
        state = {"previous": None, "last": None}

        def callback(iteration, masks, scores, state=state, recorder=recorder):
            state["previous"], state["last"] = state["last"], (masks, scores)
            if recorder is not None and (iteration % track.every == 0 or iteration in (1, final)):
                recorder.record(iteration, masks)

        if method == DENSE:
            masks = Masks.ones_like(model)
        else:
            masks = prune(model, method, sparsity, callback=callback,
                          **prune_kwargs(cfg, run, seed, bundle.input_shape, data, device))
        seconds = time.perf_counter() - start
        masks.save(out / "masks" / f"{tag}.pt")
        rows.append({"sparsity": sparsity, "tag": tag, "path": f"masks/{tag}.pt", "kept": masks.kept,
                     "numel": masks.numel, "density": masks.density, "seconds": seconds})
        rep = masks.report(model, tuple(bundle.input_shape))
        rep.insert(0, "sparsity", sparsity)
        rep["shape"] = rep["shape"].map(lambda s: "x".join(map(str, s)) if s is not None else "")
        dens.append(rep)
        if recorder is not None:
            tracks.append(recorder.summary().assign(sparsity=sparsity))
            if track.mode == "spectrum":
                spectra.append(recorder.frame().assign(sparsity=sparsity))
        if state["last"] is not None:
            prev = state["previous"][0] if state["previous"] is not None else None
            hists.append(_score_histogram(state["last"][1], prev, masks).assign(sparsity=sparsity))

    def frame(parts):
        if not parts:
            return pd.DataFrame()
        f = pd.concat(parts, ignore_index=True)
        return f[["sparsity", *[c for c in f.columns if c != "sparsity"]]]

    result = PruneResult(pd.DataFrame(rows), pd.concat(dens, ignore_index=True), frame(tracks), frame(spectra),
                         frame(hists))
    for name in ("density", "track", "track_spectra", "scores", "masks"):  # masks.csv last: a complete stage
        atomic_write_text(getattr(result, name).to_csv(index=False), out / f"{name}.csv")
    return result


# -- the train stage --------------------------------------------------------------------------
def train_config(cfg: Params):
    """The trainer's config (``ntksap.train.TrainConfig``): the dataset's
    protocol (``train.PROTOCOLS``) with the values of ``params.yaml: train``
    (all but ``processes``, which says how many processes run it)."""
    import dataclasses

    from .train import protocol

    values = dataclasses.asdict(cfg.train)
    values.pop("processes")
    return protocol(cfg.dataset, **values)


def checkpoints_dir(cfg: Params, run: str, seed: int) -> Path:
    """Where the train stage keeps its resumable runs, outside DVC's outputs
    (DVC deletes a stage's outputs before running it again)."""
    return results_dir(cfg) / "checkpoints" / f"{run}-{seed}"


def resume_key(fingerprint: dict, processes: int) -> str:
    """16 hex digits naming one training run: a hash of the trainer's
    fingerprint (``ntksap.train.fingerprint``: config, seed, dataset, masks,
    initial weights) and the number of processes. A changed parameter gives a
    new key, so a stale checkpoint is never resumed or overwritten."""
    import hashlib

    text = json.dumps({"fingerprint": fingerprint, "processes": int(processes)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _evaluate_at_init(model, masks, bundle, tc, seed: int, out_dir: Path, device=None) -> None:
    """``train.epochs: 0``: evaluate the masked network at its init; writes
    ``metrics.json`` and an empty ``history.csv`` into ``out_dir``."""
    from .data import DeviceLoader, resolve_device
    from .masks import apply_masks
    from .train import HISTORY_COLUMNS, evaluate

    device = resolve_device(device)
    model.to(device)
    apply_masks(model, masks, hooks=False)
    ev = evaluate(model, DeviceLoader(bundle, "test", tc.eval_batch_size, augment=False, seed=seed, device=device,
                                      num_workers=tc.num_workers))
    metrics = {"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"],
               "best_test_top1": ev["top1"], "best_test_top5": ev["top5"], "best_epoch": 0,  # best = final: no epochs
               "epochs": 0, "density": masks.density, "sparsity": masks.sparsity}
    atomic_write_text(json.dumps(metrics, indent=1) + "\n", out_dir / "metrics.json")
    atomic_write_text(pd.DataFrame(columns=HISTORY_COLUMNS).to_csv(index=False), out_dir / "history.csv")


def resolve_processes(processes: int | str, device=None) -> int:
    """``train.processes`` as a number for this machine (``auto``: one per
    visible GPU, 1 on a CPU); refuses a count that cannot run here, before
    any work."""
    import torch

    from .data import resolve_device

    device = resolve_device(device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if processes == "auto":
        return max(gpus, 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"train.processes={processes!r} is not allowed; use an integer >= 1 or 'auto'")
    if processes > 1 and device.type == "cuda" and processes > gpus:
        raise ValueError(f"train.processes={processes} is not allowed here: DistributedDataParallel runs one "
                         f"process per GPU and this machine has {gpus}; use at most that many, or 'auto'")
    return processes


def torchrun_command(cfg: Params, processes: int, masks: Path, init: Path, train_json: Path, seed: int,
                     out_dir: Path, device=None) -> list[str]:
    """The ``torchrun`` command line (``python -m torch.distributed.run``) that
    trains one pruned network with ``processes`` DDP processes on this machine."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "ntksap.distributed", "--masks", str(masks), "--init", str(init), "--model", cfg.model,
           "--dataset", cfg.dataset, "--train-config", str(train_json), "--seed", str(seed),
           "--out-dir", str(out_dir), "--data-root", str(cfg.data.root), "--no-progress"]
    if cfg.data.local_path:
        cmd += ["--local-path", str(cfg.data.local_path)]
    if not cfg.data.download:
        cmd.append("--no-download")
    if device is not None:
        cmd += ["--device", str(device).split(":")[0]]
    return cmd


def _train_distributed(cfg: Params, processes: int, masks: Path, init: Path, tc, seed: int, out_dir: Path,
                       device=None) -> None:
    """Train one pruned network with ``torchrun`` and ``processes`` DDP
    processes into ``out_dir`` (``ntksap.distributed``); its output is printed
    (so it lands in the executed notebook); a failure raises with its tail."""
    import dataclasses
    import subprocess
    import sys

    import ntksap

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(dataclasses.asdict(tc), indent=1) + "\n", out_dir / "train_config.json")
    env = dict(os.environ)
    package_root = str(Path(ntksap.__file__).resolve().parents[1])   # the same ntksap in every process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    cmd = torchrun_command(cfg, processes, masks, init, out_dir / "train_config.json", seed, out_dir, device)
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = proc.stdout[-6000:]
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training ({processes} processes) failed with exit code {proc.returncode}; "
                           f"its checkpoint in '{out_dir}' is kept for a resume. Output:\n{tail}")
    sys.stdout.write(tail)


def _publish(src: Path, dst: Path) -> None:
    """Copy the finished run's files from its resume folder ``src`` into the
    stage output ``dst`` (each file atomically)."""
    from .files import atomic_copy

    for name in ("history.csv", "metrics.json", "model.pt"):
        atomic_copy(src / name, dst / name)


def train_run(cfg: Params, run: str, seed: int, prune_dir: str | os.PathLike, out_dir: str | os.PathLike,
              device=None, progress: bool = False,
              checkpoints: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every pruned network of one run and seed from its original init.

    Reads ``prune_dir`` (``init.pt``, ``masks.csv``, ``masks/``), trains with
    :func:`train_config` and writes ``out_dir/<tag>/`` (``history.csv``,
    ``metrics.json``, ``model.pt``), ``results.csv`` (one row per sparsity,
    the final metrics) and ``history.csv`` (per epoch and sparsity). With
    ``train.epochs: 0`` the networks are only evaluated at init. Returns
    (results, history).

    Training happens in ``checkpoints/<tag>-<key>/`` (default
    :func:`checkpoints_dir`; ``key``: :func:`resume_key`), where the trainer
    writes its checkpoint after every epoch: a run stopped by anything,
    ``dvc repro`` included, resumes there from its last epoch, and a finished
    one is not trained again. ``train.processes > 1`` trains each network with
    DistributedDataParallel under ``torchrun`` (:mod:`ntksap.distributed`).
    """
    import torch

    from .masks import Masks
    from .train import HISTORY_COLUMNS, fingerprint, train

    src, out = Path(prune_dir), Path(out_dir)
    processes = resolve_processes(cfg.train.processes, device)
    resume_root = Path(checkpoints) if checkpoints is not None else checkpoints_dir(cfg, run, seed)
    bundle = load_dataset(cfg)
    tc = train_config(cfg)
    init = torch.load(src / "init.pt", map_location="cpu", weights_only=True)
    manifest = pd.read_csv(src / "masks.csv")
    results, histories = [], []
    for row in manifest.itertuples():
        model = new_model(cfg, bundle.num_classes, seed)
        model.load_state_dict(init)
        masks = Masks.load(src / row.path)
        if tc.epochs == 0:
            _evaluate_at_init(model, masks, bundle, tc, seed, out / row.tag, device)
        else:
            work = resume_root / f"{row.tag}-{resume_key(fingerprint(model, masks, bundle, tc, seed), processes)}"
            if processes > 1:
                _train_distributed(cfg, processes, src / row.path, src / "init.pt", tc, seed, work, device)
            else:
                train(model, masks, bundle, tc, work, seed=seed, device=device, progress=progress)
            _publish(work, out / row.tag)
        metrics = json.loads((out / row.tag / "metrics.json").read_text())
        results.append({"sparsity": row.sparsity, "tag": row.tag, "density": row.density,
                        **{k: v for k, v in metrics.items() if k not in ("density", "sparsity")}})
        hist = pd.read_csv(out / row.tag / "history.csv") if tc.epochs else pd.DataFrame(columns=HISTORY_COLUMNS)
        hist.insert(0, "sparsity", row.sparsity)
        histories.append(hist)
    res, hist = pd.DataFrame(results), pd.concat(histories, ignore_index=True)
    atomic_write_text(hist.to_csv(index=False), out / "history.csv")
    atomic_write_text(res.to_csv(index=False), out / "results.csv")
    return res, hist


# -- the spectrum stage (Figure 2) ---------------------------------------------------------------
def spectrum_run(cfg: Params, out_dir: str | os.PathLike, device=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eigenvalues of the fixed-weight NTK on ``spectrum.num_inputs`` test
    inputs: the dense network (the init of ``spectrum.seed``) and each run's
    network at ``spectrum.sparsity`` (its masks on that init).

    Writes ``eigenvalues.csv`` (label, run, index, eigenvalue; sorted
    descending) and ``summary.csv`` (run, label, trace, max, min, condition,
    log_distance = mean |log10 lambda_i - log10 lambda_i(dense)|); returns both.
    """
    import numpy as np
    import torch

    from . import ntk
    from .data import resolve_device
    from .masks import Masks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_dataset(cfg)
    s = cfg.spectrum
    inputs = probe_inputs(bundle, s.num_inputs, s.seed)
    tag = sparsity_tag(s.sparsity)
    any_run = next(iter(cfg.runs))
    init = torch.load(prune_dir(cfg, any_run, s.seed) / "init.pt", map_location="cpu", weights_only=True)
    model = new_model(cfg, bundle.num_classes, s.seed)
    model.load_state_dict(init)
    model.to(resolve_device(device))
    spectra, summary = {}, []
    entries = [("dense", "Dense (unpruned)", None)]
    entries += [(run, cfg.label(run), prune_dir(cfg, run, s.seed) / "masks" / f"{tag}.pt")
                for run in cfg.runs if cfg.runs[run].method != DENSE]
    for run, label, path in entries:
        masks = Masks.load(path) if path is not None else None
        spec = ntk.ntk_spectrum(model, inputs, masks)
        spectra[label] = np.sort(spec["eigenvalues"].double().cpu().numpy())[::-1].copy()  # descending
        summary.append({"run": run, "label": label, "trace": float(spec["trace"]), "max": float(spec["max"]),
                        "min": float(spec["min"]), "condition": float(spec["condition"])})
    dense = np.clip(spectra["Dense (unpruned)"], 1e-30, None)
    for row in summary:
        row["log_distance"] = float(np.mean(np.abs(np.log10(np.clip(spectra[row["label"]], 1e-30, None))
                                                   - np.log10(dense))))
    frame = ntk.spectra_frame(spectra)
    summ = pd.DataFrame(summary)
    atomic_write_text(frame.to_csv(index=False), out / "eigenvalues.csv")
    atomic_write_text(summ.to_csv(index=False), out / "summary.csv")
    return frame, summ


# -- collecting results for the plots -------------------------------------------------------------
def _runs_seeds(cfg: Params) -> Iterable[tuple[str, int]]:
    for run in cfg.runs:
        for seed in cfg.seeds:
            yield run, seed


ACCURACY = {"final": ("test_top1", "final test top-1 (%)"),
            "best": ("best_test_top1", "best test top-1 over epochs (%)")}
"""``plot.accuracy`` -> (its column in :func:`collect_results`, the words that
name it in every figure and table). ``final``: after the last epoch (what we
report by default); ``best``: the highest over epochs, what the authors'
training loop prints (PAPER.md section 3, "Reported accuracy")."""
BEST_COLUMNS = ("best_test_top1", "best_test_top5", "best_epoch")


def accuracy_caption(accuracy: str = "final") -> str:
    """How figures and tables name an accuracy: ``final test top-1 (%)`` or
    ``best test top-1 over epochs (%)`` (another metric: its column name)."""
    return ACCURACY[accuracy][1] if accuracy in ACCURACY else accuracy


def _check_accuracy(accuracy: str) -> None:
    if accuracy not in ACCURACY:
        raise ValueError(f"plot.accuracy={accuracy!r} is not allowed; allowed: one of {', '.join(ACCURACY)}")


def _fill_best(results: pd.DataFrame, history_csv: Path) -> pd.DataFrame:
    """Fill the ``best_*`` columns where ``results.csv`` lacks them (a run
    trained before they were recorded) from its ``history.csv``: the first
    epoch with the highest test top-1; without epochs, the final values."""
    if all(c in results and results[c].notna().all() for c in BEST_COLUMNS):
        return results
    results = results.copy()
    try:
        hist = pd.read_csv(history_csv)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        hist = pd.DataFrame(columns=["sparsity", "epoch", "test_top1", "test_top5"])
    for c in BEST_COLUMNS:
        if c not in results:
            results[c] = float("nan")
    for i, row in results.iterrows():
        h = hist[(hist["sparsity"] - row["sparsity"]).abs() < 1e-12]
        if h.empty:
            best = {"best_test_top1": row["test_top1"], "best_test_top5": row.get("test_top5"), "best_epoch": 0}
        else:
            b = h.loc[h["test_top1"].astype(float).idxmax()]
            best = {"best_test_top1": b["test_top1"], "best_test_top5": b.get("test_top5"),
                    "best_epoch": int(b["epoch"])}
        for c in BEST_COLUMNS:
            if pd.isna(results.at[i, c]):
                results.at[i, c] = best[c]
    if results["best_epoch"].notna().all():
        results["best_epoch"] = results["best_epoch"].astype(int)
    return results


def collect_results(cfg: Params) -> pd.DataFrame:
    """Metrics of every (run, seed, sparsity): columns run, label, method,
    seed, sparsity, test_top1, test_top5, ... (after the last epoch),
    best_test_top1, best_test_top5, best_epoch (the epoch with the highest
    test top-1) from ``train/<run>-<seed>/results.csv``; ``best_*`` missing
    there are filled in from that folder's ``history.csv``."""
    frames = []
    for run, seed in _runs_seeds(cfg):
        f = pd.read_csv(train_dir(cfg, run, seed) / "results.csv")
        f = _fill_best(f, train_dir(cfg, run, seed) / "history.csv")
        f.insert(0, "seed", seed)
        f.insert(0, "method", cfg.runs[run].method)
        f.insert(0, "label", cfg.label(run))
        f.insert(0, "run", run)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def collect_histories(cfg: Params) -> pd.DataFrame:
    """Per-epoch history of every (run, seed, sparsity)."""
    frames = []
    for run, seed in _runs_seeds(cfg):
        f = pd.read_csv(train_dir(cfg, run, seed) / "history.csv")
        f.insert(0, "seed", seed)
        f.insert(0, "label", cfg.label(run))
        f.insert(0, "run", run)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def collect_prune_frames(cfg: Params, name: str) -> pd.DataFrame:
    """One of the prune stage's CSV files (``density``, ``track``, ``scores``,
    ``masks``) for every run and seed, with run, label and seed columns."""
    frames = []
    for run, seed in _runs_seeds(cfg):
        path = prune_dir(cfg, run, seed) / f"{name}.csv"
        if path.stat().st_size == 0:
            continue
        try:
            f = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        f.insert(0, "seed", seed)
        f.insert(0, "label", cfg.label(run))
        f.insert(0, "run", run)
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarise(results: pd.DataFrame, accuracy: str = "final", metric: str | None = None) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one seed) and seed count per
    run and sparsity (columns mean, std, seeds) of the accuracy ``plot.accuracy``
    names (``final``: test_top1, ``best``: best_test_top1; :data:`ACCURACY`),
    or of another column ``metric``; column ``accuracy`` says which, so tables
    and figures can name it. Columns ``final``, ``final_std``, ``best``,
    ``best_std`` hold both accuracies (where ``results`` has them), whichever
    is chosen."""
    _check_accuracy(accuracy)
    column = metric or ACCURACY[accuracy][0]
    spec = {"mean": (column, "mean"), "std": (column, "std"), "seeds": (column, "count")}
    for name, (col, _) in ACCURACY.items():
        if col in results:
            spec[name], spec[f"{name}_std"] = (col, "mean"), (col, "std")
    out = results.groupby(["run", "label", "method", "sparsity"], sort=False).agg(**spec).reset_index()
    for col in [c for c in out.columns if c == "std" or c.endswith("_std")]:
        out[col] = out[col].fillna(0.0)
    out["accuracy"] = metric or accuracy
    return out


def _accuracy_of(summary: pd.DataFrame) -> str:
    """The accuracy a summary holds (its ``accuracy`` column; ``final`` without one)."""
    if "accuracy" in summary and len(summary):
        return str(summary["accuracy"].iloc[0])
    return "final"


def accuracy_table(summary: pd.DataFrame, sparsities: Iterable[float] | None = None) -> pd.DataFrame:
    """Table 1 layout: one row per run, one column per sparsity (percent),
    cells ``mean ± std``; a dense run fills every column with its one value.
    The header's first cell names the accuracy shown (the summary's
    ``accuracy``): ``method \\ sparsity (%): final test top-1 (%)``."""
    cols = sorted({float(s) for s in (sparsities if sparsities is not None else summary["sparsity"]) if s > 0})
    table = {}
    for (run, label), g in summary.groupby(["run", "label"], sort=False):
        row = {}
        for s in cols:
            hit = g[(g["sparsity"] - s).abs() < 1e-9]
            if hit.empty and (g["method"] == DENSE).all():
                hit = g
            if hit.empty:
                row[sparsity_label(s)] = ""
                continue
            m, sd, n = hit.iloc[0][["mean", "std", "seeds"]]
            row[sparsity_label(s)] = f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f}"
        table[label] = row
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index.name = f"method \\ sparsity (%): {accuracy_caption(_accuracy_of(summary))}"
    return frame


def to_markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (index as the first column)."""
    cols = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * len(frame.columns)) + "|"]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


def write_dvc_series(summary: pd.DataFrame, histories: pd.DataFrame, out_dir: str | os.PathLike) -> None:
    """Small CSV files for ``dvc plots``: ``accuracy/<run>.csv`` (sparsity,
    test_top1, std, accuracy: the summary's accuracy, ``final`` or ``best``,
    under the column name dvc.yaml plots, and which one it is) and
    ``curves/<run>.csv`` (epoch, test_top1 at the highest sparsity, mean over
    seeds)."""
    out = Path(out_dir)
    for run, g in summary.groupby("run", sort=False):
        f = g[["sparsity", "mean", "std"]].rename(columns={"mean": "test_top1"}).assign(accuracy=_accuracy_of(g))
        atomic_write_text(f.to_csv(index=False), out / "accuracy" / f"{run}.csv")
    for run, g in histories.groupby("run", sort=False):
        g = g[(g["sparsity"] - g["sparsity"].max()).abs() < 1e-12]
        c = g.groupby("epoch")["test_top1"].mean().reset_index()
        atomic_write_text(c.to_csv(index=False), out / "curves" / f"{run}.csv")


def write_metrics(summary: pd.DataFrame, path: str | os.PathLike) -> dict:
    """``metrics.json`` for ``dvc metrics show`` / ``dvc exp show``: both
    accuracies, whichever the figures show, as ``{"final": {run: {tag: mean
    test_top1}}, "best": {run: {tag: mean best_test_top1}}}`` (DVC's columns
    ``final.<run>.<tag>``, ``best.<run>.<tag>``); a summary holding one of
    them (no ``final`` / ``best`` columns) gives that one only."""
    metrics: dict = {}
    for name in ACCURACY:
        column = name if name in summary else "mean" if _accuracy_of(summary) == name else None
        if column is None:
            continue
        for row in summary.itertuples():
            metrics.setdefault(name, {}).setdefault(row.run, {})[sparsity_tag(row.sparsity)] = \
                round(float(getattr(row, column)), 4)
    atomic_write_text(json.dumps(metrics, indent=1) + "\n", path)
    return metrics


# -- figures -------------------------------------------------------------------------------
def style() -> None:
    """The seaborn theme of the saved figures (plot and spectrum notebooks)."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig, path: str | os.PathLike, formats: Iterable[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (PNG at 150 dpi)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        p = path.with_suffix(f".{fmt}")
        tmp = p.with_name(f".{p.stem}.tmp.{fmt}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        os.replace(tmp, p)
        written.append(p)
    return written


def sparsity_axis(ax, sparsities: Iterable[float]) -> None:
    """The paper's sparsity axis: positions log(1/density)/log(1/0.8) (evenly
    spaced for densities 0.8^k), ticks labelled in percent."""
    sparsities = sorted(set(float(s) for s in sparsities if s > 0))
    ax.set_xticks([sparsity_position(s) for s in sparsities])
    ax.set_xticklabels([sparsity_label(s) for s in sparsities], rotation=45)
    ax.set_xlabel("sparsity (%)")


def sparsity_position(sparsity):
    """x position of a sparsity on :func:`sparsity_axis` (k for density 0.8^k)."""
    import numpy as np

    return np.log(1.0 / (1.0 - np.asarray(sparsity, dtype=float))) / math.log(1 / 0.8)


def plot_accuracy(summary: pd.DataFrame, ax=None, title: str | None = None):
    """Figure 1 panel: mean test accuracy vs sparsity, a band of one standard
    deviation over seeds, one line per run; a dense run is a horizontal line.
    The y label and the title name the accuracy (the summary's ``accuracy``:
    final, or best over epochs)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    pruned = summary[summary["method"] != DENSE]
    palette = dict(zip(pruned["label"].unique(), sns.color_palette("colorblind", pruned["label"].nunique())))
    for (run, label), g in pruned.groupby(["run", "label"], sort=False):
        g = g.sort_values("sparsity")
        x = sparsity_position(g["sparsity"])
        color = "black" if run == "ntksap" else palette[label]  # the paper's method stands out
        ax.plot(x, g["mean"], marker="o", ms=4, label=label, color=color, lw=2.2 if run == "ntksap" else 1.4)
        ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], color=color, alpha=0.15, lw=0)
    for _, row in summary[summary["method"] == DENSE].iterrows():
        ax.axhline(row["mean"], color="black", ls="--", lw=1, label=f"{row['label']} ({row['mean']:.1f})")
    sparsity_axis(ax, pruned["sparsity"])
    caption = accuracy_caption(_accuracy_of(summary))
    ax.set_ylabel(caption)
    ax.set_title(f"{title}: {caption}" if title else caption)
    ax.legend(fontsize="small", ncols=2)
    return ax


def plot_curves(histories: pd.DataFrame, sparsity: float, metric: str = "test_top1", ax=None):
    """Learning curves at one sparsity: ``metric`` per epoch, mean over seeds,
    one line per run. The final accuracy is each line's last point, the best
    over epochs its highest (the title says so for test top-1)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    h = histories[(histories["sparsity"] - sparsity).abs() < 1e-9]
    sns.lineplot(data=h, x="epoch", y=metric, hue="label", errorbar="sd", ax=ax)
    what = "test top-1 (%)" if metric == "test_top1" else metric
    ax.set_ylabel(what)
    ax.set_title(f"{what} per epoch at {sparsity_label(sparsity)} % sparsity"
                 + ("\n(final: the last epoch; best over epochs: the highest)" if metric == "test_top1" else ""))
    ax.legend(fontsize="small")
    return ax


def _hue_label(value) -> str:
    return sparsity_label(value) + " %" if isinstance(value, float) else str(value)


def plot_layer_density(density: pd.DataFrame, hue: str = "label", ax=None):
    """Layer-wise density (fraction of weights kept per layer, log scale):
    grouped bars, one group per layer and one bar per ``hue`` value (run
    label, or sparsity). A layer pruned away entirely has no bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    d = density[density["name"] != "total"]
    layers = list(dict.fromkeys(d["name"]))
    groups = list(dict.fromkeys(d[hue]))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(layers) * len(groups) + 2), 4.2))
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        dens = d[d[hue] == g].set_index("name")["density"].reindex(layers)
        ax.bar(np.arange(len(layers)) + (i - (len(groups) - 1) / 2) * width, dens.to_numpy(), width,
               label=_hue_label(g), color=COLORS[i % len(COLORS)])
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=60, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("density (kept / weights)")
    ax.legend(fontsize="small", title=hue if hue != "label" else None)
    return ax


def plot_score_histogram(scores: pd.DataFrame, ax=None):
    """Distribution of the last iteration's scores at one sparsity: kept vs pruned weights."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    left, right = scores["left"].to_numpy(), scores["right"].to_numpy()
    width = right - left
    ax.bar(left, scores["pruned"], width=width, align="edge", label="pruned", alpha=0.7)
    ax.bar(left, scores["kept"], width=width, align="edge", bottom=scores["pruned"], label="kept", alpha=0.7)
    if (left > 0).all() and np.all(right / np.maximum(left, 1e-300) > 1.0001):
        ax.set_xscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("weights")
    ax.legend()
    return ax


def plot_track(track: pd.DataFrame, y: str, hue: str = "sparsity", ax=None):
    """NTK snapshots while pruning: column ``y`` (e.g. trace) against the
    pruning iteration, one line per ``hue`` value, log scale."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (g, part) in enumerate(track.groupby(hue, sort=False)):
        part = part.sort_values("iteration")
        ax.plot(part["iteration"], part[y], marker="o", ms=4, label=_hue_label(g), color=COLORS[i % len(COLORS)])
    ax.set_yscale("log")
    ax.set_xlabel("pruning iteration")
    ax.set_ylabel(y)
    ax.legend(fontsize="small")
    return ax


def plot_eigenvalues(frame: pd.DataFrame, hue: str = "iteration", ax=None):
    """Sorted NTK eigenvalues (log scale) against their index, one line per
    ``hue`` value (a long frame: index, eigenvalue, hue), coloured from light
    to dark in the order of ``hue``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    values = sorted(frame[hue].unique())
    cmap = plt.get_cmap("viridis")
    for i, v in enumerate(values):
        part = frame[(frame[hue] == v) & (frame["eigenvalue"] > 0)].sort_values("index")
        ax.plot(part["index"], part["eigenvalue"], color=cmap(i / max(1, len(values) - 1)), label=f"{hue} {v}")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("NTK eigenvalue")
    ax.legend(fontsize="small", ncols=2)
    return ax
