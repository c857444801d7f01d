"""Datasets, caches, layouts, downloads, augmentation, loaders and the prune set
(ntksap.data, ntksap.augment), on small generated data."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ntksap import augment, data
from conftest import image_folders

# ---------------------------------------------------------------------------------
# generators of small datasets in each layout
# ---------------------------------------------------------------------------------
def _rand_images(n, c, h, w, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _write_png(path: Path, img_chw: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img_chw.transpose(1, 2, 0)
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


def make_cifar_pickles(folder: Path, kind="cifar10", per_batch=4, n_test=6, seed=0):
    """torchvision's extracted layout with python-2 style (bytes) keys.
    Returns (train_x, train_y, test_x, test_y) as written."""
    k = 10 if kind == "cifar10" else 100
    sub = folder / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    sub.mkdir(parents=True)
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] if kind == "cifar10" else ["train"]
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i, name in enumerate(names):
        n = per_batch * (5 if kind == "cifar100" else 1)
        x = _rand_images(n, 3, 32, 32, seed + i)
        y = rng.integers(0, k, size=n).tolist()
        with open(sub / name, "wb") as f:
            pickle.dump({b"data": x.reshape(n, -1), label_key: y, b"batch_label": b"x"}, f, protocol=2)
        xs.append(x)
        ys += y
    tx = _rand_images(n_test, 3, 32, 32, seed + 99)
    ty = rng.integers(0, k, size=n_test).tolist()
    with open(sub / ("test_batch" if kind == "cifar10" else "test"), "wb") as f:
        pickle.dump({b"data": tx.reshape(n_test, -1), label_key: ty}, f, protocol=2)
    names_key = b"label_names" if kind == "cifar10" else b"fine_label_names"
    with open(sub / ("batches.meta" if kind == "cifar10" else "meta"), "wb") as f:
        pickle.dump({names_key: [f"c{i:02d}".encode() for i in range(k)]}, f, protocol=2)
    return np.concatenate(xs), np.array(ys), tx, np.array(ty)


def make_class_folders(folder: Path, classes, per_class=(3, 2), shape=(3, 32, 32), seed=0, ext=".png",
                       train_sub="train/{c}", test_sub="test/{c}"):
    """Class folders of PNG images; returns {split: [(class, img)]} as written."""
    out = {"train": [], "test": []}
    i = 0
    for split, n, sub in (("train", per_class[0], train_sub), ("test", per_class[1], test_sub)):
        for c in classes:
            for j in range(n):
                img = _rand_images(1, *shape, seed + i)[0]
                i += 1
                _write_png(folder / sub.format(c=c) / f"img{j:03d}{ext}", img)
                out[split].append((c, img))
    return out


def _tar(folder: Path, dest: Path, arcname="cifar10") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return dest


# ---------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_cached(tmp_path):
    b = data.get_dataset("digits", root=tmp_path)
    assert (b.num_train, b.num_test) == (1437, 360)
    assert b.train_images.dtype == torch.uint8 and b.train_images.shape == (1437, 1, 8, 8)
    assert b.train_labels.dtype == torch.int64 and b.input_shape == (1, 8, 8) and b.num_classes == 10
    # stratified: each class holds ~20 % of its images in the test split
    from sklearn.datasets import load_digits
    d = load_digits()
    total = np.bincount(d.target)
    test_counts = np.bincount(b.test_labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * total) <= 1)
    # pixels are the sklearn values 0..16 mapped to 0..255, and the split is disjoint and complete
    all_x = np.round(d.images * 255 / 16).astype(np.uint8)
    got = torch.cat([b.train_images, b.test_images]).squeeze(1).numpy()
    assert sorted(x.tobytes() for x in got) == sorted(x.tobytes() for x in all_x)
    # the cache holds the same data; a second load reads it
    cache = tmp_path / "digits" / "cache-sklearn.pt"
    assert cache.exists()
    b2 = data.get_dataset("digits", root=tmp_path)
    assert torch.equal(b2.train_images, b.train_images) and torch.equal(b2.test_labels, b.test_labels)
    # mean/std in the spec are those of the training split
    x = b.train_images.float() / 255
    assert abs(x.mean().item() - b.mean[0]) < 1e-3 and abs(x.std().item() - b.std[0]) < 1e-3


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    b = data.get_dataset("digits", root=tmp_path)
    cache = tmp_path / "digits" / "cache-sklearn.pt"
    # 1. truncated file
    raw = cache.read_bytes()
    cache.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(UserWarning, match="rebuilding"):
        b2 = data.get_dataset("digits", root=tmp_path)
    assert torch.equal(b2.train_images, b.train_images)
    assert cache.read_bytes() != raw[: len(raw) // 2]
    # 2. readable but tampered content: fails the checksum
    obj = torch.load(cache, weights_only=True)
    obj["train_images"][0, 0, 0, 0] ^= 1
    torch.save(obj, cache)
    with pytest.warns(UserWarning, match="checksum"):
        b3 = data.get_dataset("digits", root=tmp_path)
    assert torch.equal(b3.train_images, b.train_images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.get_dataset("digits", root=tmp_path)   # now sound again: no warning


def test_get_dataset_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError, match="name='mnist'"):
        data.get_dataset("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="local_path is not used for 'digits'"):
        data.get_dataset("digits", root=tmp_path, local_path=tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        data.get_dataset("cifar10", root=tmp_path, local_path=tmp_path / "nope")


# ---------------------------------------------------------------------------------
# CIFAR layouts
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_pickle_layout(tmp_path, as_archive):
    src = tmp_path / "src"
    tx, ty, vx, vy = make_cifar_pickles(src, "cifar10")
    path = _tar(src, tmp_path / "c.tar.gz") if as_archive else src
    b = data.get_dataset("cifar10", root=tmp_path / "data", local_path=path)
    assert torch.equal(b.train_images, torch.from_numpy(tx)) and b.train_labels.tolist() == ty.tolist()
    assert torch.equal(b.test_images, torch.from_numpy(vx)) and b.test_labels.tolist() == vy.tolist()
    assert b.classes == [f"c{i:02d}" for i in range(10)]
    assert b.mean == (0.491, 0.482, 0.447) and b.augment == "crop_flip"
    assert len(list((tmp_path / "data" / "cifar10").glob("cache-local-*.pt"))) == 1


def test_cifar100_pickle_layout(tmp_path):
    tx, ty, vx, vy = make_cifar_pickles(tmp_path / "src", "cifar100")
    b = data.get_dataset("cifar100", root=tmp_path / "data", local_path=tmp_path / "src")
    assert b.num_classes == 100 and b.classes[5] == "c05"
    assert torch.equal(b.train_images, torch.from_numpy(tx)) and b.train_labels.tolist() == ty.tolist()
    assert torch.equal(b.test_images, torch.from_numpy(vx)) and b.test_labels.tolist() == vy.tolist()


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_class_folder_layout(tmp_path, as_archive):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    src = tmp_path / "src"
    written = make_class_folders(src, classes[::-1])        # write in reverse order: labels are sorted names
    path = _tar(src, tmp_path / "cifar10-jpeg.tar.gz") if as_archive else src
    b = data.get_dataset("cifar10", root=tmp_path / "data", local_path=path)
    assert b.classes == classes
    for split in ("train", "test"):
        got = {(b.classes[int(y)], x.numpy().tobytes()) for x, y in zip(b.images(split), b.labels(split))}
        want = {(c, img.tobytes()) for c, img in written[split]}
        assert got == want                                   # PNG is lossless: exact pixels and labels
    assert b.train_labels.tolist() == sorted(b.train_labels.tolist())


def test_class_folders_wrong_size_or_count(tmp_path):
    make_class_folders(tmp_path / "small", [f"k{i}" for i in range(10)], (1, 1), shape=(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        data.get_dataset("cifar10", root=tmp_path / "d1", local_path=tmp_path / "small")
    make_class_folders(tmp_path / "nine", [f"k{i}" for i in range(9)], (1, 1))
    with pytest.raises(ValueError, match="9 class folders"):
        data.get_dataset("cifar10", root=tmp_path / "d2", local_path=tmp_path / "nine")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="holds no 'cifar10' data"):
        data.get_dataset("cifar10", root=tmp_path / "d3", local_path=tmp_path / "empty")


# ---------------------------------------------------------------------------------
# Tiny-ImageNet and ImageNet layouts
# ---------------------------------------------------------------------------------
def make_tiny(folder: Path, seed=0):
    wnids = [f"n{i:08d}" for i in range(200)][::-1]
    root = folder / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(seed)
    train = {}
    for i, w in enumerate(wnids[:200]):
        img = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
        _write_png(root / "train" / w / "images" / f"{w}_0.png", img)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        train[w] = img
    lines, val = [], {}
    for j in range(5):
        w = wnids[(7 * j) % 200]
        img = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
        if j == 0:                                          # a grayscale image, as in the real data
            img = np.repeat(img[:1], 3, axis=0)
            Image.fromarray(img[0]).save(_mk(root / "val" / "images" / f"val_{j}.png"))
        else:
            _write_png(root / "val" / "images" / f"val_{j}.png", img)
        lines.append(f"val_{j}.png\t{w}\t0\t0\t63\t63")
        val[f"val_{j}.png"] = (w, img)
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root, train, val


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def test_tiny_imagenet_layout(tmp_path):
    root, train, val = make_tiny(tmp_path / "src")
    b = data.get_dataset("tiny_imagenet", root=tmp_path / "data", local_path=root)
    assert b.num_classes == 200 and b.input_shape == (3, 64, 64) and b.augment == "rrc_flip"
    assert b.classes == sorted(train)
    for x, y in zip(b.train_images, b.train_labels):
        assert np.array_equal(x.numpy(), train[b.classes[int(y)]])
    assert b.num_test == 5
    got = sorted((b.classes[int(y)], x.numpy().tobytes()) for x, y in zip(b.test_images, b.test_labels))
    assert got == sorted((w, img.tobytes()) for w, img in val.values())
    # a broken annotation file is a clear error
    (root / "val" / "val_annotations.txt").write_text("missing.png\tn00000001\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="missing.png"):
        data.get_dataset("tiny_imagenet", root=tmp_path / "data2", local_path=root)


def test_imagenet_image_folders(tmp_path):
    image_folders(tmp_path / "in", {"train": 3, "val": 1})
    b = data.get_dataset("imagenet", root=tmp_path / "data", local_path=tmp_path / "in")
    assert b.on_disk and b.train_images is None and b.num_train == 9 and b.num_test == 3
    assert b.classes == ["n01", "n02", "n03"] and b.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    loader = data.DeviceLoader(b, "train", batch_size=4, num_workers=0, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert batches[0][0].shape == (4, 3, 224, 224) and batches[-1][0].shape == (1, 3, 224, 224)
    pb = data.prune_batches(b, per_class=2, batch_size=4, device="cpu")
    got = [(x.shape, y.tolist()) for x, y in pb]
    assert len(pb) == 2 and sum(len(y) for _, y in got) == 6
    assert sorted(sum((y for _, y in got), [])) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(data.DatasetNotFoundError, match="never downloaded"):
        data.get_dataset("imagenet", root=tmp_path / "nothing")


# ---------------------------------------------------------------------------------
# missing data and downloads (network mocked: none is reachable here)
# ---------------------------------------------------------------------------------
def test_missing_dataset_without_network_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=5.0: "OSError: no route to host")
    t0 = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.get_dataset("cifar100", root=tmp_path / "data")
    assert time.perf_counter() - t0 < 2
    msg = str(err.value)
    assert str(tmp_path / "data" / "cifar100") in msg and "local_path" in msg and "unreachable" in msg
    assert "cifar-100-python" in msg            # says which layouts are accepted
    assert not (tmp_path / "data" / "cifar100" / "cifar-100-python.tar.gz").exists()
    with pytest.raises(data.DatasetNotFoundError, match="download=False"):
        data.get_dataset("tiny_imagenet", root=tmp_path / "data", download=False)


def _mock_network(monkeypatch, payload: bytes):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_retrieve(url, filename, chunk_size=0):
        calls.append(url)
        Path(filename).write_bytes(payload)

    monkeypatch.setattr(data, "_reachable", lambda url, timeout=5.0: None)
    monkeypatch.setattr(tvu, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tvu, "_urlretrieve", fake_retrieve)
    return calls


def test_corrupt_download_is_removed_and_reported(tmp_path, monkeypatch):
    calls = _mock_network(monkeypatch, b"not the real archive")
    with pytest.raises(data.ChecksumError, match="MD5") as err:
        data.get_dataset("cifar10", root=tmp_path / "data")
    assert "removed" in str(err.value) and calls
    folder = tmp_path / "data" / "cifar10"
    assert not (folder / "cifar-10-python.tar.gz").exists()
    assert not list(folder.glob("cache-*"))


def test_partial_archive_on_disk_is_removed_never_used(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "cifar10"
    folder.mkdir(parents=True)
    (folder / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated")
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=5.0: "no network")
    with pytest.warns(UserWarning, match="MD5"), pytest.raises(data.DatasetNotFoundError):
        data.get_dataset("cifar10", root=tmp_path / "data")
    assert not (folder / "cifar-10-python.tar.gz").exists()


def test_good_download_is_verified_and_decoded(tmp_path, monkeypatch):
    src = tmp_path / "src"
    tx, ty, _, _ = make_cifar_pickles(src, "cifar10")
    archive = _tar(src / "cifar-10-batches-py", tmp_path / "a.tar.gz", arcname="cifar-10-batches-py")
    payload = archive.read_bytes()
    md5 = hashlib.md5(payload).hexdigest()
    url, filename, _ = data._download("cifar10")
    monkeypatch.setitem(data._DOWNLOADS, "cifar10", (url, filename, md5))
    calls = _mock_network(monkeypatch, payload)
    b = data.get_dataset("cifar10", root=tmp_path / "data")
    assert calls == [url]
    assert torch.equal(b.train_images, torch.from_numpy(tx)) and b.train_labels.tolist() == ty.tolist()
    assert (tmp_path / "data" / "cifar10" / "cache-download.pt").exists()
    data.get_dataset("cifar10", root=tmp_path / "data")     # from the cache: no second download
    assert calls == [url]


# ---------------------------------------------------------------------------------
# augmentation against naive per-image references
# ---------------------------------------------------------------------------------
def _ref_crop_flip(x, top, left, flip, p):
    out = []
    for img, t, l_, f in zip(x, top.tolist(), left.tolist(), flip.tolist()):
        padded = F.pad(img.float(), (p, p, p, p))           # zero padding, as RandomCrop(padding=p)
        crop = padded[:, t:t + img.shape[1], l_:l_ + img.shape[2]]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out).to(x.dtype)


def test_crop_flip_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    top, left, flip = augment.sample_crop_flip(64, 4, g)
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    got = augment.crop_flip(x, top, left, flip, 4)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, _ref_crop_flip(x, top, left, flip, 4))
    # flips are flips, and no padding + no flip is the identity
    z = torch.zeros(64, dtype=torch.long)
    assert torch.equal(augment.crop_flip(x, z, z, torch.ones(64, dtype=torch.bool), 0), x.flip(-1))
    assert torch.equal(augment.crop_flip(x, z + 4, z + 4, torch.zeros(64, dtype=torch.bool), 4), x)


def test_crops_stay_inside_the_padded_image_and_sampling_is_fair():
    g = torch.Generator().manual_seed(1)
    x = torch.full((4000, 1, 8, 8), 255, dtype=torch.uint8)
    top, left, flip = augment.sample_crop_flip(4000, 4, g)
    out = augment.crop_flip(x, top, left, flip, 4).float()
    # the zeros are exactly the padding that the window covers: rows < 4-top or >= 12-top are zero
    rows = torch.arange(8)
    for i in range(0, 4000, 397):
        inside_r = ((rows + top[i]) >= 4) & ((rows + top[i]) < 12)
        inside_c = ((rows + left[i]) >= 4) & ((rows + left[i]) < 12)
        if flip[i]:
            inside_c = inside_c.flip(0)
        assert torch.equal(out[i, 0] > 0, inside_r[:, None] & inside_c[None, :])
    # each of the 9 offsets and both flip states are drawn with about the right frequency
    counts = torch.bincount(top, minlength=9).float()
    assert counts.min() > 4000 / 9 * 0.75 and counts.max() < 4000 / 9 * 1.25
    assert abs(flip.float().mean().item() - 0.5) < 0.05


def test_augmentation_is_seeded():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment.augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    b = augment.augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    c = augment.augment_batch(x, "crop_flip", torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    r1 = augment.augment_batch(x, "rrc_flip", torch.Generator().manual_seed(5))
    r2 = augment.augment_batch(x, "rrc_flip", torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and r1.dtype == torch.float32
    with pytest.raises(ValueError, match="augment='cutout'"):
        augment.augment_batch(x, "cutout")


def test_resized_crop_boxes_follow_torchvision_rules():
    g = torch.Generator().manual_seed(0)
    boxes = augment.sample_resized_crop(5000, 64, 64, (0.1, 1.0), (0.8, 1.25), g)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area = (h * w).float() / 64 ** 2
    ratio = w.float() / h.float()
    # rounding to whole pixels moves the bounds slightly
    assert area.min() > 0.085 and area.max() <= 1.0 and ratio.min() > 0.75 and ratio.max() < 1.33
    assert area.mean().item() == pytest.approx(0.55, abs=0.05)   # U(0.1, 1), minus rejected draws
    # impossible requests fall back to the central crop with the ratio clamped
    fb = augment.sample_resized_crop(3, 64, 32, (2.0, 3.0), (0.8, 1.25), g)
    assert fb.tolist() == [[12, 0, 40, 32]] * 3               # w=32, h=round(32/0.8)=40, centred


def test_resized_crop_flip_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=g)
    boxes = augment.sample_resized_crop(32, 64, 64, (0.1, 1.0), (0.8, 1.25), g)
    flip = torch.rand(32, generator=g) < 0.5
    got = augment.resized_crop_flip(x, boxes, flip, (64, 64))
    for i in range(32):
        t, l_, h, w = boxes[i].tolist()
        ref = TF.resized_crop(x[i].float(), t, l_, h, w, [64, 64], antialias=True)
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.allclose(got[i], ref, atol=2e-3), (i, (got[i] - ref).abs().max())


# ---------------------------------------------------------------------------------
# the device loader and the prune set
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return data.get_dataset("digits", root=tmp_path_factory.mktemp("data"))


def test_device_loader_epoch_covers_data_and_is_reproducible(digits):
    loader = data.DeviceLoader(digits, "train", batch_size=100, seed=3, device="cpu")
    assert loader.augment == "none" and len(loader) == 15
    ref = data.normalise(digits, digits.train_images)
    seen = torch.cat([y for _, y in loader])                   # epoch 0
    assert sorted(seen.tolist()) == sorted(digits.train_labels.tolist())
    batches = list(loader)                                      # epoch 1: another order
    assert not torch.equal(torch.cat([y for _, y in batches]), seen)
    # images are the normalised training images (digits is not augmented): match every one
    xs = torch.cat([x for x, _ in batches]).flatten(1)
    d = torch.cdist(xs, ref.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    assert d.min(dim=1).values.max() < 1e-5
    loader.set_epoch(1)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = data.DeviceLoader(digits, "train", batch_size=100, seed=4, device="cpu")
    assert not torch.equal(next(iter(other))[1], next(iter(data.DeviceLoader(digits, "train", 100, seed=3)))[1])
    assert len(data.DeviceLoader(digits, "train", batch_size=100, drop_last=True)) == 14


def test_device_loader_test_split_in_order_and_normalised(digits):
    loader = data.DeviceLoader(digits, "test", batch_size=64, channels_last=True)
    xs, ys = zip(*loader)
    x = torch.cat(xs)
    assert torch.equal(torch.cat(ys), digits.test_labels)
    ref = (digits.test_images.float() / 255 - digits.mean[0]) / digits.std[0]
    assert torch.allclose(x, ref, atol=1e-5)
    assert xs[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="split='val'"):
        data.DeviceLoader(digits, "val")
    with pytest.raises(ValueError, match="batch_size=0"):
        data.DeviceLoader(digits, "train", batch_size=0)
    with pytest.raises(ValueError, match="augment='rrc'"):
        data.DeviceLoader(digits, "train", augment="rrc")


def test_device_loader_augments_cifar_like_data(tmp_path):
    make_cifar_pickles(tmp_path / "src", "cifar10", per_batch=40)
    b = data.get_dataset("cifar10", root=tmp_path / "data", local_path=tmp_path / "src")
    aug = data.DeviceLoader(b, "train", batch_size=50, seed=0)
    plain = data.DeviceLoader(b, "train", batch_size=50, seed=0, augment=False)
    xa, ya = next(iter(aug))
    xp, yp = next(iter(plain))
    assert torch.equal(ya, yp)                                 # same order, augmentation differs
    assert not torch.allclose(xa, xp)
    # every augmented image is a padded crop, possibly flipped, of its plain image
    zero = torch.tensor([(0 - m) / s for m, s in zip(b.mean, b.std)]).view(3, 1, 1)
    for a, p in zip(xa[:10], xp[:10]):
        padded = torch.cat([zero.expand(3, 32, 4), p, zero.expand(3, 32, 4)], 2)
        padded = torch.cat([zero.expand(3, 4, 40), padded, zero.expand(3, 4, 40)], 1)
        ok = any(torch.allclose(cand, a, atol=1e-5)
                 for t in range(9) for l_ in range(9)
                 for cand in (padded[:, t:t + 32, l_:l_ + 32], padded[:, t:t + 32, l_:l_ + 32].flip(-1)))
        assert ok


def test_prune_batches_draw_per_class_with_seed(digits):
    pb = data.prune_batches(digits, per_class=10, batch_size=256, seed=0, device="cpu")
    assert len(pb) == 1
    x, y = pb[0]
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == [10] * 10
    ref = data.normalise(digits, digits.train_images).flatten(1)
    dist = torch.cdist(x.flatten(1), ref, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(dim=1).values.max() < 1e-5                 # real, unaugmented training images
    idx = data.prune_indices(digits, 10, 0)
    assert len(set(idx.tolist())) == 100 and torch.equal(digits.train_labels[idx], y)
    again = data.prune_batches(digits, per_class=10, batch_size=32, seed=0)
    assert [len(b[1]) for b in again] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([b[0] for b in again]), x)
    other = data.prune_batches(digits, per_class=10, seed=1)[0][1]
    assert not torch.equal(data.prune_indices(digits, 10, 1), idx) and len(other) == 100
    with pytest.raises(ValueError, match="per_class=1000"):
        data.prune_batches(digits, per_class=1000)
    with pytest.raises(ValueError, match="per_class=0"):
        data.prune_batches(digits, per_class=0)


def test_subset(digits):
    s = data.subset(digits, train=100, test=50, seed=0)
    assert (s.num_train, s.num_test) == (100, 50)
    whole = {x.numpy().tobytes() for x in digits.train_images}
    assert all(x.numpy().tobytes() in whole for x in s.train_images)
    assert torch.equal(data.subset(digits, train=100, seed=0).train_labels, s.train_labels)
    with pytest.raises(ValueError, match="train=0"):
        data.subset(digits, train=0)
