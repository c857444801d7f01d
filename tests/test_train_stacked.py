"""Stacked training (ntksap.train.train_stacked): K networks of one curve at
once equal the K trained one by one with ntksap.train.train (lockstep bit for
bit, grouped to float rounding) for the digits net, ResNet-20 and VGG-16-BN;
a stacked run killed with SIGKILL resumes to the uninterrupted result; the
train stage picks the engine (train.stack) and falls back to one at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import sigkill_after_epochs
from ntksap import Masks, build_model, data, params, train

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _masks(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(m.shape, generator=g) < density).float() for n, m in Masks.ones_like(model).items()})


def _nets(name, num_classes, densities=(0.5, 0.2, None)):
    """K copies of one init (as the train stage's sparsities), each with its own masks (None: dense)."""
    nets = []
    for k, d in enumerate(densities):
        torch.manual_seed(0)
        model = build_model(name, num_classes)
        nets.append((model, None if d is None else _masks(model, d, seed=k + 1)))
    return nets


def _small(name, n_train, n_test, num_classes):
    spec = data.SPECS[name]
    g = torch.Generator().manual_seed(3)
    shape = spec.input_shape
    return data.from_tensors(name, torch.randint(0, 256, (n_train, *shape), dtype=torch.uint8, generator=g),
                             torch.randint(0, num_classes, (n_train,), generator=g),
                             torch.randint(0, 256, (n_test, *shape), dtype=torch.uint8, generator=g),
                             torch.randint(0, num_classes, (n_test,), generator=g))


CASES = {  # model: (dataset, train images, test images, batch, classes)
    "digits_cnn": ("digits", 96, 40, 16, 10),
    "resnet20": ("cifar10", 48, 20, 16, 10),
    "vgg16_bn": ("cifar100", 32, 20, 16, 100),
}


def _load(folder: Path) -> tuple[dict, pd.DataFrame, dict]:
    return (torch.load(folder / "model.pt", weights_only=True), pd.read_csv(folder / "history.csv"),
            json.loads((folder / "metrics.json").read_text()))


def _flat(weights: dict) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for n, t in sorted(weights.items()) if t.is_floating_point()])


@pytest.mark.parametrize("model_name", list(CASES))
def test_stacked_equals_one_by_one(model_name, tmp_path):
    """Two epochs (6 / 3 / 2 SGD steps of batch 16, with augmentation, momentum,
    weight decay and an lr milestone) of three nets with different masks (one
    dense): lockstep gives the one-by-one weights, histories and metrics
    exactly. Grouped sums in another order, and float32 training at batch 16
    is ill-conditioned: the same nets trained one by one in NCHW instead of
    channels-last end up to 9e-2 of the distance their weights moved away
    (ResNet-20, VGG-16-BN; measured here too), grouped up to 1e-2. Grouped must
    stay within 3e-2 of that distance, pruned weights exactly zero; a wrong
    member, mask or BN statistic is O(1) off. The one-by-one reference uses the
    trainer's default layout, as the stacked runs do (channels-last, or NCHW
    where ``devices.channels_last_is_safe`` says so: ResNet-20 on an AVX2 CPU)."""
    dataset, n_train, n_test, batch, classes = CASES[model_name]
    bundle = _small(dataset, n_train, n_test, classes)
    cfg = params.protocol(dataset, epochs=2, batch_size=batch, milestones=[1], eval_batch_size=8)
    one, floor = [], []
    for ref, out, layout in ((one, "one", None), (floor, "nchw", False)):  # None: the trainer's default layout
        for k, (model, masks) in enumerate(_nets(model_name, classes)):
            train.train(model, masks, bundle, cfg.model_copy(update={"channels_last": layout}),
                        tmp_path / out / str(k), seed=4, progress=False)
            ref.append(_load(tmp_path / out / str(k)))
    nets_init = [{n: t.clone() for n, t in m.state_dict().items()} for m, _ in _nets(model_name, classes)]
    for kind in ("lockstep", "grouped"):
        nets = _nets(model_name, classes)
        frames = train.train_stacked([m for m, _ in nets], [mk for _, mk in nets], bundle, cfg, tmp_path / kind,
                                     seed=4, kind=kind, progress=False)
        assert len(frames) == 3
        for k, ((w1, h1, m1), (w0, _, _), (model, masks)) in enumerate(zip(one, floor, nets)):
            w, h, m = _load(tmp_path / kind / str(k))
            assert w.keys() == w1.keys()
            cols = [c for c in train.HISTORY_COLUMNS if c != "epoch_time"]
            if kind == "lockstep":
                for name in w1:
                    assert torch.equal(w[name], w1[name]), (kind, k, name)
                pd.testing.assert_frame_equal(h[cols], h1[cols], check_exact=True)
                assert m == m1
            else:
                init = _flat(nets_init[k])
                off = (_flat(w) - _flat(w1)).norm().item()
                noise = (_flat(w0) - _flat(w1)).norm().item()
                moved = (_flat(w1) - init).norm().item()
                print(f"{model_name} network {k}: grouped off by {off / moved:.1e} of the distance moved, "
                      f"NCHW by {noise / moved:.1e}")
                assert off <= 3e-2 * moved, (k, off / moved, noise / moved)
                assert h.train_loss.tolist() == pytest.approx(h1.train_loss.tolist(), rel=2e-2)
            for name, mask in (masks or {}).items():
                assert bool((w[name][mask == 0] == 0).all()), (kind, k, name)
            # the caller's models hold their final weights
            for name, t in model.state_dict().items():
                assert torch.equal(t.cpu(), w[name]), (kind, k, name)


def test_stacked_checkpoint_resume_and_refusals(tmp_path):
    bundle = _small("digits", 64, 20, 10)
    cfg = params.protocol("digits", epochs=2, batch_size=16, milestones=[1])
    nets = _nets("digits_cnn", 10)
    train.train_stacked([m for m, _ in nets], [mk for _, mk in nets], bundle, cfg, tmp_path, names=["a", "b", "c"],
                        progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "checkpoint.pt"]
    ckpt = train.load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["kind"] == "lockstep" and len(ckpt["members"]) == 3 and ckpt["epoch"] == 2
    # finished: returned without training, files untouched
    stamps = [(tmp_path / n / "model.pt").stat().st_mtime_ns for n in "abc"]
    again = _nets("digits_cnn", 10)
    frames = train.train_stacked([m for m, _ in again], [mk for _, mk in again], bundle, cfg, tmp_path,
                                 names=["a", "b", "c"], progress=False)
    assert [f.attrs["resumed_from_epoch"] for f in frames] == [2, 2, 2]
    assert [(tmp_path / n / "model.pt").stat().st_mtime_ns for n in "abc"] == stamps
    with pytest.raises(train.CheckpointError, match="grouped"):
        train.train_stacked([m for m, _ in again], [mk for _, mk in again], bundle, cfg, tmp_path,
                            names=["a", "b", "c"], kind="grouped", progress=False)
    other = _nets("digits_cnn", 10, densities=(0.5, 0.3, None))
    with pytest.raises(train.CheckpointError, match="network 1: masks"):
        train.train_stacked([m for m, _ in other], [mk for _, mk in other], bundle, cfg, tmp_path,
                            names=["a", "b", "c"], progress=False)
    with pytest.raises(ValueError, match="kind='vmap' is not allowed"):
        train.train_stacked([m for m, _ in other], None, bundle, cfg, tmp_path / "x", kind="vmap")
    with pytest.raises(ValueError, match="names="):
        train.train_stacked([m for m, _ in other], None, bundle, cfg, tmp_path / "x", names=["a", "a", "b"])
    with pytest.raises(ValueError, match="masks has 2 entries for 3 models"):
        train.train_stacked([m for m, _ in other], [None, None], bundle, cfg, tmp_path / "x")


@pytest.mark.parametrize("kind", ["lockstep", "grouped"])
def test_stacked_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tmp_path_factory, kind):
    """A stacked training process (three digits nets) killed with SIGKILL after
    two epochs, then rerun: every member equals the uninterrupted run exactly."""
    data_root = tmp_path_factory.mktemp("data")
    data.get_dataset("digits", root=data_root)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    child = [sys.executable, str(ROOT / "tests" / "_train_child.py")]
    epochs = 5

    def run(out, sleep="0"):
        r = subprocess.run(child + [str(out), str(data_root), str(epochs), sleep, kind], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert run(tmp_path / "full")["resumed_from"] == 0
    cut = tmp_path / "cut"
    sigkill_after_epochs(child + [str(cut), str(data_root), str(epochs), "0.02", kind], env, cut / "2" / "history.csv")
    killed_at = train.load_checkpoint(cut / "checkpoint.pt")["epoch"]
    assert 2 <= killed_at < epochs
    assert not any((cut / str(k) / "metrics.json").exists() for k in range(3))
    assert run(cut)["resumed_from"] == killed_at
    for k in range(3):
        (w, h, m), (w1, h1, m1) = _load(cut / str(k)), _load(tmp_path / "full" / str(k))
        assert all(torch.equal(w[n], w1[n]) for n in w1)
        cols = [c for c in train.HISTORY_COLUMNS if c != "epoch_time"]
        pd.testing.assert_frame_equal(h[cols], h1[cols], check_exact=True)
        assert m == m1


def test_stage_picks_the_engine_and_falls_back_when_the_nets_do_not_fit(monkeypatch, capsys):
    from ntksap.stages import train as train_stage

    bundle = _small("digits", 16, 8, 10)
    models = [m for m, _ in _nets("digits_cnn", 10)]
    cfg = params.protocol("digits")
    assert train_stage.stack_kind(cfg, models, bundle, "cpu") == "lockstep"
    assert train_stage.stack_kind(cfg, models[:1], bundle, "cpu") is None
    assert train_stage.stack_kind(params.protocol("digits", stack="off"), models, bundle, "cpu") is None
    assert train_stage.stack_kind(params.protocol("digits", stack="grouped"), models, bundle, "cpu") == "grouped"
    monkeypatch.setattr("ntksap.stacked.fits", lambda *a, **k: (False, "3 x lockstep members need ~9 GiB"))
    assert train_stage.stack_kind(cfg, models, bundle, "cpu") is None
    assert "one network at a time: 3 x lockstep members need ~9 GiB" in capsys.readouterr().out
    with pytest.raises(Exception, match="stack"):
        params.protocol("digits", stack="vmap")
    on_disk = data.Dataset(**{**{f: getattr(bundle, f) for f in ("name", "num_classes", "input_shape", "mean",
                                                                 "std", "augment", "classes", "train_labels",
                                                                 "test_labels")}})   # ImageNet-like: no tensors
    seen = []
    monkeypatch.setattr("ntksap.stacked.fits", lambda m, k, b, shape, *a, **kw: (seen.append(shape), (True, ""))[1])
    assert train_stage.stack_kind(cfg, models, on_disk, "cpu") == "lockstep" and seen == [(1, 8, 8)]
