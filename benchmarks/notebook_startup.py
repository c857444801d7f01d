"""What one notebook stage of the pipeline pays before it computes, before and after issue 13's start-up work.

Each round runs, one right after the other (so both see the same machine), a
notebook holding just the train notebook's parameters and import cells (the
stage modules, ``notebook.setup()``, ``params.load_params``) through

* ``before``: ``papermill`` itself, with ``import torchvision`` in the import
  cell, as every stage ran until the CIFAR download table was looked up lazily
  (``ntksap.data._download``) and jsonschema's ``rfc3987_syntax`` was skipped;
* ``now``: ``python -m ntksap.execute`` as dvc.yaml runs it, with the cell as it is.

Prints the median wall seconds of each (process start to exit: papermill's
start-up, the kernel's, the imports, saving the notebook) and their ratio. DVC's
own time per stage is not in it.

    python benchmarks/notebook_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def startup_notebook(path: Path, extra_import: str = "") -> Path:
    """The train notebook cut after its import cell, with ``extra_import`` prepended to that cell."""
    book = json.loads((ROOT / "notebooks" / "train.ipynb").read_text())
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    params_cell, import_cell = code[0], dict(code[1])
    source = import_cell["source"] if isinstance(import_cell["source"], str) else "".join(import_cell["source"])
    import_cell["source"] = extra_import + source
    book["cells"] = [params_cell, import_cell]
    path.write_text(json.dumps(book))
    return path


def run(command: list[str], notebook: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([*command, str(notebook), str(out), "-k", "ntksap", "--no-progress-bar", "--log-level", "ERROR",
                    "-p", "seed", "0"], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of before + now (default 5)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} is not allowed: at least 1")
    papermill = Path(sys.executable).with_name("papermill")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = startup_notebook(tmp / "before.ipynb", "import torchvision  # what ntksap.data imported\n")
        new = startup_notebook(tmp / "now.ipynb")
        variants = {"before": ([str(papermill)], old), "now": ([sys.executable, "-m", "ntksap.execute"], new)}
        run(*variants["now"], tmp / "warm.ipynb")  # file caches warm for both
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (command, notebook) in variants.items():
                times[name].append(run(command, notebook, tmp / f"{name}-out.ipynb"))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>7}: median {med[name]:.2f} s per notebook stage ({', '.join(f'{x:.2f}' for x in t)})")
    print(f"saved: {med['before'] - med['now']:.2f} s per notebook stage, x 30 stages of the quick set = "
          f"{30 * (med['before'] - med['now']):.0f} s")
    print(f"speed-up: {med['before'] / med['now']:.2f}x (start-up of a notebook stage, before -> now)")


if __name__ == "__main__":
    main()
