"""What the pipeline's stage granularity costs: the prune and train work of one seed's runs, one
process per (run, seed) as dvc.yaml's stages run it, against one process per seed, side by side.

    python benchmarks/stage_granularity.py                 # params.yaml's experiment, its first seed
    python benchmarks/stage_granularity.py --seeds 0 1     # more seeds

Every process starts Python, imports the stage modules, loads ``params.yaml``, sets the CPU threads
as the notebooks do (``ntksap.notebook.set_cpu_threads``) and calls
``ntksap.stages.prune.prune_run`` or ``ntksap.stages.train.train_run`` into a temporary folder, with
its own checkpoint folder (nothing resumes; nothing under ``results/`` is read or written). "Per run"
runs one process for each (kind, run, seed), prune first; "per seed" runs one process for each
(kind, seed) that covers every run, as a stage per seed would. Notebooks, kernels, figures and DVC
are left out: a notebook stage pays about 3.8 s more than a process (``benchmarks/notebook_startup.py``),
so the measured saving understates what fewer stages would save. Prints the wall seconds of each
process and each run, and ``speed-up: <per run / per seed>x``. Needs the experiment's prepared
dataset (``dvc repro prepare``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child(kind: str, seed: int, runs: list[str], params_file: str, work: Path) -> dict:
    """One process's work: ``kind`` (prune / train) of ``runs`` at ``seed``; seconds per run."""
    t0 = time.perf_counter()
    from ntksap import notebook, params
    from ntksap.stages import prune as prune_stage
    from ntksap.stages import train as train_stage

    notebook.setup()
    cfg = params.load_params(params_file)
    notebook.set_cpu_threads(cfg.model)
    imports = time.perf_counter() - t0
    seconds = {}
    for run in runs:
        t = time.perf_counter()
        name = f"{run}-{seed}"
        if kind == "prune":
            prune_stage.prune_run(cfg, run, seed, work / "prune" / name, timings=work / "timings" / f"p-{name}.csv")
        else:
            train_stage.train_run(cfg, run, seed, work / "prune" / name, work / "train" / name,
                                  checkpoints=work / "checkpoints" / name, timings=work / "timings" / f"t-{name}.csv")
        seconds[run] = time.perf_counter() - t
    return {"imports": imports, "runs": seconds}


def timed_process(kind: str, seed: int, runs: list[str], params_file: str, work: Path) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(seed), "--params", params_file,
                          "--work", str(work), "--runs", *runs], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(f"{kind} of {runs} at seed {seed} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall": wall}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the experiment (default params.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to time (default: the first)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--runs", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.runs, args.params, Path(args.work))))
        return

    from ntksap import layout, params

    cfg = params.load_params(ROOT / args.params)
    seeds = args.seeds or [cfg.seeds[0]]
    bad = [s for s in seeds if s not in cfg.seeds]
    if bad:
        ap.error(f"--seeds: {bad} not in the experiment's seeds {cfg.seeds}")
    prepared = ROOT / layout.prepared_path(cfg.dataset)
    if not prepared.exists():
        raise SystemExit(f"{prepared.relative_to(ROOT)} is missing: run `dvc repro prepare` first")
    runs = list(cfg.runs)
    print(f"{cfg.experiment}: {cfg.dataset} / {cfg.model}, {len(runs)} runs x {len(cfg.sparsities)} sparsities, "
          f"{cfg.train.epochs} epochs; seeds {seeds}; {sys.executable}")
    totals = {"per run": 0.0, "per seed": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for kind in ("prune", "train"):
                rows = [timed_process(kind, seed, [run], args.params, Path(tmp) / "per_run") for run in runs]
                each = sum(r["wall"] for r in rows)
                print(f"seed {seed} {kind}, one process per run: {each:6.1f} s  ("
                      + ", ".join(f"{run} {r['wall']:.1f}" for run, r in zip(runs, rows)) + ")")
                one = timed_process(kind, seed, runs, args.params, Path(tmp) / "per_seed")
                print(f"seed {seed} {kind}, one process per seed: {one['wall']:6.1f} s  (imports {one['imports']:.1f}; "
                      + ", ".join(f"{run} {s:.1f}" for run, s in one["runs"].items()) + ")")
                totals["per run"] += each
                totals["per seed"] += one["wall"]
    print(f"total: one process per run {totals['per run']:.1f} s, per seed {totals['per seed']:.1f} s")
    print(f"speed-up: {totals['per run'] / totals['per seed']:.2f}x (per run / per seed; notebooks, figures and DVC "
          f"left out)")


if __name__ == "__main__":
    main()
