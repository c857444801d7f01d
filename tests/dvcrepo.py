"""Helpers for the tests that run the DVC pipeline in a throwaway repository:
a committed git + DVC copy of the project, the Jupyter kernel ``ntksap`` that
its notebooks run in, and a runner for DVC commands in the copy.

Every process of a stage imports the copy's ``ntksap`` without ``PYTHONPATH``:
DVC runs each command in the copy's root, ``python -m`` puts that folder first
on ``sys.path``, and the kernel (``papermill -k ntksap``, started in the same
folder) has ``''`` on ``sys.path`` ahead of site-packages, where the editable
install is only a meta-path finder, consulted after the path."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KERNEL = "ntksap"            # the kernel dvc.yaml's papermill commands name (-k ntksap)
MARK = "NTKSAP_TEST_REPO"    # in the environment of each command: how its processes are found


def env(repo: Path) -> dict:
    """The environment of a DVC command run in ``repo``."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("PYTHONPATH", None)  # not needed (see above); a stale one would hide a kernel importing the wrong ntksap
    e[MARK] = str(repo)
    e["DVC_NO_ANALYTICS"] = "1"
    e.pop("OMP_NUM_THREADS", None)
    for name in ("NTKSAP_DATA_ROOT", "NTKSAP_DATA_LOCAL_PATH", "NTKSAP_DATA_DOWNLOAD"):
        e.pop(name, None)  # this machine's data location is the test's to choose
    return e


def run(repo: Path, *args: str, check: bool = True, timeout: float | None = None,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` in ``repo``; with ``check`` a failure raises with the output's tail."""
    out = subprocess.run(list(args), cwd=repo, env={**env(repo), **(extra_env or {})}, capture_output=True, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def ran(output: str) -> set[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@functools.cache
def ensure_kernel() -> str:
    """The Jupyter kernel ``ntksap`` of this environment, installed into it with the
    server config that opens results/ read-only (``python -m ntksap.lab install``,
    as .ci/run and the README do) when ``jupyter kernelspec list`` lacks the kernel
    or the config is missing; once per session. Returns the kernel's folder; fails
    when a kernel of that name runs another Python."""
    from ntksap.lab import configured

    def specs() -> dict:
        out = subprocess.run([str(BIN / "jupyter"), "kernelspec", "list", "--json"], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)["kernelspecs"]

    found = specs()
    if KERNEL not in found or not configured():
        subprocess.run([sys.executable, "-m", "ntksap.lab", "install"], capture_output=True, text=True, check=True)
        found = specs()
    spec = found[KERNEL]
    python = spec["spec"]["argv"][0]
    if Path(python).resolve() != Path(sys.executable).resolve():
        raise AssertionError(f"the Jupyter kernel {KERNEL!r} in {spec['resource_dir']} runs {python}, not this "
                             f"environment's {sys.executable}: remove it (jupyter kernelspec remove {KERNEL}), then "
                             f"python -m ntksap.lab install")
    return spec["resource_dir"]


def make_repo(path: Path, extra_ignores: str = "") -> Path:
    """A fresh git + DVC repository in ``path`` holding a copy of the project,
    committed (``dvc exp run`` needs a commit), as a clone of it would be, with
    the project's .gitignore (an experiment commits the metrics and plot series,
    DVC outputs with ``cache: false`` that it keeps in git). Installs the kernel
    (:func:`ensure_kernel`). Skips the test when dvc or papermill is not installed."""
    if shutil.which("dvc", path=str(BIN)) is None or shutil.which("papermill", path=str(BIN)) is None:
        pytest.skip("dvc and papermill are needed (pip install -e '.[pipeline]')")
    ensure_kernel()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in ("ntksap", "notebooks"):
        shutil.copytree(ROOT / name, path / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    if extra_ignores:
        with open(path / ".gitignore", "a") as f:
            f.write(extra_ignores)
    run(path, "git", "init", "-q")
    run(path, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    run(path, "git", "add", "-A")
    commit(path, "copy")
    return path


def commit(repo: Path, message: str) -> None:
    """Commit everything in ``repo`` (tracked changes and new files)."""
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.email=test@example.com", "-c", "user.name=test", "commit", "-q", "-m", message)


def processes(*repos: Path, since: float = 0.0) -> list:
    """Live processes (``psutil.Process``, not this one, not zombies) started at
    or after ``since`` (a ``time.time()``, less 1 s of slack) that work for one
    of ``repos``: their working folder is in it, their command line names it, or
    their environment names it (:data:`MARK`, as :func:`env` sets). Queue
    workers and Jupyter kernels are re-parented or in sessions of their own, so
    they are found this way rather than as children."""
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
                    or p.environ().get(MARK, "") in roots):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found
