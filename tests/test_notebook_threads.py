"""The CPU threads of a pipeline notebook: one for the digits net, every core for the paper's models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _threads(model: str, omp: str | None) -> tuple[int, int]:
    """(torch's default threads, threads after ``set_cpu_threads(model)``) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    code = ("import torch; before = torch.get_num_threads(); from ntksap import notebook; "
            f"print(before, notebook.set_cpu_threads({model!r}), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    before, returned, after = map(int, out)
    assert returned == after
    return before, after


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the rule is for CPU runs")
def test_digits_net_runs_on_one_thread_and_the_paper_models_on_every_core():
    default, digits = _threads("digits_cnn", None)
    assert digits == 1
    assert _threads("resnet20", None) == (default, default)
    assert _threads("vgg16_bn", None) == (default, default)


def test_omp_num_threads_overrides_the_rule():
    assert _threads("digits_cnn", "2") == (2, 2)
    assert _threads("resnet20", "1") == (1, 1)


@pytest.mark.parametrize("name", ["prune", "train", "spectrum", "plot"])
def test_every_pipeline_notebook_sets_its_threads_from_the_experiments_model(name):
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    setup_cell = next(i for i, c in enumerate(code) if "notebook.setup()" in c)
    lines = code[setup_cell].splitlines()
    load = next(i for i, line in enumerate(lines) if "params.load_params(" in line)
    threads = next(i for i, line in enumerate(lines) if line.startswith("notebook.set_cpu_threads(cfg.model)"))
    assert load < threads, "threads are set once the experiment's model is known"
    assert all("import torch" not in c and "set_num_threads" not in c for c in code[:setup_cell + 1])
