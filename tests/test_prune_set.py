"""The prune set as the authors draw it (ntksap.data.prune_loader, PAPER.md
section 3) beside the class-balanced fixed one, and its config knob."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ntksap import augment, config, data
from ntksap.params import parse_params
from conftest import image_folders


def _skewed(n0=400, per_other=12, seed=0):
    """cifar10-shaped data: class 0 has ``n0`` images, classes 1..9 ``per_other`` each."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.zeros(n0, dtype=torch.int64)] +
                  [torch.full((per_other,), c, dtype=torch.int64) for c in range(1, 10)])
    x = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g)
    return data.from_tensors("cifar10", x, y, x[:10], y[:10])


@pytest.fixture(scope="module")
def skewed():
    return _skewed()


def _passes(loader, k, seed):
    torch.manual_seed(seed)
    return [list(loader) for _ in range(k)]


def _cat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _order(xs, originals):
    """Position in ``originals`` (N, ...) of every row of ``xs``: they must be exact copies."""
    d = torch.cdist(xs.flatten(1), originals.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    best = d.min(dim=1)
    assert best.values.max() < 1e-4, "an image is not one of the originals"
    return best.indices


def test_random_draw_is_not_class_balanced_and_is_fixed_by_seed(skewed):
    loader = data.prune_loader(skewed, per_class=10)
    assert loader.num_samples == 100 and len(set(loader.indices.tolist())) == 100
    counts = torch.bincount(loader.labels, minlength=10)
    assert counts[0] > 60  # drawn in proportion (class 0 is 77% of the set), not 10 per class
    assert torch.equal(skewed.train_labels[loader.indices], loader.labels)
    balanced = data.prune_batches(skewed, per_class=10, device="cpu")
    assert torch.bincount(balanced[0][1], minlength=10).tolist() == [10] * 10
    assert torch.equal(data.prune_loader(skewed, per_class=10, seed=0).indices, loader.indices)
    assert not torch.equal(data.prune_loader(skewed, per_class=10, seed=1).indices, loader.indices)


def test_same_global_seed_gives_identical_passes_and_successive_passes_differ(skewed):
    loader = data.prune_loader(skewed, per_class=10, batch_size=32)
    a, b = _passes(loader, 3, 7), _passes(loader, 3, 7)
    for pa, pb in zip(a, b):
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(pa, pb))
    first, second = _cat(a[0]), _cat(a[1])
    assert not torch.equal(first[0], second[0])
    other = _cat(_passes(loader, 1, 8)[0])
    assert not torch.equal(first[0], other[0])
    # the pass is fixed at iter(): global draws between iter() and next() change nothing
    torch.manual_seed(7)
    it = iter(loader)
    torch.rand(5)
    assert torch.equal(next(it)[0], a[0][0][0])


def test_without_augmentation_passes_are_the_subset_in_a_new_order(skewed):
    loader = data.prune_loader(skewed, per_class=10, batch_size=32, augment=False)
    originals = data.normalise(skewed, skewed.train_images[loader.indices])
    orders = []
    for batches in _passes(loader, 3, 0):
        x, y = _cat(batches)
        pos = _order(x, originals)
        assert sorted(pos.tolist()) == list(range(100))  # every subset image once
        assert torch.equal(y, loader.labels[pos])
        orders.append(pos)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_images_are_augmented_with_the_training_crop_and_flip(skewed):
    loader = data.prune_loader(skewed, per_class=1, batch_size=4)  # 10 images, 3 batches
    sub = skewed.train_images[loader.indices]
    # every crop (offsets 0..8 into the zero-padded image) and flip of every subset image
    n, k = len(sub), 9 * 9 * 2
    top, left = torch.arange(9).repeat_interleave(9).repeat(2), torch.arange(9).repeat(9 * 2)
    flip = torch.arange(2).repeat_interleave(81).bool()
    variants = augment.crop_flip(sub.repeat_interleave(k, 0), top.repeat(n), left.repeat(n), flip.repeat(n), 4)
    variants = data.normalise(skewed, variants.contiguous())
    x, y = _cat(_passes(loader, 1, 0)[0])
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    pos = _order(x, variants)
    source = pos // k
    assert sorted(source.tolist()) == list(range(10)) and torch.equal(y, loader.labels[source])
    originals = data.normalise(skewed, sub)
    assert sum(any(torch.equal(xi, o) for o in originals) for xi in x) < 5  # most are moved or flipped


def test_augmentation_is_fresh_every_pass_and_every_image():
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(100) % 10
    same = data.from_tensors("cifar10", one.repeat(100, 1, 1, 1), y, one.repeat(10, 1, 1, 1), y[:10])
    loader = data.prune_loader(same, per_class=10, batch_size=100)  # all images identical: only crops differ
    p1, p2 = (_cat(p)[0] for p in _passes(loader, 2, 0))
    assert not torch.equal(p1, p2)
    assert len({tuple(v.flatten().tolist()) for v in p1}) > 50
    plain = data.prune_loader(same, per_class=10, batch_size=100, augment=False)
    q1, q2 = (_cat(p)[0] for p in _passes(plain, 2, 0))
    assert torch.equal(q1, q2)


def test_tiny_imagenet_gets_its_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200)
    x = torch.randint(0, 256, (200, 3, 64, 64), dtype=torch.uint8, generator=g)
    tiny = data.from_tensors("tiny_imagenet", x, y, x[:4], y[:4])
    loader = data.prune_loader(tiny, per_class=1, batch_size=64)
    assert loader.augment == "rrc_flip" and len(loader) == 4
    batches = _passes(loader, 1, 0)[0]
    assert [len(b[1]) for b in batches] == [64, 64, 64, 8]
    xs, ys = _cat(batches)
    assert xs.shape == (200, 3, 64, 64) and xs.dtype == torch.float32
    assert torch.equal(ys.sort().values, y)  # every class once, as drawn
    originals = data.normalise(tiny, x)
    assert not any(torch.allclose(xs[i], originals[ys[i]]) for i in range(200))


def test_batch_sizes_and_the_cpu_default(skewed):
    loader = data.prune_loader(skewed, per_class=10, batch_size=32)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
               for x, y in batches)
    assert all(x.device.type == "cpu" and y.device.type == "cpu" for x, y in batches)
    assert loader.device == torch.device("cpu")
    assert len(data.prune_loader(skewed, per_class=10, batch_size=256)) == 1
    assert len(data.prune_loader(skewed, per_class=10, batch_size=100)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_on_a_requested_device(skewed):
    loader = data.prune_loader(skewed, per_class=10, batch_size=32, device="cuda")
    cpu = data.prune_loader(skewed, per_class=10, batch_size=32)
    torch.manual_seed(0)
    on_gpu = list(loader)
    torch.manual_seed(0)
    on_cpu = list(cpu)
    assert all(x.is_cuda and y.is_cuda for x, y in on_gpu)
    assert all(torch.equal(a.cpu(), b) for (a, _), (b, _) in zip(on_gpu, on_cpu))  # same pass wherever it lands


@pytest.mark.parametrize("kwargs,expected", [
    ({"per_class": 0}, ["per_class=0", "positive integer"]),
    ({"per_class": 1.5}, ["per_class=1.5", "positive integer"]),
    ({"per_class": True}, ["per_class=True", "positive integer"]),
    ({"per_class": 100}, ["per_class=100", "1000 images", "training set has 508"]),
    ({"batch_size": 0}, ["batch_size=0", "positive integer"]),
    ({"batch_size": "256"}, ["batch_size='256'", "positive integer"]),
    ({"seed": 0.5}, ["seed=0.5", "integer"]),
    ({"augment": "blur"}, ["augment='blur'", "crop_flip", "rrc_flip", "True"]),
    ({"augment": None}, ["augment=None", "crop_flip"]),
    ({"num_workers": -1}, ["num_workers=-1", "non-negative integer"]),
])
def test_bad_arguments_are_refused_naming_the_parameter(skewed, kwargs, expected):
    with pytest.raises(ValueError) as exc:
        data.prune_loader(skewed, **kwargs)
    for piece in expected:
        assert piece in str(exc.value), f"{piece!r} not in {str(exc.value)!r}"


def test_imagenet_from_disk_uses_the_train_transform_and_reshuffles(tmp_path):
    image_folders(tmp_path / "in", {"train": 4, "val": 1}, size=(40, 120), ext=".png")
    b = data.get_dataset("imagenet", root=tmp_path / "data", local_path=tmp_path / "in")
    loader = data.prune_loader(b, per_class=2, batch_size=4, num_workers=0)
    assert loader.num_samples == 6 and len(loader) == 2
    a, again = _passes(loader, 2, 3), _passes(loader, 2, 3)
    assert [x.shape for x, _ in a[0]] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert all(x.device.type == "cpu" for x, _ in a[0])
    for pa, pb in zip(a, again):
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(pa, pb))
    assert not torch.equal(_cat(a[0])[0], _cat(a[1])[0])
    assert sorted(_cat(a[0])[1].tolist()) == sorted(loader.labels.tolist())
    # the crops depend on the pass, not on how many processes read the images
    workers = data.prune_loader(b, per_class=2, batch_size=4, num_workers=2)
    for pa, pw in zip(a, _passes(workers, 2, 3)):
        assert all(torch.equal(xa, xw) for (xa, _), (xw, _) in zip(pa, pw))
    plain = data.prune_loader(b, per_class=2, batch_size=6, augment=False, num_workers=0)
    p1, p2 = (_cat(p) for p in _passes(plain, 2, 0))  # test transform: same images, new order
    assert sorted(p1[0].sum(dim=(1, 2, 3)).tolist()) == pytest.approx(sorted(p2[0].sum(dim=(1, 2, 3)).tolist()))
    with pytest.raises(ValueError, match="augment='rrc_flip'"):
        data.prune_loader(b, augment="rrc_flip")


# ---------------------------------------------------------------------------------
# the config knob
# ---------------------------------------------------------------------------------
def test_config_accepts_the_prune_set_choices_and_refuses_others(capsys):
    assert config.main(["compose", "quick", "prune.prune_set=random", "-o", "-"]) == 0
    assert "prune_set: random" in capsys.readouterr().out
    assert config.main(["compose", "quick", "prune.prune_set=foo", "-o", "-"]) == 2
    err = capsys.readouterr().err
    assert "prune.prune_set='foo'" in err and "balanced" in err and "random" in err


@pytest.mark.parametrize("choice", ["balanced", "random"])
def test_prune_run_picks_the_prune_set_from_the_config(tmp_path, monkeypatch, choice):
    from ntksap.stages import prune as prune_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTKSAP_DATA_ROOT", str(Path(__file__).resolve().parents[1] / "data"))  # the digits cache
    params = config.compose("micro", ["prune.track.mode=none", f"prune.prune_set={choice}"])
    params["runs"]["snip"] = {"method": "snip", "iterations": 1}
    cfg = parse_params(params)
    made = []
    for name in ("prune_batches", "prune_loader"):
        real = getattr(data, name)
        monkeypatch.setattr(data, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    res = prune_stage.prune_run(cfg, "snip", 0, tmp_path / "p")
    assert made == ["prune_loader" if choice == "random" else "prune_batches"]
    assert list(res.masks["tag"]) == ["sp50_00", "sp90_00"]


def test_named_sets_use_the_authors_prune_set():
    assert parse_params(config.compose("quick")).prune.prune_set == "balanced"
    assert parse_params(config.compose("micro")).prune.prune_set == "balanced"
    paper = ["cifar10_resnet20", "cifar100_vgg16", "tiny_imagenet_resnet18", "imagenet_resnet18",
             "imagenet_resnet50", "spectrum_resnet20", "ablation_T", "ablation_epsilon", "ablation_R",
             "ablation_noise_vs_data", "ablation_fixed_weights", "cifar10_resnet20_short"]
    for name in paper:
        assert parse_params(config.compose(name)).prune.prune_set == "random", name


def test_prune_with_the_random_set_depends_on_seed_alone_not_on_the_callers_rng():
    """Iterative SNIP on prune_loader passes: the masks follow ``seed`` whatever
    the caller's global RNG holds, and that RNG comes back untouched."""
    import ntksap

    bundle = _skewed(n0=40, per_other=4)
    loader = data.prune_loader(bundle, per_class=2, batch_size=8, seed=0)
    torch.manual_seed(0)
    base = ntksap.build_model("resnet20")
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        model = copy.deepcopy(base)
        runs.append(ntksap.prune(model, "iterative_snip", 0.9, data=loader, iterations=3, seed=5, progress=False))
        assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    other = ntksap.prune(copy.deepcopy(base), "iterative_snip", 0.9, data=loader, iterations=3, seed=6,
                         progress=False)
    assert any(not torch.equal(runs[0][n], other[n]) for n in other)  # the seed does reach the passes


def test_px_reads_its_papers_balanced_set_where_the_experiment_draws_random(tmp_path, monkeypatch):
    from ntksap.stages import prune as prune_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTKSAP_DATA_ROOT", str(Path(__file__).resolve().parents[1] / "data"))  # the digits cache
    params = config.compose("micro", ["prune.track.mode=none", "prune.prune_set=random"])
    params["runs"] = {"px": {"method": "px", "iterations": 2}, "snip": {"method": "snip"}}
    cfg = parse_params(params)
    made = []
    for name in ("prune_batches", "prune_loader"):
        real = getattr(data, name)
        monkeypatch.setattr(data, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    prune_stage.prune_run(cfg, "px", 0, tmp_path / "px")
    prune_stage.prune_run(cfg, "snip", 0, tmp_path / "snip")
    assert made == ["prune_batches", "prune_loader"]
