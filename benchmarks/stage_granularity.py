"""What the pipeline's stage granularity costs: the prune and train work of one seed's runs, one
process per (run, seed) as dvc.yaml's stages ran it until issue 13, against one process per seed as
they run it now (``ntksap.stages.prune.prune_seed``, ``ntksap.stages.train.train_seed``), with the
runs one after another and with their default worker processes (``ntksap.parallel``), side by side.

    python benchmarks/stage_granularity.py                 # params.yaml's experiment, its first seed
    python benchmarks/stage_granularity.py --seeds 0 1     # more seeds

Every process starts Python, imports the stage modules, loads ``params.yaml``, sets the CPU threads
as the notebooks do (``ntksap.notebook.set_cpu_threads``) and prunes or trains into a temporary
folder, with its own checkpoint folder (nothing resumes; nothing under ``results/`` is read or
written). "Per run" runs one process for each (kind, run, seed), prune first; "per seed" one process
for each (kind, seed) that covers every run, one after another (``workers=1``); "per seed, workers"
the same with the stage's default workers (one per idle core: 2 on a 2-core CPU for the digits net,
1 where one run uses every core). Notebooks, kernels, figures and DVC are left out: a notebook
stage pays a few seconds more than a process (``benchmarks/notebook_startup.py``), so the saving of
fewer stages is larger than this measures. Prints the wall seconds of each process and
``speed-up: <per run / per seed, workers>x``. Needs the experiment's prepared dataset
(``dvc repro prepare``).
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


def child(kind: str, seed: int, runs: list[str], params_file: str, work: Path, workers: int) -> dict:
    """One process's work: ``kind`` (prune / train) at ``seed``, of the one run in ``runs`` through the
    per-run functions (``workers`` 0), or of every run through the per-seed stage with ``workers``
    (-1: the default)."""
    t0 = time.perf_counter()
    from ntksap import notebook, params
    from ntksap.stages import prune as prune_stage
    from ntksap.stages import train as train_stage

    notebook.setup()
    cfg = params.load_params(params_file)
    notebook.set_cpu_threads(cfg.model)
    imports = time.perf_counter() - t0
    t = time.perf_counter()
    if workers == 0:
        (run,) = runs
        name = f"{run}-{seed}"
        if kind == "prune":
            prune_stage.prune_run(cfg, run, seed, work / "masks" / name)
        else:
            train_stage.train_run(cfg, run, seed, work / "masks" / name, work / "train" / name,
                                  checkpoints=work / "checkpoints" / name)
    elif kind == "prune":
        prune_stage.prune_seed(cfg, seed, work / "masks", work / "prune", timings=work / f"p-{seed}.csv",
                               workers=None if workers < 0 else workers)
    else:
        train_stage.train_seed(cfg, seed, work / "masks", work / "train", timings=work / f"t-{seed}.csv",
                               workers=None if workers < 0 else workers, checkpoints=work / "checkpoints")
    return {"imports": imports, "work": time.perf_counter() - t}


def timed_process(kind: str, seed: int, runs: list[str], params_file: str, work: Path, workers: int) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(seed), "--params", params_file,
                          "--work", str(work), "--workers", str(workers), "--runs", *runs], cwd=ROOT,
                         capture_output=True, text=True)
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
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.runs, args.params, Path(args.work),
                               args.workers)))
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
    variants = {"per run": 0, "per seed": 1, "per seed, workers": -1}
    totals = dict.fromkeys(variants, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for kind in ("prune", "train"):
                for variant, workers in variants.items():
                    work = Path(tmp) / variant.replace(" ", "_").replace(",", "")
                    if workers == 0:
                        rows = [timed_process(kind, seed, [run], args.params, work, 0) for run in runs]
                        wall = sum(r["wall"] for r in rows)
                        detail = ", ".join(f"{run} {r['wall']:.1f}" for run, r in zip(runs, rows))
                    else:
                        one = timed_process(kind, seed, runs, args.params, work, workers)
                        wall, detail = one["wall"], f"imports {one['imports']:.1f}, work {one['work']:.1f}"
                    print(f"seed {seed} {kind:5s} {variant:18s}: {wall:6.1f} s  ({detail})", flush=True)
                    totals[variant] += wall
    print("total: " + ", ".join(f"{v} {t:.1f} s" for v, t in totals.items()))
    print(f"per seed, workers against per seed: {totals['per seed'] / totals['per seed, workers']:.2f}x")
    print(f"speed-up: {totals['per run'] / totals['per seed, workers']:.2f}x (per run / per seed with workers; "
          f"notebooks, figures and DVC left out)")


if __name__ == "__main__":
    main()
