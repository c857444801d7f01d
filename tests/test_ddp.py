"""DistributedDataParallel training (ntksap.distributed) for real: 2 CPU
processes on the gloo backend launched by torchrun, on a digits subset."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ntksap import Masks, data, params, train
from ntksap.hashing import tensor_digest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import _ddp_child  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.get_dataset("digits", root=root)        # cache once, before the ranks start
    return root


def _random_masks(model, density=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(m.shape, generator=g) < density).float() for n, m in Masks.ones_like(model).items()})


def test_ddp_two_gloo_ranks_equal_one_process_run(data_root, tmp_path):
    """Same masks on both ranks, pruned weights zero, identical weights on the
    ranks, and the result equals a one-process run with the same global batch
    (BatchNorm-free net: per-rank BN statistics would differ by design)."""
    torch.set_num_threads(1)
    masks = _random_masks(_ddp_child.no_bn_model())
    masks.save(tmp_path / "mask.pt")
    _torchrun([str(ROOT / "tests" / "_ddp_child.py"), str(tmp_path), str(data_root), str(tmp_path / "mask.pt")])

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"] == tensor_digest(masks)
    assert ranks[0]["pruned_zero"] and ranks[1]["pruned_zero"]
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k                     # DDP keeps the replicas in lockstep

    # the independent reference: the plain one-process trainer, same global batch of 64
    model = _ddp_child.no_bn_model()
    ref = train.train(model, masks, _ddp_child.small_digits(data_root), params.protocol("digits", **_ddp_child.CONFIG),
                      tmp_path / "single", seed=3, device="cpu", progress=False)
    ddp = pd.read_csv(tmp_path / "run" / "history.csv")
    assert ddp.train_loss.iloc[1] < ddp.train_loss.iloc[0]
    # tolerance: float sums in another order (two shard means averaged vs one mean)
    assert ddp.train_loss.tolist() == pytest.approx(ref.train_loss.tolist(), rel=1e-4)
    assert ddp.test_loss.tolist() == pytest.approx(ref.test_loss.tolist(), rel=1e-4)
    single = model.state_dict()
    for k in single:
        torch.testing.assert_close(s0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    disk = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for k in disk:
        assert torch.equal(disk[k], s0[k]), k                   # rank 0 wrote its weights


def test_ddp_cli_trains_a_saved_mask_and_resumes(data_root, tmp_path):
    """`torchrun -m ntksap.distributed` on digits_cnn (with BatchNorm): loss
    decreases, pruned weights stay zero, only rank 0 writes, and a rerun
    returns the finished run without training again."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from ntksap import build_model
    masks = _random_masks(build_model("digits_cnn", 10), density=0.3)
    masks.save(tmp_path / "mask.pt")
    out = tmp_path / "run"
    args = ["-m", "ntksap.distributed", "--masks", str(tmp_path / "mask.pt"), "--model", "digits_cnn",
            "--dataset", "digits", "--device", "cpu", "--backend", "gloo", "--data-root", str(data_root),
            "--out-dir", str(out), "--epochs", "2", "--milestones", "1", "--train-subset", "512", "--test-subset", "200"]
    r = _torchrun(args)
    line = json.loads([s for s in r.stdout.splitlines() if s.startswith("{")][-1])
    assert line["world_size"] == 2 and line["masks_sha256"] == tensor_digest(masks)
    assert line["density"] == pytest.approx(masks.density, abs=1e-12)
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 2 and hist.train_loss.iloc[1] < hist.train_loss.iloc[0]
    state = torch.load(out / "model.pt", weights_only=True)
    for n, m in masks.items():
        assert bool((state[n][m == 0] == 0).all()), n
        assert bool((state[n][m == 1] != 0).any()), n
    ckpt = train.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["members"][0]["fingerprint"]["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.csv", "metrics.json", "model.pt"]
    mtime = (out / "model.pt").stat().st_mtime_ns
    _torchrun(args)                                             # finished: nothing is retrained or rewritten
    assert (out / "model.pt").stat().st_mtime_ns == mtime
    assert pd.read_csv(out / "history.csv").equals(hist)


def test_ddp_cli_help_and_refuses_plain_launch(capsys, monkeypatch):
    from ntksap import distributed
    with pytest.raises(SystemExit) as e:
        distributed.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "torchrun" in out and "--masks" in out and "--out-dir" in out
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="launch with torchrun"):
        distributed.main(["--masks", "m.pt", "--model", "digits_cnn", "--dataset", "digits", "--out-dir", "x"])


@pytest.mark.parametrize("stack", ["off", "lockstep", "grouped"])
def test_ddp_train_stage_launches_torchrun_when_train_processes_is_2(data_root, tmp_path, monkeypatch, stack):
    """The pipeline's train stage (``ntksap.stages.train.train_run``) with
    ``train.processes: 2`` trains every pruned net with 2 DDP processes, one by
    one (``train.stack: off``) or both at once (stacked): the checkpoint says
    world size 2, pruned weights stay zero, the nets learn, the stage output
    holds the results; a rerun trains nothing again; 1 process uses another
    resume folder (its key differs). Stacked, the two nets equal the ones
    trained one by one (lockstep: exactly; grouped: to float rounding)."""
    from ntksap import config
    from ntksap.params import parse_params
    from ntksap.stages import prune as prune_stage
    from ntksap.stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NTKSAP_DATA_ROOT", str(data_root))
    params = config.compose("micro", ["train.epochs=2", "train.processes=2", "prune.track.mode=none",
                                      f"train.stack={stack}"])
    cfg = parse_params(params)
    prune_stage.prune_run(cfg, "magnitude", 0, tmp_path / "p")
    res, hist = train_stage.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t", checkpoints=tmp_path / "ck")
    assert res["tag"].tolist() == ["sp50_00", "sp90_00"] and len(hist) == 2 * 2
    assert (res["test_top1"] > 50).all()                      # 10 classes: chance is 10 %
    work = sorted((tmp_path / "ck").iterdir())
    if stack == "off":
        assert [p.name.split("-")[0] for p in work] == ["sp50_00", "sp90_00"]
        checkpoints, members = [f / "checkpoint.pt" for f in work], work
    else:
        assert [p.name.split("-")[0] for p in work] == [f"{stack}2"]
        checkpoints, members = [work[0] / "checkpoint.pt"], [work[0] / "sp50_00", work[0] / "sp90_00"]
    for path in checkpoints:
        ckpt = train.load_checkpoint(path)
        assert all(m["fingerprint"]["world_size"] == 2 for m in ckpt["members"]) and ckpt["epoch"] == 2
    for row, folder in zip(res.itertuples(), members):
        masks = Masks.load(tmp_path / "p" / f"{row.tag}.pt")
        state = torch.load(tmp_path / "t" / row.tag / "model.pt", weights_only=True)
        for n, m in masks.items():
            assert bool((state[n][m == 0] == 0).all()), n
        assert (tmp_path / "t" / row.tag / "metrics.json").read_bytes() == (folder / "metrics.json").read_bytes()
    mtimes = [(f / "model.pt").stat().st_mtime_ns for f in members]
    again, _ = train_stage.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t2", checkpoints=tmp_path / "ck")
    assert again.equals(res) and [(f / "model.pt").stat().st_mtime_ns for f in members] == mtimes
    run = train.fingerprint(torch.nn.Linear(1, 1), None, data.get_dataset("digits", root=data_root), cfg.train, 0)
    assert train_stage.resume_key(run, 1) != train_stage.resume_key(run, 2)
    if stack != "off":   # the same two nets trained one by one under DDP
        one = config.compose("micro", ["train.epochs=2", "train.processes=2", "prune.track.mode=none",
                                       "train.stack=off"])
        single, _ = train_stage.train_run(parse_params(one), "magnitude", 0, tmp_path / "p", tmp_path / "t1",
                                          checkpoints=tmp_path / "ck1")
        init = torch.load(tmp_path / "p" / "init.pt", weights_only=True)

        def flat(w):
            return torch.cat([w[k].double().reshape(-1) for k in sorted(w) if w[k].is_floating_point()])

        for tag in ("sp50_00", "sp90_00"):
            a = torch.load(tmp_path / "t" / tag / "model.pt", weights_only=True)
            b = torch.load(tmp_path / "t1" / tag / "model.pt", weights_only=True)
            if stack == "lockstep":
                assert all(torch.equal(a[k], b[k]) for k in b)
            else:   # float32 rounding, amplified by training: see test_train_stacked.test_stacked_equals_one_by_one
                off, moved = (flat(a) - flat(b)).norm(), (flat(b) - flat(init)).norm()
                assert off <= 3e-2 * moved, (tag, float(off / moved))


def test_ddp_bad_process_count_is_refused_before_any_work():
    from ntksap import config
    from ntksap.params import ParamsError, parse_params
    from ntksap.stages.train import resolve_processes

    for bad in (0, "two", 1.5):
        params = config.compose("micro", [f"train.processes={bad}"])
        with pytest.raises(ParamsError, match=rf"train.processes={bad!r} is not allowed.*'auto'"):
            parse_params(params)
        with pytest.raises(ValueError, match=rf"train.processes={bad!r} is not allowed"):
            resolve_processes(bad, "cpu")
    assert parse_params(config.compose("micro", ["train.processes=auto"])).train.processes == "auto"
    assert resolve_processes("auto", "cpu") == 1 and resolve_processes(3, "cpu") == 3
