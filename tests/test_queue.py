"""DVC's experiment queue: a sweep of several runs in parallel on one machine,
whose results land in the same tables (``dvc exp show``) and plots
(``dvc plots diff``); README.md, "Many runs at once: the experiment queue".

Cost: one slow test (``pytest -k queue``). In a temporary git + DVC copy of the
repository it queues two ``micro`` experiments with one command (a sweep over
``train.lr``, NTK snapshots off), runs them with two queue workers at once (one
data folder for both, ``NTKSAP_DATA_ROOT`` in the workers' environment), then
compares and applies them: 2.5 to 3.5 minutes on 2 busy CPU cores.
"""

import json
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

import dvcrepo

LRS = (0.05, 0.2)  # the sweep: train.lr changes every accuracy of the micro set
RUNS = ("magnitude", "ntksap")  # the micro set's runs
TAGS = ("sp50_00", "sp90_00")  # and its sparsities
METRICS = "results/micro/metrics.json"
TIMEOUT = 900  # seconds for both experiments (about 2 minutes when it works)


def _dvc(repo: Path, *args: str, check: bool = True, extra_env: dict | None = None, stdout_only: bool = False) -> str:
    """Run ``dvc args`` in ``repo``; its stdout and stderr together (``stdout_only``:
    stdout, for ``--json``). The output goes through files, not pipes: the queue
    workers that ``dvc queue start`` leaves running inherit its stderr, so with a
    pipe it would not return (EOF) until they exit, after the whole queue has run."""
    env = {**dvcrepo.env(repo), **(extra_env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(["dvc", *args], cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                              text=True, timeout=300)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return stdout if stdout_only else stdout + stderr


def _statuses(repo: Path) -> dict[str, str]:
    """Experiment name -> status (Queued, Running, Success, Failed) from ``dvc queue status``."""
    rows = {}
    for line in _dvc(repo, "queue", "status").splitlines():
        parts = line.split()
        if len(parts) >= 4 and re.fullmatch(r"[0-9a-f]{7}", parts[0]):
            rows[parts[1]] = parts[-1]
    return rows


def _logs(repo: Path, names) -> str:
    return "\n".join(f"--- dvc queue logs {n} ---\n{_dvc(repo, 'queue', 'logs', n, check=False)[-3000:]}"
                     for n in names)


def _stop_queue(repo: Path, since: float) -> list[str]:
    """``dvc queue stop --kill``, then wait for every process of the test to end;
    kill (by pid) and return those still running after 60 s."""
    _dvc(repo, "queue", "stop", "--kill", check=False)
    deadline = time.monotonic() + 60
    while (left := dvcrepo.processes(repo, since=since)) and time.monotonic() < deadline:
        time.sleep(1)
    described = []
    for p in left:
        try:
            described.append(f"{p.pid}: {' '.join(p.cmdline())}")
            p.kill()
        except psutil.Error:
            pass
    return described


@pytest.mark.slow
def test_queue_runs_a_sweep_in_parallel_into_the_same_tables_and_plots(tmp_path):
    repo = dvcrepo.make_repo(tmp_path / "repo")
    shared = tmp_path / "datasets"  # one dataset folder for every queued run (see README)
    since = time.time()
    mark = uuid.uuid4().hex
    try:
        # one command queues the whole sweep (DVC's Hydra sweep syntax); nothing runs yet
        out = _dvc(repo, "exp", "run", "--queue", "-S", "experiment=micro",
                   "-S", "train.lr=" + ",".join(map(str, LRS)), "-S", "prune.track.mode=none")
        names = re.findall(r"Queued experiment '([^']+)' for future execution", out)
        assert len(names) == len(LRS) == len(set(names)), out
        for lr in LRS:
            assert f"'train.lr={lr}'" in out, out
        status = _dvc(repo, "queue", "status")
        assert {n: _statuses(repo)[n] for n in names} == {n: "Queued" for n in names}, status
        assert "Worker status: 0 active" in status and not (repo / "results").exists()

        # two workers: the two experiments run at the same time, each in its own copy of the repository;
        # the data folder is machine configuration, not a parameter: the jobs inherit it from `dvc queue start`
        started = _dvc(repo, "queue", "start", "--jobs", "2",
                       extra_env={"NTKSAP_QUEUE_MARK": mark, "NTKSAP_DATA_ROOT": str(shared)})
        assert "Started '2' new experiments task queue workers" in started, started
        exps_tmp = repo / ".dvc" / "tmp" / "exps"
        seen_env, max_parallel = {}, 0
        deadline = time.monotonic() + TIMEOUT
        while True:
            copies = set()
            for p in dvcrepo.processes(repo, since=since):
                try:
                    cwd = Path(p.cwd())
                    if cwd.is_relative_to(exps_tmp) and cwd != exps_tmp:
                        copies.add(cwd.relative_to(exps_tmp).parts[0])
                        seen_env[p.pid] = p.environ().get("NTKSAP_QUEUE_MARK")
                except (psutil.Error, OSError):
                    pass
            max_parallel = max(max_parallel, len(copies))
            states = {n: _statuses(repo).get(n) for n in names}
            if not {"Queued", "Running"} & set(states.values()):
                break
            assert time.monotonic() < deadline, f"not done after {TIMEOUT} s: {states}\n{_logs(repo, names)}"
            time.sleep(2)
        assert states == {n: "Success" for n in names}, f"{states}\n{_logs(repo, names)}"
        assert max_parallel == 2, f"the two experiments never ran at the same time ({max_parallel})"
        # the jobs' processes inherit the environment of `dvc queue start` (how CUDA_VISIBLE_DEVICES reaches them)
        assert seen_env and set(seen_env.values()) == {mark}, seen_env
        assert (shared / "digits").is_dir() and not (repo / "data").exists()  # NTKSAP_DATA_ROOT was shared
        assert not (repo / "results").exists()  # the results are in the experiments, not yet in the workspace

        # the table: one row per experiment, with its parameters and metrics
        shown = json.loads(_dvc(repo, "exp", "show", "--json", stdout_only=True))
        rows = {e["name"]: e for base in shown for e in base.get("experiments") or []}
        assert set(rows) == set(names), sorted(rows)
        metrics, lr_of = {}, {}
        for name in names:
            row = rows[name]
            assert row["executor"]["state"] == "success", row["executor"]
            data = row["revs"][0]["data"]
            params = data["params"]["params.yaml"]["data"]
            assert params["experiment"] == "micro" and params["prune"]["track"]["mode"] == "none"
            assert "data" not in params  # where the data lives is not an experiment parameter
            lr_of[name] = params["train"]["lr"]
            m = data["metrics"][METRICS]["data"]  # {final|best: {run: {tag: accuracy}}}
            assert set(m) == {"final", "best"}, m
            for which in m:
                assert {r: set(m[which][r]) for r in m[which]} == {r: set(TAGS) for r in RUNS}, m
                assert all(0 <= m[which][r][t] <= 100 for r in RUNS for t in TAGS), m
            metrics[name] = m
        assert sorted(lr_of.values()) == sorted(LRS), lr_of
        a, b = names
        assert metrics[a] != metrics[b], metrics  # the learning rate changed the results

        # the plots: `dvc plots diff` overlays both experiments, with the numbers of their metrics
        diff = json.loads(_dvc(repo, "plots", "diff", a, b, "--json", "-o", str(tmp_path / "plots"),
                               stdout_only=True))
        for run in RUNS:
            values = diff["data"][f"results/micro/series/accuracy/{run}.csv"][0]["content"]["data"]["values"]
            assert {v["rev"] for v in values} == {a, b}, values
            for v in values:
                tag = "sp" + f"{100 * float(v['sparsity']):05.2f}".replace(".", "_")
                assert v["accuracy"] == "final"  # plot.accuracy's default
                assert float(v["test_top1"]) == pytest.approx(metrics[v["rev"]]["final"][run][tag], abs=1e-3), v
            curves = diff["data"][f"results/micro/series/curves/{run}.csv"][0]["content"]["data"]["values"]
            assert {v["rev"] for v in curves} == {a, b}, curves

        # keep one: `dvc exp apply` brings its params.yaml and results into the workspace, `dvc exp branch` a branch
        _dvc(repo, "exp", "apply", a)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert params["experiment"] == "micro" and params["train"]["lr"] == lr_of[a]
        assert json.loads((repo / METRICS).read_text()) == metrics[a]
        assert (repo / "results/micro/series/accuracy/ntksap.csv").is_file()
        # the prepared data is this machine's (cache: false, not in git): `dvc repro` prepares it again, the same
        # bytes, and nothing else runs; then the results match the parameters
        waiting = json.loads(_dvc(repo, "status", "--json", stdout_only=True))
        assert waiting["prepare"] == [{"changed outs": {"data/prepared/digits.pt": "deleted"}}], waiting
        again = _dvc(repo, "repro")
        assert dvcrepo.ran(again) == {"prepare"}, again
        assert json.loads(_dvc(repo, "status", "--json", stdout_only=True)) == {}
        _dvc(repo, "exp", "branch", b, "lr-b")
        kept = subprocess.run(["git", "show", "lr-b:params.yaml"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout
        assert yaml.safe_load(kept)["train"]["lr"] == lr_of[b]
    finally:
        left = _stop_queue(repo, since)
    assert not left, f"still running after `dvc queue stop --kill` (now killed): {left}"
