"""Helpers for the tests that run the DVC pipeline in a throwaway repository:
a committed git + DVC copy of the project, and a runner whose environment makes
DVC, papermill and the notebook kernels use the copy's ``ntksap``."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(repo: Path) -> dict:
    """The environment of a DVC command run in ``repo``."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = str(repo)  # the copy's ntksap, in papermill's kernels too
    e["DVC_NO_ANALYTICS"] = "1"
    e.pop("OMP_NUM_THREADS", None)
    return e


def run(repo: Path, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` in ``repo``; with ``check`` a failure raises with the output's tail."""
    out = subprocess.run(list(args), cwd=repo, env=env(repo), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def ran(output: str) -> set[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(path: Path, extra_ignores: str = "") -> Path:
    """A fresh git + DVC repository in ``path`` holding a copy of the project,
    committed (``dvc exp run`` needs a commit), as a clone of it would be.
    Skips the test when dvc or papermill is not installed."""
    if shutil.which("dvc", path=str(BIN)) is None or shutil.which("papermill", path=str(BIN)) is None:
        pytest.skip("dvc and papermill are needed (pip install -e '.[pipeline]')")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in ("ntksap", "notebooks"):
        shutil.copytree(ROOT / name, path / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy(ROOT / name, path / name)
    (path / ".gitignore").write_text("/results/\n/data/\n/dvc_plots/\n__pycache__/\n" + extra_ignores)
    run(path, "git", "init", "-q")
    run(path, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    run(path, "git", "add", "-A")
    run(path, "git", "-c", "user.email=test@example.com", "-c", "user.name=test", "commit", "-q", "-m", "copy")
    return path


def processes(*repos: Path, since: float = 0.0) -> list:
    """Live processes (``psutil.Process``, not this one, not zombies) started at
    or after ``since`` (a ``time.time()``, less 1 s of slack) that work for one
    of ``repos``: their working folder is in it, their command line names it, or
    their ``PYTHONPATH`` is it (as :func:`env` sets). Queue workers and Jupyter
    kernels are re-parented or in sessions of their own, so they are found this
    way rather than as children."""
    import psutil

    roots = [str(r) for r in repos]
    found = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline", "create_time", "status"]):
        try:
            if p.pid == os.getpid() or (p.info["create_time"] or 0) < since - 1:
                continue
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cwd, cmd = p.info["cwd"] or "", " ".join(p.info["cmdline"] or [])
            if (any(cwd == r or cwd.startswith(r + os.sep) or r in cmd for r in roots)
                    or p.environ().get("PYTHONPATH", "") in roots):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found
