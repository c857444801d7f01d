"""The trainer (ntksap.train): real learning on digits, masks, metrics files,
checkpoints and resume (in process and after SIGKILL), config validation, and
a short real-data run on the shared CIFAR-10."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import ntksap
from conftest import sigkill_after_epochs
from ntksap import Masks, build_model, data, params, train

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def digits(data_root):
    return data.get_dataset("digits", root=data_root)


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("digits_cnn", 10)


def _random_masks(model, density=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(m.shape, generator=g) < density).float() for n, m in Masks.ones_like(model).items()})


def _short(**kw):
    return params.protocol("digits", **{"epochs": 3, "milestones": (2,), **kw})


# ---------------------------------------------------------------------------------
# real learning
# ---------------------------------------------------------------------------------
def test_digits_dense_reaches_95_percent_within_a_minute(digits, tmp_path):
    t0 = time.perf_counter()
    df = train.train(_model(), None, digits, params.protocol("digits"), tmp_path, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"\ndigits dense: test top-1 {df.test_top1.iloc[-1]:.2f} % in {elapsed:.1f} s")
    assert elapsed < 60
    assert df.test_top1.iloc[-1] >= 95.0
    assert df.train_loss.iloc[-1] < df.train_loss.iloc[0]
    assert list(df.columns) == train.HISTORY_COLUMNS and len(df) == params.protocol("digits").epochs


def test_digits_ntksap_pruned_90_percent_trains(digits, tmp_path):
    model = _model()
    masks = ntksap.prune(model, "ntksap", 0.9, input_shape=digits.input_shape, seed=0, progress=False)
    assert masks.density == pytest.approx(0.1, abs=1e-3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    df = train.train(model, masks, digits, params.protocol("digits"), tmp_path, progress=False)
    print(f"\ndigits NTK-SAP 90 % sparse: test top-1 {df.test_top1.iloc[-1]:.2f} %")
    assert df.test_top1.iloc[-1] >= 80.0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["density"] == pytest.approx(masks.density) and metrics["sparsity"] == pytest.approx(0.9, abs=1e-3)
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, m in masks.items():
        assert torch.all(final[name][m == 0] == 0)          # pruned weights exactly zero at the end
        assert not torch.equal(final[name], init[name])       # and the kept ones trained


def test_masks_enforced_and_optimizer_state_stays_zero(digits, tmp_path):
    model = _model()
    masks = _random_masks(model, 0.3)
    train.train(model, masks, digits, _short(), tmp_path, progress=False)
    ckpt = train.load_checkpoint(tmp_path / "checkpoint.pt")
    names = [n for n, _ in model.named_parameters()]
    for i, name in enumerate(names):
        if name in masks:
            m = masks[name]
            assert torch.all(ckpt["members"][0]["model"][name][m == 0] == 0)
            assert torch.all(ckpt["optimizer"]["state"][i]["momentum_buffer"][m == 0] == 0)
            assert torch.count_nonzero(ckpt["members"][0]["model"][name][m == 1]) == int(m.sum())


# ---------------------------------------------------------------------------------
# outputs, evaluation, schedule
# ---------------------------------------------------------------------------------
def test_outputs_and_schedule(digits, tmp_path):
    cfg = params.protocol("digits", epochs=4, milestones=(1, 3), lr=0.05, gamma=0.5)
    df = train.train(_model(), None, digits, cfg, tmp_path, progress=False)
    assert df.lr.tolist() == pytest.approx([0.05, 0.025, 0.025, 0.0125])   # lr of each epoch, naive schedule
    on_disk = pd.read_csv(tmp_path / "history.csv")
    assert list(on_disk.columns) == train.HISTORY_COLUMNS
    pd.testing.assert_frame_equal(on_disk, df, check_dtype=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["test_top1"] == pytest.approx(df.test_top1.iloc[-1]) and m["epochs"] == 4
    assert m["best_test_top1"] == pytest.approx(df.test_top1.max()) and m["density"] == 1.0
    assert (df.epoch_time > 0).all() and df.epoch.tolist() == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".*.tmp"))                  # no temporary files left behind


def test_fractional_milestones_drop_the_lr_at_the_nearest_batch(digits, tmp_path, monkeypatch):
    """The lr of every optimizer step against a naive count: lr0 x gamma^(milestones
    m with m x batches-per-epoch, halves rounded up, at or before the steps done)."""
    cfg = params.protocol("digits", epochs=2, milestones=(0.5, 1, 1.5), lr=0.08, gamma=0.5, batch_size=64)
    steps = math.ceil(digits.num_train / 64)          # 1437 images: 23 batches, 11.5 falls at 12
    seen = []
    model = _model()

    def record(opt, args, kwargs):
        seen.append(opt.param_groups[0]["lr"])

    real_sgd = torch.optim.SGD

    class Recording(real_sgd):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_step_pre_hook(record)

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    df = train.train(model, None, digits, cfg, tmp_path, progress=False)
    drops = [int(m * steps + 0.5) for m in (0.5, 1, 1.5)]
    assert drops == [12, 23, 35]
    want = [0.08 * 0.5 ** sum(d <= i for d in drops) for i in range(2 * steps)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert df.lr.tolist() == pytest.approx([0.08, 0.02])          # the lr at each epoch's start
    assert train.milestone_steps([2, 0.001], 23) == [46, 1]        # an integer epoch exactly; never step 0


@pytest.mark.parametrize("how, want", [(False, []), (True, [None]), ("reduce-overhead", ["reduce-overhead"])])
def test_train_compile_picks_the_torch_compile_mode(digits, tmp_path, monkeypatch, how, want):
    """train.compile reaches torch.compile as its mode (one call: the net trained and
    evaluated), and compiling changes no result (the stand-in compiler returns a
    counting wrapper, so the trainer must run through what torch.compile returned)."""
    calls, forwards = [], []

    class Counted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            forwards.append(len(x))
            return self.inner(x)

    def fake_compile(module, mode=None, **kw):
        calls.append(mode)
        return Counted(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = params.protocol("digits", epochs=1, compile=how)
    df = train.train(_model(), None, digits, cfg, tmp_path / "a", progress=False)
    ref = train.train(_model(), None, digits, params.protocol("digits", epochs=1), tmp_path / "b", progress=False)
    assert calls == want
    assert (sum(forwards) > 0) == bool(want)
    pd.testing.assert_frame_equal(df.drop(columns="epoch_time"), ref.drop(columns="epoch_time"))


def test_evaluate_matches_naive_per_sample_computation(digits):
    model = _model(3).eval()
    loader = data.DeviceLoader(digits, "test", batch_size=64)
    got = train.evaluate(model, loader)
    x = data.normalise(digits, digits.test_images)
    losses, c1, c5 = [], 0, 0
    with torch.no_grad():
        for xi, yi in zip(x, digits.test_labels):
            out = model(xi[None])[0]
            losses.append(F.cross_entropy(out[None], yi[None]).item())
            order = sorted(range(10), key=lambda k: -out[k].item())
            c1 += order[0] == yi.item()
            c5 += yi.item() in order[:5]
    n = len(losses)
    assert got["loss"] == pytest.approx(sum(losses) / n, rel=1e-4)
    assert got["top1"] == pytest.approx(100 * c1 / n) and got["top5"] == pytest.approx(100 * c5 / n)


def test_zero_epochs_evaluates_the_initial_model(digits, tmp_path):
    model = _model()
    ref = train.evaluate(model, data.DeviceLoader(digits, "test", batch_size=500))
    df = train.train(model, None, digits, params.protocol("digits", epochs=0), tmp_path, progress=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(df) == 0 and m["epochs"] == 0 and m["train_loss"] is None
    assert m["test_top1"] == pytest.approx(ref["top1"])


# ---------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("epochs", -1), ("lr", 0.0), ("lr", float("nan")), ("batch_size", 0),
                                         ("momentum", 1.0), ("weight_decay", -1e-4), ("milestones", (5, 3)),
                                         ("gamma", 0.0), ("nesterov", "yes"), ("amp", "auto")])
def test_bad_config_values_are_refused_before_training(digits, tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        params.protocol("digits", **{field: value})
    cfg = params.protocol("digits")
    with pytest.raises(ValueError, match=f"{field}="):   # a changed field is checked too
        setattr(cfg, field, value)
    with pytest.raises(ValueError, match="ntksap.params.Train"):
        train.train(_model(), None, digits, vars(cfg), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_bad_masks_are_refused(digits, tmp_path):
    with pytest.raises(ValueError, match="fc.weight"):
        train.train(_model(), {"fc.weight": torch.ones(3, 3)}, digits, _short(), tmp_path, progress=False)


def test_protocols_follow_the_paper():
    assert set(params.protocols()) == set(data.DATASETS)
    p = {name: params.protocol(name) for name in data.DATASETS}
    assert (p["cifar10"].epochs, p["cifar10"].batch_size, p["cifar10"].lr, p["cifar10"].weight_decay,
            p["cifar10"].milestones, p["cifar10"].nesterov) == (160, 128, 0.1, 1e-4, [80, 120], False)
    assert (p["cifar100"].weight_decay, p["cifar100"].milestones, p["cifar100"].nesterov) == (5e-4, [60, 120], True)
    assert (p["tiny_imagenet"].epochs, p["tiny_imagenet"].batch_size, p["tiny_imagenet"].lr,
            p["tiny_imagenet"].milestones) == (200, 256, 0.2, [100, 150])
    assert (p["imagenet"].epochs, p["imagenet"].milestones) == (90, [30, 60, 80])


# ---------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------
def _compare_runs(a: Path, b: Path):
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    cols = [c for c in train.HISTORY_COLUMNS if c != "epoch_time"]
    pd.testing.assert_frame_equal(ha[cols], hb[cols], check_exact=True)
    wa, wb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma == mb


@pytest.mark.parametrize("milestones", [(2,), (1.5, 2.5)], ids=["epochs", "fractions"])
def test_resume_after_ctrl_c_equals_uninterrupted_run(digits, tmp_path, monkeypatch, milestones):
    model = _model()
    masks = _random_masks(model)
    cfg = params.protocol("digits", epochs=4, milestones=milestones)
    train.train(_model(), masks, digits, cfg, tmp_path / "full", progress=False)

    calls = {"n": 0}
    real_evaluate = train.evaluate

    def interrupt_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", interrupt_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train(_model(), masks, digits, cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert train.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 2
    assert not (tmp_path / "cut" / "metrics.json").exists()
    df = train.train(_model(), masks, digits, cfg, tmp_path / "cut", progress=False)
    assert df.attrs["resumed_from_epoch"] == 2 and len(df) == 4
    _compare_runs(tmp_path / "full", tmp_path / "cut")


def test_resume_after_sigkill_equals_uninterrupted_run(data_root, digits, tmp_path):
    """A real training process killed with SIGKILL mid-run, then rerun."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    child = [sys.executable, str(ROOT / "tests" / "_train_child.py")]
    epochs = 6

    def run(out, *extra):
        r = subprocess.run(child + [str(out), str(data_root), str(epochs), *extra], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    full = run(tmp_path / "full")
    assert full["resumed_from"] == 0

    cut = tmp_path / "cut"
    sigkill_after_epochs(child + [str(cut), str(data_root), str(epochs), "0.02"], env, cut / "history.csv")
    assert not (cut / "metrics.json").exists()
    killed_at = train.load_checkpoint(cut / "checkpoint.pt")["epoch"]
    assert 2 <= killed_at < epochs
    before = pd.read_csv(cut / "history.csv")

    (cut / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")   # as a kill mid-write leaves
    resumed = run(cut)
    assert resumed["resumed_from"] == killed_at
    assert not list(cut.glob(".*.tmp"))
    _compare_runs(tmp_path / "full", cut)
    after = pd.read_csv(cut / "history.csv")
    # the epochs done before the kill were loaded, not recomputed: same measured times
    assert after.epoch_time.iloc[:killed_at].tolist() == before.epoch_time.iloc[:killed_at].tolist()


def test_finished_run_is_returned_without_retraining(digits, tmp_path, monkeypatch):
    cfg = _short()
    model = _model()
    df = train.train(model, None, digits, cfg, tmp_path, progress=False)
    stamps = {f: (tmp_path / f).stat().st_mtime_ns for f in ("model.pt", "metrics.json", "history.csv")}
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: pytest.fail("retrained a finished run"))
    fresh = _model()
    again = train.train(fresh, None, digits, cfg, tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, df)
    assert again.attrs["resumed_from_epoch"] == cfg.epochs
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in stamps} == stamps
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k                               # final weights loaded into the new model
    train.train(model, None, digits, cfg, tmp_path, progress=False)   # the trained model itself is accepted too


def test_mismatched_checkpoint_is_refused(digits, tmp_path):
    model = _model()
    masks = _random_masks(model)
    train.train(_model(), masks, digits, _short(), tmp_path, progress=False)
    with pytest.raises(train.CheckpointError, match=r"config\.lr"):
        train.train(_model(), masks, digits, _short(lr=0.05), tmp_path, progress=False)
    with pytest.raises(train.CheckpointError, match="masks"):
        train.train(_model(), _random_masks(model, seed=2), digits, _short(), tmp_path, progress=False)
    with pytest.raises(train.CheckpointError, match="seed"):
        train.train(_model(), masks, digits, _short(), tmp_path, seed=1, progress=False)
    with pytest.raises(train.CheckpointError, match="initial_weights"):
        train.train(_model(5), masks, digits, _short(), tmp_path, progress=False)
    with pytest.raises(train.CheckpointError, match="dataset"):
        train.train(_model(), masks, data.subset(digits, train=500), _short(), tmp_path, progress=False)
    # execution-only settings may differ between a run and its resume
    train.train(_model(), masks, digits, _short(channels_last=False, eval_batch_size=100), tmp_path, progress=False)


def test_corrupt_checkpoint_is_a_clear_error_and_kept(digits, tmp_path):
    cfg = params.protocol("digits", epochs=2, milestones=())
    train.train(_model(), None, digits, cfg, tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(train.CheckpointError, match="corrupt"):
        train.train(_model(), None, digits, cfg, tmp_path, progress=False)
    assert ckpt.read_bytes() == raw[: len(raw) // 3]              # never silently overwritten
    torch.save({"something": 1}, ckpt)
    with pytest.raises(train.CheckpointError, match="not an ntksap training checkpoint"):
        train.train(_model(), None, digits, cfg, tmp_path, progress=False)


# ---------------------------------------------------------------------------------
# real data: the shared CIFAR-10
# ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="../shared/data/cifar10-jpeg.tar.gz is absent")
def test_resnet20_learns_on_shared_cifar10(tmp_path):
    b = data.get_dataset("cifar10", root=tmp_path / "data", local_path=SHARED_CIFAR)
    assert (b.num_train, b.num_test) == (50000, 10000) and b.classes[0] == "airplane"
    assert torch.bincount(b.test_labels).tolist() == [1000] * 10
    mean = (b.train_images[::10].float().mean((0, 2, 3)) / 255).tolist()
    assert mean == pytest.approx(list(b.mean), abs=5e-3)         # PAPER.md's normalisation constants
    small = data.subset(b, train=4000, test=1000, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    cfg = params.protocol("cifar10", epochs=2, milestones=(), lr=0.05)
    t0 = time.perf_counter()
    df = train.train(model, None, small, cfg, tmp_path / "run", progress=False)
    print(f"\nResNet-20 on 4000 shared CIFAR-10 images, 2 epochs: {df.to_dict('records')} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert df.test_top1.iloc[-1] > 20.0                       # chance is 10 %
    assert df.test_loss.iloc[-1] < 2.2 < 2.303                # below the loss of a uniform guess, ln 10
    assert df.train_loss.iloc[-1] < df.train_loss.iloc[0]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_asked_for_on_a_device_without_bf16_hardware_warns_naming_the_knob(digits, tmp_path, monkeypatch,
                                                                                 native):
    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    import warnings as _warnings
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        df = train.train(_model(), None, digits, _short(epochs=1, milestones=(), amp=True), tmp_path,
                         progress=False, device="cpu")
    slow = [w for w in caught if "train.amp=True" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if slow:
        assert "no bf16 hardware" in str(slow[0].message) and "null or false" in str(slow[0].message)
    assert len(df) == 1  # it still trains


def test_the_default_amp_never_warns_on_a_cpu(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    import warnings as _warnings
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        train.train(_model(), None, digits, _short(epochs=1, milestones=()), tmp_path, progress=False, device="cpu")
    assert not [w for w in caught if "train.amp" in str(w.message)]
