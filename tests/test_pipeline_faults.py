"""The whole DVC pipeline under SIGKILL: ``dvc repro`` killed (dvc, papermill
and the notebook's Jupyter kernel: the whole process tree) at seeded random
points in three stages (prune, train, spectrum), then rerun to the end; see
docs/faults.md.

After every kill: nothing of the tree survives or keeps writing, ``dvc status``
runs (stale ``.dvc/tmp/lock`` and rwlock entries do not block), the dvc.lock it
accepts parses, and every stage it does not list as changed has outputs equal
to the undisturbed run's. At the end: ``dvc repro`` exits 0, ``dvc status`` is
clean and every output (masks, results, metrics, Table 1, ...) equals the
undisturbed run's, bit for bit where it is not a timing.

Not repaired by DVC: a kill while DVC rewrites ``.dvc/tmp/rwlock`` or
``dvc.lock`` (both in place) can leave the file empty, and DVC then refuses to
run until it is removed by hand. The test meets that when a kill happens to
land there (it then checks the error and removes the file) and always makes it
on purpose once at the end (an emptied file).

Cost: two throwaway git + DVC copies of the project on the ``micro`` set with
3 epochs; one undisturbed ``dvc repro`` (65-130 s on 2 busy CPU cores), three
killed ones, each redoing the stage it was killed in, a final one and two
no-op ones: about 3-4.5 minutes in all (measured 171-266 s). Marked ``slow``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from ntksap import config, layout
from ntksap.params import load_params
from ntksap.masks import Masks

import dvcrepo

EXPERIMENT = "micro"
OVERRIDES = ["train.epochs=3"]            # 1 epoch in `micro`; 3 so that kills also land inside training
TIMING = {"epoch_time", "seconds"}        # wall-clock columns / keys: differ between any two runs
STALE_RWLOCK = "had been killed. Auto removed it from the lock file."   # DVC's warning on a dead pid's lock
CACHED = r"Stage '([^']+)' is cached - skipping run"                   # restored from DVC's run cache
CORRUPT_RWLOCK = "Unable to read RWLock-file '.dvc/tmp/rwlock'. JSON structure is corrupted"
BROKEN_LOCK_FILE = ("'./dvc.lock' validation failed.", "'./dvc.lock' is invalid.")    # empty / cut-short dvc.lock
SEED = 20240611
# Where the kills land: (stage, trigger), with seeded random draws scaled by the undisturbed run:
#   start     a delay after the "Running stage" line, uniform over the time the stage's command ran
#             in the undisturbed run (kernel start-up, imports, the notebook's work); at the latest
#             when the command ends
#   files     once the stage has written k result files (k uniform from 1 to one less than the
#             undisturbed stage wrote; for train these are checkpoints and per-sparsity results,
#             wherever the trainer keeps them), plus up to 0.2 s: inside training / pruning
#   commit    a delay after the stage's command exited (dvc has no child left), uniform over half
#             the undisturbed time from there to "Updating lock file": DVC is hashing and caching
#             the outputs and has not yet written dvc.lock
PLAN = [("prune@0", "start"), ("train@0", "files"), ("spectrum", "commit")]
REPRO_TIMEOUT = 400


def _env(repo: Path, tmp: Path) -> dict:
    """dvcrepo's environment, with a private TMPDIR (where jupyter_client writes the kernels'
    connection files) so that what a kill leaves behind there can be seen."""
    tmp.mkdir(exist_ok=True)
    return {**dvcrepo.env(repo), "TMPDIR": str(tmp)}


def _make(path: Path) -> Path:
    repo = dvcrepo.make_repo(path)
    config.write_params(config.compose(EXPERIMENT, OVERRIDES), repo / "params.yaml")
    dvcrepo.run(repo, "git", "-c", "user.email=test@example.com", "-c", "user.name=test", "commit", "-q", "-am",
                "micro, 3 epochs")
    return repo


def _everything(repo: Path) -> dict[str, tuple[int, int]]:
    """Every file under results/ plus dvc.lock -> (size, mtime)."""
    out = {}
    for f in [*(repo / "results").rglob("*"), repo / "dvc.lock"]:
        try:
            if f.is_file():
                st = f.stat()
                out[str(f.relative_to(repo))] = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            pass
    return out


def _results(repo: Path) -> dict[str, int]:
    """Result files (not the papermill notebooks, rewritten while a cell runs) -> mtime."""
    return {k: mtime for k, (_, mtime) in _everything(repo).items()
            if k.startswith("results") and not k.endswith(".ipynb")}


# -- killing a process tree ---------------------------------------------------------------------
def _kill_tree(proc: subprocess.Popen) -> list[str]:
    """SIGKILL ``proc`` (dvc) and every descendant, the Jupyter kernel included (jupyter_client
    starts it in a session of its own, so ``killpg`` of dvc's session misses it). Each process
    is first stopped (SIGSTOP: a stopped process cannot start another), the tree is collected
    again until nothing new appears, then all are killed together with dvc's session. Returns
    what was killed (ipykernel, papermill, dvc, bash, ...); asserts that none of it survives."""
    victims: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        root = None
    while root is not None:
        try:
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = [p for p in [root] if p.pid not in victims]
        new = [p for p in found if p.pid not in victims]
        if not new:
            break
        for p in new:
            victims[p.pid] = p
            try:
                p.suspend()
            except psutil.NoSuchProcess:
                pass
    names = []
    for p in victims.values():
        try:
            cmd = p.cmdline()
            names.append(next((k for k in ("ipykernel", "papermill", "dvc", "ntksap") if k in " ".join(cmd)),
                              Path(cmd[0]).name if cmd else p.name()))
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    psutil.wait_procs(list(victims.values()), timeout=30)
    survivors = [p for p in victims.values() if _alive(p)]
    assert not survivors, f"survived SIGKILL: {survivors}"
    return names


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- one `dvc repro`, watched ----------------------------------------------------------------------
class Repro:
    """``dvc repro`` in its own session, watched every 25 ms: when each stage started
    ("Running stage"), wrote its first result file, its command exited (dvc has no child
    left) and its lock entry was written ("Updating lock file"). With ``kill=(stage, trigger,
    delay, files)`` the whole tree is killed ``delay`` s after that stage's trigger (see PLAN)."""

    def __init__(self, repo: Path, env: dict, kill: tuple[str, str, float, int] | None = None):
        self.repo, self.kill = repo, kill
        self.events: dict[str, dict[str, float]] = {}
        self.lines: list[str] = []
        self.killed: list[str] = []
        self.killed_in: str | None = None
        self.written: list[str] = []      # result files the stage running at the kill had written
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _due(self, now: float) -> bool:
        stage, trigger, delay, _ = self.kill
        ev = self.events.get(stage, {})
        at = {"start": ev.get("start"), "files": ev.get("k_files"), "commit": ev.get("commit")}[trigger]
        if at is None:
            return False
        due = at + delay
        if trigger != "commit" and "commit" in ev:     # the command ended first: kill now, in the same stage
            due = min(due, ev["commit"])
        return now >= due

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def watch(self, timeout: float = REPRO_TIMEOUT) -> "Repro":
        stage, seen_lines, baseline, had_child, seen_written = None, 0, {}, False, {}
        try:
            while True:
                now = time.monotonic() - self.t0
                finished = self.proc.poll() is not None
                for line in self.lines[seen_lines:]:
                    seen_lines += 1
                    if line.startswith("Running stage '"):
                        stage = line.split("'")[1]
                        self.events[stage] = {"start": now}
                        baseline, had_child, self.written, seen_written = _results(self.repo), False, [], {}
                    elif line.startswith("Updating lock file") and stage is not None:
                        self.events[stage].setdefault("lock", now)
                if finished:
                    break
                if stage is not None and "lock" not in self.events[stage]:
                    ev = self.events[stage]
                    try:
                        children = psutil.Process(self.proc.pid).children()
                    except psutil.NoSuchProcess:
                        children = []
                    had_child |= bool(children)
                    if had_child and not children:
                        ev.setdefault("commit", now)
                    written = {k: v for k, v in _results(self.repo).items() if baseline.get(k) != v}
                    if written and "commit" not in ev:                # what the stage's command wrote
                        ev.setdefault("artifact", now)
                        if written != seen_written:
                            ev["last_artifact"], seen_written = now, written
                            self.written = sorted(written, key=written.get)   # oldest first
                            ev["files"] = len(written)
                            if self.kill and self.kill[0] == stage and len(written) >= self.kill[3]:
                                ev.setdefault("k_files", now)
                if self.kill and self._due(now):
                    self.killed_in = stage       # the stage running at the kill (the target, unless it was over)
                    self.phase = ("DVC committing outputs" if "commit" in self.events[stage] else "command running") \
                        if "lock" not in self.events[stage] else "between stages"
                    self.killed = _kill_tree(self.proc)
                    self.killed_at = time.monotonic() - self.t0 - self.events[stage]["start"]
                    break
                if now > timeout:
                    self.killed = _kill_tree(self.proc)
                    raise AssertionError(f"dvc repro still running after {timeout} s:\n{self.output[-3000:]}")
                time.sleep(0.025)
        finally:
            if self.proc.poll() is None:
                _kill_tree(self.proc)
            self.proc.wait(timeout=60)
            self._reader.join(timeout=30)
            self.proc.stdout.close()
        self.seconds = time.monotonic() - self.t0
        return self


# -- comparing results with the undisturbed run -------------------------------------------------------------
def _stage_outs(repo: Path) -> dict[str, list[str]]:
    """Stage -> its output paths, from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {name: [o["path"] for o in st.get("outs", [])] for name, st in lock["stages"].items()}


def _drop_timing(obj):
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, (list, tuple)):
        return [_drop_timing(v) for v in obj]
    return obj


def _assert_same_object(a, b, where: str):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_object(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_object(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_file(fa: Path, fb: Path, rel: str):
    """The content that matters is equal: tensors bit for bit (masks through Masks.load), CSV and
    JSON values exactly (timing columns left out), text byte for byte. Executed notebooks carry
    timestamps, figures (PDF) creation dates: those are only checked to be complete files."""
    suffix = fa.suffix
    if suffix == ".ipynb":
        assert "cells" in json.loads(fb.read_text()), rel          # a whole notebook, not a partial write
    elif suffix == ".png":
        assert fb.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fb.read_bytes()[-8:-4] == b"IEND", rel
    elif suffix == ".pdf":
        assert fb.read_bytes()[:5] == b"%PDF-" and b"%%EOF" in fb.read_bytes()[-64:], rel
    elif suffix == ".pt" and fa.name != "init.pt" and "masks" in Path(rel).parts[:3]:
        ma, mb = Masks.load(fa), Masks.load(fb)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma), rel
    elif suffix == ".pt":
        _assert_same_object(_drop_timing(torch.load(fa, weights_only=True)),
                            _drop_timing(torch.load(fb, weights_only=True)), rel)
    elif suffix == ".csv":
        da, db = pd.read_csv(fa), pd.read_csv(fb)
        pd.testing.assert_frame_equal(da.drop(columns=[c for c in da if c in TIMING]),
                                      db.drop(columns=[c for c in db if c in TIMING]), check_exact=True, obj=rel)
    elif suffix == ".json":
        assert _drop_timing(json.loads(fa.read_text())) == _drop_timing(json.loads(fb.read_text())), rel
    else:
        assert fa.read_bytes() == fb.read_bytes(), rel


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else {"."}


def _assert_stage_equal(a: Path, b: Path, outs: list[str]):
    for out in outs:
        pa, pb = a / out, b / out
        assert pb.exists(), f"{out} missing"
        fa, fb = _files(pa), _files(pb)
        assert fa == fb, f"{out}: files differ: only A {sorted(fa - fb)}, only B {sorted(fb - fa)}"
        for rel in sorted(fa):
            _assert_same_file(pa / rel if rel != "." else pa, pb / rel if rel != "." else pb, f"{out}/{rel}")


def _dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def _status(repo: Path, env: dict) -> tuple[set[str], str]:
    """The stages ``dvc status`` lists as changed, and its stderr (warnings)."""
    out = _dvc(repo, env, "status", "--json")
    assert out.returncode == 0, f"dvc status failed after a kill:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return set(json.loads(out.stdout)), out.stderr


def _lock_file(repo: Path) -> dict | None:
    """dvc.lock as YAML with its ``stages``; None when it is not that (empty, cut short)."""
    try:
        data = yaml.safe_load((repo / "dvc.lock").read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("stages"), dict) else None


def _rwlock(repo: Path) -> dict | None:
    """DVC's rwlock file (``{}`` when absent), None when it is not JSON."""
    path = repo / ".dvc" / "tmp" / "rwlock"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return None


def _dvc_refuses(repo: Path, env: dict, messages: tuple[str, ...], *args: str) -> str:
    """``dvc *args`` refuses to run (a broken rwlock or dvc.lock) with one of
    ``messages`` in its error; returns the error."""
    out = _dvc(repo, env, *args)
    assert out.returncode != 0 and any(m in out.stderr for m in messages), (out.returncode, out.stdout, out.stderr)
    return out.stderr.strip()


@pytest.mark.slow
def test_kill_dvc_repro_at_random_points_then_rerun_equals_undisturbed(tmp_path):
    a, b = _make(tmp_path / "a"), _make(tmp_path / "b")
    env_a, env_b = _env(a, tmp_path / "tmp-a"), _env(b, tmp_path / "tmp-b")
    log = []

    def note(text):
        log.append(text)
        print(text, flush=True)

    try:
        # 1. undisturbed
        ref = Repro(a, env_a).watch()
        assert ref.proc.returncode == 0, ref.output[-4000:]
        stages = _stage_outs(a)
        assert set(stages) == set(ref.events)
        note(f"undisturbed dvc repro: {ref.seconds:.0f} s; per stage, s since start: start/first result "
             "file/last/command done/dvc.lock (result files): " + "; ".join(
                 f"{s} " + "/".join(f"{e.get(k, float('nan')):.1f}" for k in
                                    ("start", "artifact", "last_artifact", "commit", "lock"))
                 + f" ({e.get('files', 0)})" for s, e in ref.events.items()))

        def plan(stage, trigger):
            ev = ref.events[stage]
            if trigger == "files":
                return rng.uniform(0, 0.2), rng.randint(1, max(1, ev["files"] - 1))
            window = ev["commit"] - ev["start"] if trigger == "start" else (ev["lock"] - ev["commit"]) / 2
            return rng.uniform(0, window), 0

        # 2. killed at seeded random points, the invariant checked after each kill
        rng = random.Random(SEED)
        kills = kernels = stale = corrupt = broken = 0
        changed: set[str] = set()                        # what dvc status lists after the last kill
        for stage, trigger in PLAN:
            delay, files = plan(stage, trigger)
            r = Repro(b, env_b, kill=(stage, trigger, delay, files)).watch()
            if r.killed_in is None:                      # it finished before the trigger came
                assert r.proc.returncode == 0, r.output[-4000:]
                changed = set()
                note(f"kill planned in {stage} ({trigger} {files} + {delay:.2f} s): dvc repro finished first")
                continue
            kills += 1
            kernels += "ipykernel" in r.killed
            assert r.proc.returncode == -signal.SIGKILL
            assert not dvcrepo.processes(b), dvcrepo.processes(b)
            quiet = _everything(b)                       # nothing keeps writing after the kill
            time.sleep(1.0)
            assert _everything(b) == quiet
            # .dvc/tmp/lock still names the killed dvc, but the lock itself (fcntl) died with it:
            # dvc status, which takes it, runs
            assert (b / ".dvc" / "tmp" / "lock").read_text().split() == [str(r.proc.pid)]
            lock = _rwlock(b)
            if lock is None:
                # killed while DVC rewrote .dvc/tmp/rwlock (it truncates the file, then writes the JSON): every
                # dvc command now refuses to run until the file is removed (DVC's own advice for a stuck rwlock)
                corrupt += 1
                error = _dvc_refuses(b, env_b, (CORRUPT_RWLOCK,), "status")
                note(f"  .dvc/tmp/rwlock left {(b / '.dvc/tmp/rwlock').stat().st_size} bytes long; dvc status: "
                     f"{error!r}; removing .dvc/tmp/rwlock")
                (b / ".dvc" / "tmp" / "rwlock").unlink()
                lock = {}
            dead = [p for p, info in lock.get("write", {}).items() if info["pid"] == r.proc.pid]
            first = _dvc(b, env_b, "status", "--json")
            warnings = first.stderr
            if first.returncode != 0 and any(m in first.stderr for m in BROKEN_LOCK_FILE):
                # killed while DVC rewrote dvc.lock (in place, like the rwlock: empty or cut short): DVC refuses
                # it; with it removed, the next dvc repro restores what its run cache holds and redoes the rest
                broken += 1
                note(f"  dvc.lock left {(b / 'dvc.lock').stat().st_size} bytes long (YAML with stages: "
                     f"{_lock_file(b) is not None}); dvc status: {first.stderr.strip()!r}; removing dvc.lock")
                (b / "dvc.lock").unlink()
            changed, more = _status(b, env_b)
            warnings += more
            assert not (b / "dvc.lock").exists() or _lock_file(b) is not None   # the dvc.lock DVC accepts parses
            if dead:                                     # the killed dvc's write locks do not block: removed
                assert f"(Pid {r.proc.pid})" in warnings and STALE_RWLOCK in warnings, warnings
                assert not [p for p, info in (_rwlock(b) or {}).get("write", {}).items()
                            if info["pid"] == r.proc.pid]
                stale += 1
            assert changed <= set(stages), changed
            done = sorted(set(stages) - changed)
            for s in done:                               # what DVC takes as done is the undisturbed result
                _assert_stage_equal(a, b, stages[s])
            note(f"kill {kills}: that dvc repro ran {sorted(dvcrepo.ran(r.output))}, restored "
                 f"{sorted(set(re.findall(CACHED, r.output)))}; planned {stage} {trigger}"
                 f"{f' {files}' if files else ''} + {delay:.2f} s; landed {r.killed_at:.1f} s into "
                 f"{r.killed_in} ({r.phase}; it had written {len(r.written)} result files"
                 f"{', last ' + r.written[-1] if r.written else ''}); killed {r.killed}; stale rwlock write "
                 f"entries: {[Path(p).relative_to(b).as_posix() for p in dead]}; dvc status changed: "
                 f"{sorted(changed)}; done and equal to A: {done}")
        assert kills >= 3, log
        assert kernels >= 1, log                         # at least one kill caught a notebook's kernel

        # 3. rerun to the end
        final = Repro(b, env_b).watch()
        assert final.proc.returncode == 0, final.output[-4000:]
        cached = set(re.findall(CACHED, final.output))
        assert changed <= dvcrepo.ran(final.output) | cached     # what was not done is redone or restored
        note(f"final dvc repro: {final.seconds:.0f} s, ran {sorted(dvcrepo.ran(final.output))}, restored from "
             f"the run cache {sorted(cached)}")
        assert _status(b, env_b)[0] == set()
        for s, outs in stages.items():
            _assert_stage_equal(a, b, outs)
        res = a / "results" / EXPERIMENT
        cfg = load_params(a / "params.yaml")
        for run in cfg.runs:                             # the headline results, spelled out
            for tag in ("sp50_00", "sp90_00"):
                ma, mb = (Masks.load(r / layout.masks_dir(cfg, run, 0) / layout.mask_file(tag)) for r in (a, b))
                assert all(torch.equal(ma[k], mb[k]) for k in ma)
            pd.testing.assert_frame_equal(pd.read_csv(a / layout.train_dir(cfg, run, 0) / "results.csv"),
                                          pd.read_csv(b / layout.train_dir(cfg, run, 0) / "results.csv"),
                                          check_exact=True)
        assert json.loads((res / "metrics.json").read_text()) == json.loads(
            (b / "results" / EXPERIMENT / "metrics.json").read_text())
        assert (res / "plots" / "table.md").read_bytes() == (b / "results" / EXPERIMENT / "plots" /
                                                              "table.md").read_bytes()
        rw = _rwlock(b)
        assert rw is not None and not rw.get("write"), rw
        stale_reads = sorted({i["pid"] for v in rw.get("read", {}).values() for i in v})
        # what the kills leave in TMPDIR: the connection file (ports and HMAC key, mode 0600) of each
        # kernel whose papermill was killed; the undisturbed run leaves nothing
        assert list((tmp_path / "tmp-a").iterdir()) == []
        leftovers = sorted((tmp_path / "tmp-b").iterdir())
        for f in leftovers:
            assert f.suffix == ".json" and {"shell_port", "key"} <= set(json.loads(f.read_text())), f
        note(f"left in B's TMPDIR: {len(leftovers)} kernel connection files; .dvc/tmp/rwlock after the final repro: "
             f"no write entries, read entries of dead pids {stale_reads}; unreadable rwlock after {corrupt} "
             f"kill(s); broken dvc.lock after {broken}; stale write entries auto-removed after {stale} kill(s)")

        # the unreadable-rwlock failure, made on purpose: an empty .dvc/tmp/rwlock (what a kill while DVC
        # rewrites it leaves) stops `dvc repro` until the file is removed
        (b / ".dvc" / "tmp" / "rwlock").write_text("")
        _dvc_refuses(b, env_b, (CORRUPT_RWLOCK,), "repro")
        (b / ".dvc" / "tmp" / "rwlock").unlink()
        again = _dvc(b, env_b, "repro")
        assert again.returncode == 0 and "Data and pipelines are up to date." in again.stdout, again

        # the broken-dvc.lock failure, made on purpose: an empty dvc.lock (what a kill while DVC rewrites it
        # leaves) stops `dvc repro`; with it removed, `dvc repro` restores the prune and train stages from
        # DVC's run cache (no training again), and the results are still the undisturbed ones
        (b / "dvc.lock").write_text("")
        _dvc_refuses(b, env_b, BROKEN_LOCK_FILE, "repro")
        (b / "dvc.lock").unlink()
        again = _dvc(b, env_b, "repro")
        assert again.returncode == 0, again
        cached, ran = set(re.findall(CACHED, again.stdout)), dvcrepo.ran(again.stdout)
        assert cached | ran == set(stages) and {s for s in stages if s.startswith(("prune@", "train@"))} <= cached
        note(f"dvc.lock emptied on purpose, dvc repro refused, removed: dvc repro restored {sorted(cached)}, "
             f"ran {sorted(ran)}")
        assert _status(b, env_b)[0] == set()
        for s, outs in stages.items():
            _assert_stage_equal(a, b, outs)
    finally:
        print("\n".join(["--- summary ---", *log]), flush=True)
    # 4. nothing left running
    assert not dvcrepo.processes(a, b), dvcrepo.processes(a, b)
