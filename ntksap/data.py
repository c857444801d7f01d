"""Datasets, uint8 tensor caches, the prune set and a fast on-device loader.

``get_dataset(name)`` returns a :class:`Dataset` bundle. The small datasets
(``digits``, ``cifar10``, ``cifar100``, ``tiny_imagenet``) are decoded once into
a uint8 tensor cache ``<root>/<name>/cache-<source>.pt`` (written atomically,
with a checksum; a corrupt cache is detected and rebuilt) and held in memory as
``train_images`` / ``test_images``: uint8 (N, C, H, W), labels int64 (N,).
:class:`DeviceLoader` keeps them in device memory and normalises and augments
each batch there, vectorised over the batch (:mod:`ntksap.augment`).

``imagenet`` is read from class folders with torchvision's ``ImageFolder``
(``train_set`` / ``test_set``, with the standard transforms) and a multi-worker
``DataLoader``; its ``train_images`` / ``test_images`` are ``None``.

Where the data comes from:

* ``digits``: the 8x8 digits shipped with scikit-learn (1797 images, 10
  classes), pixel values 0..16 mapped to 0..255; fixed stratified split of
  1437 train / 360 test images (``random_state=0``). No download.
* ``cifar10`` / ``cifar100``: ``local_path`` (a folder, ``.tar``, ``.tar.gz``,
  ``.tgz`` or ``.zip``) in torchvision's pickle layout
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or as class folders
  ``train/<class>/*`` and ``test/<class>/*``; else the official archive under
  ``<root>/<name>/``, downloaded with torchvision (MD5 verified) if absent.
* ``tiny_imagenet``: the ``tiny-imagenet-200`` layout (``wnids.txt``,
  ``train/<wnid>/images/*``, ``val/images/*`` + ``val/val_annotations.txt``;
  the labelled ``val`` split is the test set), from ``local_path`` or the
  official zip (downloaded, MD5 verified).
* ``imagenet``: ``train/<wnid>/*`` and ``val/<wnid>/*`` under ``local_path`` (or
  ``<root>/imagenet``); never downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import queue
import re
import socket
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .augment import AUGMENTATIONS, augment_batch, augment_pixels
from .devices import resolve_device
from .files import atomic_torch_save
from .hashing import tensor_digest

DATASETS = ("digits", "cifar10", "cifar100", "tiny_imagenet", "imagenet")
CACHE_VERSION = 2  # 2: the checksum is hashing.tensor_digest (version-1 caches are rebuilt, with a warning)
CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
NETWORK_TIMEOUT_S = 5.0


class DatasetNotFoundError(FileNotFoundError):
    """The data is neither cached, nor at the given path, nor downloadable."""


class ChecksumError(RuntimeError):
    """A downloaded archive failed its MD5 check (it has been removed)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Fixed facts about one dataset (PAPER.md section 5)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]   # (C, H, W)
    mean: tuple[float, ...]             # per channel, on the 0-1 scale
    std: tuple[float, ...]
    augment: str                        # training augmentation, one of augment.AUGMENTATIONS or "imagenet"


SPECS: dict[str, DatasetSpec] = {
    # digits: mean/std of the fixed training split (0-1 scale); no augmentation (flips change digits)
    "digits": DatasetSpec("digits", 10, (1, 8, 8), (0.305,), (0.376,), "none"),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), (0.491, 0.482, 0.447), (0.247, 0.243, 0.262), "crop_flip"),
    "cifar100": DatasetSpec("cifar100", 100, (3, 32, 32), (0.507, 0.487, 0.441), (0.267, 0.256, 0.276),
                            "crop_flip"),
    "tiny_imagenet": DatasetSpec("tiny_imagenet", 200, (3, 64, 64), (0.480, 0.448, 0.397),
                                 (0.276, 0.269, 0.282), "rrc_flip"),
    "imagenet": DatasetSpec("imagenet", 1000, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            "imagenet"),
}


@dataclass(repr=False, eq=False)
class Dataset:
    """One dataset, ready for training.

    Small datasets: ``train_images`` / ``test_images`` are uint8 (N, C, H, W)
    CPU tensors (0-255), ``train_labels`` / ``test_labels`` int64 (N,).
    ``imagenet``: the images are ``None``; ``train_set`` / ``test_set`` are
    ``ImageFolder`` objects (train: RandomResizedCrop 224 + flip, test: resize
    256 + centre crop 224; both ``ToTensor`` + ``Normalize``) and the labels are
    their ``targets``.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    classes: list[str]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    train_images: torch.Tensor | None = None
    test_images: torch.Tensor | None = None
    train_set: object | None = None
    test_set: object | None = None
    source: str = ""
    _device_copies: dict = field(default_factory=dict, compare=False)

    @property
    def on_disk(self) -> bool:
        """True for datasets read image by image (ImageNet), not held in memory."""
        return self.train_images is None

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_labels.numel())

    def images(self, split: str) -> torch.Tensor | None:
        return {"train": self.train_images, "test": self.test_images}[_check_split(split)]

    def labels(self, split: str) -> torch.Tensor:
        return {"train": self.train_labels, "test": self.test_labels}[_check_split(split)]

    def on_device(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of ``split`` on ``device``, copied once and kept."""
        key = (split, str(device))
        if key not in self._device_copies:
            imgs = self.images(split)
            if imgs is None:
                raise ValueError(f"dataset '{self.name}' is read from disk; it has no in-memory images")
            self._device_copies[key] = (imgs.to(device), self.labels(split).to(device))
        return self._device_copies[key]

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, classes={self.num_classes}, input_shape={self.input_shape}, "
                f"train={self.num_train}, test={self.num_test}, source={self.source!r})")


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not allowed; use 'train' or 'test'")
    return split


def _bundle(spec: DatasetSpec, classes, tr_x, tr_y, te_x, te_y, source: str) -> Dataset:
    return Dataset(spec.name, spec.num_classes, spec.input_shape, spec.mean, spec.std, spec.augment,
                   list(classes), tr_y, te_y, tr_x, te_x, source=source)


# ==================================================================================
# public entry point
# ==================================================================================
def get_dataset(name: str, root: str | os.PathLike = "data", local_path: str | os.PathLike | None = None,
                download: bool = True) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`); see the module docstring
    for where each one comes from.

    ``root`` holds caches and downloads (``<root>/<name>/``); ``local_path`` is a
    folder or archive you provide; ``download=False`` never touches the network.
    Raises :class:`DatasetNotFoundError` (with where it looked and how to provide
    the data) when the data cannot be found, and :class:`ChecksumError` when a
    download is corrupt (the file is removed first).
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r} is not a known dataset; allowed: {DATASETS}")
    root = Path(root)
    if local_path is not None and name == "digits":
        raise ValueError("local_path is not used for 'digits' (it ships with scikit-learn); pass local_path=None")
    if local_path is not None:
        local_path = Path(local_path).expanduser()
        if not local_path.exists():
            raise DatasetNotFoundError(f"local_path='{local_path}' for dataset '{name}' does not exist")
    spec = SPECS[name]
    if name == "imagenet":
        return _imagenet(spec, root, local_path)
    if name == "digits":
        return _cached(spec, root / name / "cache-sklearn.pt", "scikit-learn load_digits", lambda: _digits())
    if local_path is not None:
        tag = hashlib.sha256(str(local_path.resolve()).encode()).hexdigest()[:12]
        src = str(local_path.resolve())
        return _cached(spec, root / name / f"cache-local-{tag}.pt", src, lambda: _read_local(spec, local_path))

    def build():
        archive = _fetch_archive(spec, root, download)
        return _read_local(spec, archive)

    return _cached(spec, root / name / "cache-download.pt", f"download ({_download(name)[0]})", build)


def from_tensors(name: str, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, classes: list[str] | None = None) -> Dataset:
    """An in-memory dataset with the constants of ``name`` (shape, classes,
    mean/std, augmentation) from your own tensors: images uint8 (N, C, H, W),
    labels int64 (N,). For benchmarks, tests and custom data."""
    if name not in DATASETS or name == "imagenet":
        raise ValueError(f"name={name!r} is not allowed; use one of {DATASETS[:-1]}")
    spec = SPECS[name]
    classes = list(classes) if classes is not None else [str(i) for i in range(spec.num_classes)]
    obj = {"version": CACHE_VERSION, "name": name, "classes": classes, "train_images": train_images,
           "train_labels": train_labels, "test_images": test_images, "test_labels": test_labels}
    obj["checksum"] = _checksum(train_images, train_labels, test_images, test_labels)
    problem = _validate_cache(obj, spec)
    if problem is not None:
        raise ValueError(f"from_tensors: the data for '{name}' {problem} (images must be uint8 "
                         f"(N, {', '.join(map(str, spec.input_shape))}), labels int64 in [0, {spec.num_classes}))")
    return _bundle(spec, classes, train_images, train_labels, test_images, test_labels, "tensors")


def subset(bundle: Dataset, train: int | None = None, test: int | None = None, seed: int = 0) -> Dataset:
    """A copy of an in-memory dataset with ``train`` / ``test`` images drawn at
    random (``seed``) without replacement, in their original order (``None``:
    keep the split whole). For quick runs and tests."""
    if bundle.on_disk:
        raise ValueError(f"subset: dataset '{bundle.name}' is read from disk; only in-memory datasets are supported")
    g = torch.Generator().manual_seed(_mix(seed, "subset"))
    out = {}
    for split, n in (("train", train), ("test", test)):
        x, y = bundle.images(split), bundle.labels(split)
        if n is None:
            out[split] = (x, y)
            continue
        if not isinstance(n, int) or not 1 <= n <= len(y):
            raise ValueError(f"subset: {split}={n!r} must be an integer in [1, {len(y)}]")
        idx = torch.randperm(len(y), generator=g)[:n].sort().values
        out[split] = (x[idx], y[idx])
    return replace(bundle, train_images=out["train"][0], train_labels=out["train"][1],
                   test_images=out["test"][0], test_labels=out["test"][1],
                   source=bundle.source + f" (subset train={train} test={test} seed={seed})", _device_copies={})


# ==================================================================================
# caches
# ==================================================================================
def _checksum(*tensors: torch.Tensor) -> str:
    """A cache's checksum: the :func:`~ntksap.hashing.tensor_digest` of its
    tensors, given in the order of :data:`CACHE_TENSORS`."""
    return tensor_digest(dict(zip(CACHE_TENSORS, tensors, strict=True)))


def _validate_cache(obj, spec: DatasetSpec) -> str | None:
    """None if ``obj`` is a sound cache for ``spec``, else what is wrong."""
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not a dict"
    keys = {"version", "name", "classes", "train_images", "train_labels", "test_images", "test_labels", "checksum"}
    if not keys <= set(obj):
        return f"misses keys {sorted(keys - set(obj))}"
    if obj["version"] != CACHE_VERSION or obj["name"] != spec.name:
        return f"is version {obj['version']} of '{obj['name']}', expected {CACHE_VERSION} of '{spec.name}'"
    for split in ("train", "test"):
        x, y = obj[f"{split}_images"], obj[f"{split}_labels"]
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
                and tuple(x.shape[1:]) == spec.input_shape):
            return f"has bad {split}_images"
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == (x.shape[0],)):
            return f"has bad {split}_labels"
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            return f"has {split}_labels outside [0, {spec.num_classes})"
    if len(obj["classes"]) != spec.num_classes:
        return f"lists {len(obj['classes'])} classes, expected {spec.num_classes}"
    if obj["checksum"] != _checksum(obj["train_images"], obj["train_labels"], obj["test_images"], obj["test_labels"]):
        return "fails its checksum"
    return None


def _cached(spec: DatasetSpec, path: Path, source: str, build) -> Dataset:
    """Load the uint8 cache at ``path`` or build it with ``build()`` ->
    (classes, train_x, train_y, test_x, test_y) and write it atomically."""
    if path.exists():
        bundle, problem = _read_cache(path, spec)
        if problem is None:
            return bundle
        warnings.warn(f"data cache '{path}' {problem}; rebuilding it", stacklevel=3)
    classes, tr_x, tr_y, te_x, te_y = build()
    bundle = _bundle(spec, classes, tr_x.contiguous(), tr_y.contiguous(), te_x.contiguous(), te_y.contiguous(),
                     source)
    save_cache(bundle, path)
    return bundle


def _read_cache(path: Path, spec: DatasetSpec) -> tuple[Dataset | None, str | None]:
    """(the dataset in the cache file ``path``, None), or (None, what is wrong with the file)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        problem = _validate_cache(obj, spec)
    except Exception as exc:  # truncated / not a torch file
        return None, f"cannot be read ({type(exc).__name__}: {exc})"
    if problem is not None:
        return None, problem
    return _bundle(spec, obj["classes"], obj["train_images"], obj["train_labels"], obj["test_images"],
                   obj["test_labels"], obj.get("source", "")), None


def save_cache(bundle: Dataset, path: str | os.PathLike) -> None:
    """Write an in-memory dataset to ``path`` as a uint8 cache (with its checksum, atomically):
    the caches of :func:`get_dataset` and the prepare stage's file (:mod:`ntksap.stages.prepare`).
    The file's bytes depend on the tensors, classes and ``bundle.source`` only."""
    if bundle.on_disk:
        raise ValueError(f"save_cache: dataset '{bundle.name}' is read from disk; it has no images to cache")
    spec = SPECS[bundle.name]
    tensors = [getattr(bundle, name) for name in CACHE_TENSORS]
    obj = {"version": CACHE_VERSION, "name": spec.name, "source": bundle.source, "classes": list(bundle.classes),
           **dict(zip(CACHE_TENSORS, tensors)), "checksum": _checksum(*tensors)}
    problem = _validate_cache(obj, spec)
    if problem is not None:  # a bug or bad input data, not a cache problem
        raise ValueError(f"dataset '{spec.name}' read from {bundle.source} is malformed: it {problem}")
    atomic_torch_save(obj, path)


def load_cache(path: str | os.PathLike, name: str) -> Dataset:
    """The dataset ``name`` in a cache file written by :func:`save_cache`, verified (shapes,
    labels, checksum); a ``ValueError`` says what is wrong with it."""
    if name not in SPECS or name == "imagenet":
        raise ValueError(f"name={name!r} is not allowed; use one of {DATASETS[:-1]}")
    bundle, problem = _read_cache(Path(path), SPECS[name])
    if problem is not None:
        raise ValueError(f"'{path}' is not a sound cache of '{name}': it {problem}")
    return bundle


# ==================================================================================
# digits (scikit-learn)
# ==================================================================================
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=d.target,
                              random_state=DIGITS_SPLIT_SEED)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return [str(i) for i in range(10)], x[tr], y[tr], x[te], y[te]


# ==================================================================================
# downloads
# ==================================================================================
_TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_DOWNLOADS = {"tiny_imagenet": (TINY_IMAGENET_URL, "tiny-imagenet-200.zip", TINY_IMAGENET_MD5)}


def _download(name: str) -> tuple[str, str, str]:
    """(url, file name, MD5) of dataset ``name``'s archive: CIFAR's from torchvision's
    dataset classes, looked up on first use (importing torchvision costs about 2 s,
    at every notebook start if done at import)."""
    if name not in _DOWNLOADS:
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION_CLASSES[name])
        _DOWNLOADS[name] = (cls.url, cls.filename, cls.tgz_md5)
    return _DOWNLOADS[name]


def _layout_help(name: str) -> str:
    return {
        "cifar10": "a folder or .tar.gz in torchvision's layout (cifar-10-batches-py/) or class folders "
                   "(train/<class>/*.png|jpg, test/<class>/*)",
        "cifar100": "a folder or .tar.gz in torchvision's layout (cifar-100-python/) or class folders "
                    "(train/<class>/*, test/<class>/*)",
        "tiny_imagenet": "the tiny-imagenet-200 folder or zip (wnids.txt, train/<wnid>/images/*, "
                         "val/images/* + val/val_annotations.txt)",
        "imagenet": "a folder with train/<wnid>/* and val/<wnid>/* class folders",
    }[name]


def _reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the URL's host opens within ``timeout``, else why not."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _fetch_archive(spec: DatasetSpec, root: Path, download: bool) -> Path:
    """The verified official archive ``<root>/<name>/<file>``, downloaded with
    torchvision if absent. A file failing its MD5 check is removed, never used."""
    from torchvision.datasets.utils import check_integrity, download_url

    url, filename, md5 = _download(spec.name)
    folder = root / spec.name
    path = folder / filename
    if path.exists():
        if check_integrity(str(path), md5):
            return path
        warnings.warn(f"'{path}' fails its MD5 check (corrupt or partial download); removing it", stacklevel=3)
        path.unlink()
    how = (f"Provide it with get_dataset({spec.name!r}, local_path=...) pointing at {_layout_help(spec.name)}, "
           f"or put the official archive '{filename}' (md5 {md5}) into '{folder}/'.")
    where = f"looked for a cache in '{folder}/cache-*.pt' and the archive '{path}'"
    if not download:
        raise DatasetNotFoundError(f"dataset '{spec.name}' not found: {where}; download=False. {how}")
    why = _reachable(url)
    if why is not None:
        raise DatasetNotFoundError(f"dataset '{spec.name}' not found: {where}, and {url} is unreachable "
                                   f"({why}). {how}")
    try:
        download_url(url, str(folder), filename=filename, md5=md5)
    except BaseException as exc:
        corrupt = path.exists()
        if corrupt:
            path.unlink()  # partial or corrupt: never leave it under the final name
        if isinstance(exc, Exception) and corrupt and "corrupt" in str(exc).lower():
            raise ChecksumError(f"the download of '{url}' failed its MD5 check (expected {md5}); the file "
                                f"'{path}' was removed. Retry, or: {how}") from exc
        if isinstance(exc, Exception):
            raise DatasetNotFoundError(f"dataset '{spec.name}': downloading {url} failed "
                                       f"({type(exc).__name__}: {exc}). {how}") from exc
        raise
    if not check_integrity(str(path), md5):  # belt and braces: download_url checks too
        path.unlink(missing_ok=True)
        raise ChecksumError(f"the download of '{url}' failed its MD5 check; the file was removed. {how}")
    return path


# ==================================================================================
# reading folders and archives
# ==================================================================================
def _iter_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(relative posix path, content) of every file in a folder or archive,
    read sequentially (fast for compressed tar files)."""
    name = path.name.lower()
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for f in sorted(filenames):
                full = Path(dirpath) / f
                yield full.relative_to(path).as_posix(), full.read_bytes()
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, zf.read(info)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile():
                    yield m.name, tf.extractfile(m).read()
    else:
        raise ValueError(f"local_path='{path}' must be a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")


def decode_image(content: bytes, channels: int, where: str) -> torch.Tensor:
    """Decode image bytes to uint8 (C, H, W) with ``channels`` 1 or 3
    (torchvision.io; PIL as a fallback)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        return tv_decode(torch.frombuffer(bytearray(content), dtype=torch.uint8), mode=mode)
    except Exception:
        try:
            from PIL import Image

            img = Image.open(io.BytesIO(content)).convert("RGB" if channels == 3 else "L")
            arr = np.asarray(img, dtype=np.uint8)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        except Exception as exc:
            raise ValueError(f"cannot decode image '{where}': {exc}") from exc


def _is_image(rel: str) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


_CLASS_FOLDER = re.compile(r"(?:^|.*/)(train|test|val)/([^/]+)/([^/]+)$")
_TINY_TRAIN = re.compile(r"(?:^|.*/)train/([^/]+)/images/([^/]+)$")
_TINY_VAL = re.compile(r"(?:^|.*/)val/images/([^/]+)$")
_CIFAR_PICKLES = {"cifar10": ({f"data_batch_{i}" for i in range(1, 6)}, {"test_batch"}, "batches.meta"),
                  "cifar100": ({"train"}, {"test"}, "meta")}


def _read_local(spec: DatasetSpec, path: Path):
    """Decode a folder or archive of ``spec``'s dataset in any supported layout.
    Returns (classes, train_x, train_y, test_x, test_y)."""
    c, h, w = spec.input_shape
    if spec.name == "tiny_imagenet":
        return _read_tiny(spec, path)
    train_names, test_names, meta_name = _CIFAR_PICKLES[spec.name]
    pickles: dict[str, bytes] = {}
    images: dict[str, list] = {"train": [], "test": []}
    for rel, content in _iter_files(path):
        base = rel.rsplit("/", 1)[-1]
        if base in train_names | test_names | {meta_name}:
            pickles[base] = content
        elif _is_image(rel):
            m = _CLASS_FOLDER.match(rel)
            if m:
                split = "train" if m.group(1) == "train" else "test"
                images[split].append((m.group(2), rel, content))
    if set(train_names) <= set(pickles) and set(test_names) <= set(pickles):
        return _from_cifar_pickles(spec, pickles, train_names, test_names, meta_name, path)
    if images["train"] and images["test"]:
        return _from_class_folders(spec, images, path)
    raise DatasetNotFoundError(
        f"'{path}' holds no '{spec.name}' data: expected {_layout_help(spec.name)}; found "
        f"{len(pickles)} pickle batch files, {len(images['train'])} train and {len(images['test'])} test images")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python batches that only rebuilds numpy arrays
    (and plain containers): a crafted batch cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def _unpickle(content: bytes, where: str) -> dict:
    try:
        d = _ArrayUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"cannot read CIFAR batch '{where}': {exc}") from exc
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _from_cifar_pickles(spec, pickles, train_names, test_names, meta_name, path):
    label_key = "labels" if spec.name == "cifar10" else "fine_labels"
    out = []
    for names in (sorted(train_names), sorted(test_names)):
        xs, ys = [], []
        for n in names:
            d = _unpickle(pickles[n], f"{path}:{n}")
            data = np.asarray(d["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != int(np.prod(spec.input_shape)):
                raise ValueError(f"CIFAR batch '{path}:{n}' has data of shape {data.shape}, "
                                 f"expected (N, {int(np.prod(spec.input_shape))})")
            xs.append(torch.from_numpy(data.reshape(-1, *spec.input_shape).copy()))
            ys.append(torch.as_tensor(np.asarray(d[label_key], dtype=np.int64)))
        out += [torch.cat(xs), torch.cat(ys)]
    classes = [str(i) for i in range(spec.num_classes)]
    if meta_name in pickles:
        meta = _unpickle(pickles[meta_name], f"{path}:{meta_name}")
        key = "label_names" if spec.name == "cifar10" else "fine_label_names"
        if key in meta and len(meta[key]) == spec.num_classes:
            classes = [k.decode() if isinstance(k, bytes) else str(k) for k in meta[key]]
    return (classes, *out)


def _stack(spec, items, where) -> torch.Tensor:
    """Decode [(key, rel, bytes)] in order and stack to uint8 (N, C, H, W)."""
    c, h, w = spec.input_shape
    out = torch.empty((len(items), c, h, w), dtype=torch.uint8)
    with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated (PIL is the fallback)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        for i, (_, rel, content) in enumerate(items):
            img = decode_image(content, c, f"{where}:{rel}")
            if tuple(img.shape) != (c, h, w):
                raise ValueError(f"image '{where}:{rel}' has shape {tuple(img.shape)}, "
                                 f"'{spec.name}' needs {(c, h, w)} (C, H, W)")
            out[i] = img
    return out


def _from_class_folders(spec, images, path):
    classes = sorted({cls for cls, _, _ in images["train"]})
    if len(classes) != spec.num_classes:
        raise ValueError(f"'{path}' has {len(classes)} class folders under train/, "
                         f"'{spec.name}' has {spec.num_classes}")
    index = {cls: i for i, cls in enumerate(classes)}
    extra = sorted({cls for cls, _, _ in images["test"]} - set(classes))
    if extra:
        raise ValueError(f"'{path}' has test classes not under train/: {extra[:5]}")
    out = []
    for split in ("train", "test"):
        items = sorted(images[split], key=lambda t: (index[t[0]], t[1]))
        out += [_stack(spec, items, path), torch.tensor([index[cls] for cls, _, _ in items], dtype=torch.int64)]
    return (classes, *out)


def _read_tiny(spec, path):
    train, val = [], {}
    annotations = wnids = None
    for rel, content in _iter_files(path):
        base = rel.rsplit("/", 1)[-1]
        if base == "val_annotations.txt":
            annotations = content.decode()
        elif base == "wnids.txt":
            wnids = content.decode().split()
        elif _is_image(rel):
            m = _TINY_TRAIN.match(rel)
            if m:
                train.append((m.group(1), rel, content))
                continue
            m = _TINY_VAL.match(rel)
            if m:
                val[m.group(1)] = (rel, content)
    if not train or not val or annotations is None:
        raise DatasetNotFoundError(
            f"'{path}' holds no complete Tiny-ImageNet: expected {_layout_help('tiny_imagenet')}; found "
            f"{len(train)} train images, {len(val)} val images, "
            f"val_annotations.txt {'present' if annotations is not None else 'missing'}")
    classes = sorted(wnids) if wnids else sorted({c for c, _, _ in train})
    if len(classes) != spec.num_classes:
        raise ValueError(f"'{path}' has {len(classes)} classes, tiny_imagenet has {spec.num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    test = []
    for line in annotations.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        fname, wnid = parts[0], parts[1]
        if fname not in val:
            raise ValueError(f"'{path}': val_annotations.txt names '{fname}', which is not in val/images/")
        if wnid not in index:
            raise ValueError(f"'{path}': val image '{fname}' has unknown class '{wnid}'")
        test.append((wnid, *val[fname]))
    unknown = sorted({c for c, _, _ in train} - set(index))
    if unknown:
        raise ValueError(f"'{path}': train/ has class folders not in wnids.txt: {unknown[:5]}")
    out = []
    for items in (train, test):
        items = sorted(items, key=lambda t: (index[t[0]], t[1]))
        out += [_stack(spec, items, path), torch.tensor([index[c] for c, _, _ in items], dtype=torch.int64)]
    return (classes, *out)


# ==================================================================================
# ImageNet (on disk)
# ==================================================================================
class _Samples(torch.utils.data.Dataset):
    """(path, label) samples with a transform; shares ImageFolder's sample list."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader

        p, y = self.samples[i]
        return self.transform(default_loader(p)), y


def _imagenet_transforms(spec: DatasetSpec):
    import torchvision.transforms as T

    norm = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm])
    test = T.Compose([T.Resize(256), T.CenterCrop(224), *norm])
    return train, test


def _imagenet(spec: DatasetSpec, root: Path, local_path: Path | None) -> Dataset:
    from torchvision.datasets import ImageFolder

    base = local_path if local_path is not None else root / "imagenet"
    missing = [d for d in ("train", "val") if not (base / d).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset 'imagenet' not found: '{base}' lacks {', '.join(missing)}/ (ImageNet is never downloaded). "
            f"Provide it with get_dataset('imagenet', local_path=...) pointing at {_layout_help('imagenet')}.")
    train_tf, test_tf = _imagenet_transforms(spec)
    train_set = ImageFolder(str(base / "train"), transform=train_tf)
    test_set = ImageFolder(str(base / "val"), transform=test_tf)
    if test_set.classes != train_set.classes:
        raise ValueError(f"'{base}': val/ and train/ have different class folders")
    return Dataset(spec.name, len(train_set.classes), spec.input_shape, spec.mean, spec.std, spec.augment,
                   list(train_set.classes), torch.tensor(train_set.targets, dtype=torch.int64),
                   torch.tensor(test_set.targets, dtype=torch.int64), None, None, train_set, test_set,
                   source=str(base))


# ==================================================================================
# the prune set
# ==================================================================================
def _mix(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _normaliser(bundle: Dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, C, 1, 1): ``x_uint8 * scale + shift`` = (x/255 - mean)/std."""
    mean = torch.tensor(bundle.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def normalise(bundle: Dataset, x: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) images (B, C, H, W) -> float32 ``(x/255 - mean)/std``."""
    scale, shift = _normaliser(bundle, x.device)
    return x.to(torch.float32) * scale + shift


def prune_indices(bundle: Dataset, per_class: int = 10, seed: int = 0) -> torch.Tensor:
    """Indices of the prune set: ``per_class`` training images of every class
    drawn without replacement with ``seed``, then shuffled (PAPER.md: prune
    set = 10 x classes). int64 (per_class * classes,)."""
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class={per_class!r} must be a positive integer")
    g = torch.Generator().manual_seed(_mix(seed, "prune"))
    labels = bundle.train_labels
    chosen = []
    for c in range(bundle.num_classes):
        cand = (labels == c).nonzero().flatten()
        if len(cand) < per_class:
            raise ValueError(f"per_class={per_class}: class {c} ({bundle.classes[c]!r}) of '{bundle.name}' has "
                             f"only {len(cand)} training images")
        chosen.append(cand[torch.randperm(len(cand), generator=g)[:per_class]])
    idx = torch.cat(chosen)
    return idx[torch.randperm(len(idx), generator=g)]


def _workers(n: int) -> int:
    """``n`` loader processes, at most one per CPU core."""
    return max(0, min(int(n), os.cpu_count() or 1))


class _LazyBatches:
    """Re-iterable batches of the prune set read from disk (ImageNet)."""

    def __init__(self, dataset, batch_size, device, num_workers=_workers(8)):
        self.dataset, self.batch_size, self.device, self.num_workers = dataset, batch_size, device, num_workers

    def __len__(self):
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                                         num_workers=self.num_workers)
        for x, y in dl:
            yield x.to(self.device), y.to(self.device)


def prune_batches(bundle: Dataset, per_class: int = 10, batch_size: int = 256, seed: int = 0, device=None):
    """The prune set for data-dependent methods: ``per_class x classes``
    training images drawn with ``seed`` (see :func:`prune_indices`), not
    augmented, normalised, in batches of ``batch_size`` on ``device``.

    Returns a list of (x float32 (B, C, H, W), y int64 (B,)); for ImageNet a
    re-iterable object with ``len()`` that reads the images (test transform)
    when iterated.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    device = resolve_device(device)
    idx = prune_indices(bundle, per_class, seed)
    if bundle.on_disk:
        samples = [bundle.train_set.samples[i] for i in idx.tolist()]
        return _LazyBatches(_Samples(samples, bundle.test_set.transform), batch_size, device)
    x = normalise(bundle, bundle.train_images[idx]).to(device)
    y = bundle.train_labels[idx].to(device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(idx), batch_size)]


def _pass_seed() -> int:
    """A 63-bit seed drawn from torch's global CPU generator (one per pass)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


class _SeededSamples(_Samples):
    """:class:`_Samples` whose transform draws item ``i``'s randomness from the
    global CPU generator reseeded by ``(seed, i)`` inside ``fork_rng``: the
    crops depend on the pass seed only, not on the number of loader workers,
    and the caller's global RNG is left as it was."""

    def __init__(self, samples, transform, seed: int):
        super().__init__(samples, transform)
        self.seed = seed

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_mix(self.seed, i))
            return super().__getitem__(i)


class PruneLoader:
    """The prune set as the authors draw it; see :func:`prune_loader`."""

    def __init__(self, bundle: Dataset, per_class: int = 10, batch_size: int = 256, seed: int = 0, device=None,
                 augment=True, num_workers: int = 8):
        if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
            raise ValueError(f"per_class={per_class!r} is not allowed; use a positive integer")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; use a positive integer")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} is not allowed; use an integer")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} is not allowed; use a non-negative integer")
        if bundle.on_disk:
            if not isinstance(augment, bool):
                raise ValueError(f"augment={augment!r} is not allowed for '{bundle.name}' (read from disk); "
                                 f"use True (its training transform) or False (its test transform)")
            kind = "imagenet" if augment else "none"
        elif augment is True or augment is False or (isinstance(augment, str) and augment in AUGMENTATIONS):
            kind = bundle.augment if augment is True else "none" if augment is False else augment
        else:
            raise ValueError(f"augment={augment!r} is not allowed for '{bundle.name}'; use True (its "
                             f"training augmentation '{bundle.augment}'), False or one of {AUGMENTATIONS}")
        n = per_class * bundle.num_classes
        if n > bundle.num_train:
            raise ValueError(f"per_class={per_class} is not allowed for '{bundle.name}': {per_class} x "
                             f"{bundle.num_classes} classes = {n} images, the training set has {bundle.num_train}")
        self.bundle, self.batch_size, self.augment, self.num_workers = bundle, batch_size, kind, num_workers
        self.device = torch.device("cpu") if device is None else torch.device(device)
        g = torch.Generator().manual_seed(_mix(seed, "prune-random"))
        self.indices = torch.randperm(bundle.num_train, generator=g)[:n]   # not class-balanced
        self.labels = bundle.train_labels[self.indices]
        if bundle.on_disk:
            self._samples = [bundle.train_set.samples[i] for i in self.indices.tolist()]
            self._transform = bundle.train_set.transform if augment else bundle.test_set.transform
        else:
            self._images = bundle.train_images[self.indices]               # uint8, CPU

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = _pass_seed()   # drawn now, not at the first next(): the pass is fixed by the global RNG at iter()
        return self._iter_disk(seed) if self.bundle.on_disk else self._iter_memory(seed)

    def _iter_memory(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_samples, generator=g)
        for i in range(0, self.num_samples, self.batch_size):
            idx = order[i:i + self.batch_size]
            x = augment_batch(self._images.index_select(0, idx), self.augment, g)   # float32, 0-255, CPU
            x = normalise(self.bundle, x.contiguous())
            yield x.to(self.device), self.labels.index_select(0, idx).to(self.device)

    def _iter_disk(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        dl = torch.utils.data.DataLoader(_SeededSamples(self._samples, self._transform, seed),
                                         batch_size=self.batch_size, shuffle=True, generator=g,
                                         num_workers=_workers(self.num_workers), persistent_workers=False)
        for x, y in dl:
            yield x.to(self.device), y.to(self.device)


def prune_loader(bundle: Dataset, per_class: int = 10, batch_size: int = 256, seed: int = 0, device=None,
                 augment=True, num_workers: int = 8) -> PruneLoader:
    """The prune set as the authors draw it (PAPER.md section 3):
    ``per_class x classes`` training images drawn once at random with ``seed``
    (not class-balanced; ``.indices``), re-drawn on every pass.

    A re-iterable with ``len()`` (batches per pass). Each ``iter()`` is a new
    pass: a shuffled order and fresh training augmentation (``augment=True``:
    the dataset's, as :class:`DeviceLoader` applies it; ``False`` or a name from
    ``augment.AUGMENTATIONS``), normalised like :func:`prune_batches`, in
    batches of ``batch_size``: (x float32 (B, C, H, W), y int64 (B,)) on
    ``device`` (``None``: the CPU; move one batch at a time). A pass's
    randomness comes from a generator seeded by one 63-bit integer drawn from
    torch's global CPU generator at ``iter()``, so passes repeat under
    ``torch.manual_seed`` and successive passes differ. ImageNet: a
    ``DataLoader`` over the training transform (RandomResizedCrop 224 + flip;
    ``augment=False``: the test transform) with ``num_workers`` processes.
    :func:`prune_batches` is the other choice (class-balanced, fixed, unaugmented).
    """
    return PruneLoader(bundle, per_class, batch_size, seed, device, augment, num_workers)


# ==================================================================================
# the device loader
# ==================================================================================
_DONE = object()


def _prefetched(make, count: int, depth: int, device: torch.device) -> Iterator:
    """``make(0), ..., make(count - 1)``, made in this order by one background
    thread up to ``depth`` batches ahead of the consumer. On CUDA the thread
    works on a side stream; each batch is handed over with an event the
    consumer's stream waits for (and ``record_stream`` so its memory is not
    reused too early). Closing the iterator early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    consumer = torch.cuda.current_stream(device) if cuda else None
    side = torch.cuda.Stream(device) if cuda else None
    if cuda:
        side.wait_stream(consumer)           # the epoch's order was drawn on the consumer's stream

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            with contextlib.ExitStack() as ctx:
                if cuda:   # the current device and stream are per thread
                    ctx.enter_context(torch.cuda.device(device))
                    ctx.enter_context(torch.cuda.stream(side))
                for i in range(count):
                    if stop.is_set():
                        return
                    x, y = make(i)
                    ev = None
                    if cuda:
                        ev = torch.cuda.Event()
                        ev.record(side)
                    if not put((x, y, ev)):
                        return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    t = threading.Thread(target=work, name="DeviceLoader-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            x, y, ev = item
            if cuda:
                consumer.wait_event(ev)
                x.record_stream(consumer)
                y.record_stream(consumer)
            yield x, y
    finally:
        stop.set()
        t.join()
        if cuda:   # the side stream's last reads (of the order, the images) finish before their memory is reused
            consumer.wait_stream(side)

class DeviceLoader:
    """Batches of (x, y) on ``device``: x float32 (B, C, H, W) normalised with
    the dataset's mean/std, y int64 (B,).

    In-memory datasets: the uint8 images stay on the device; each batch is
    gathered, augmented (vectorised, :mod:`ntksap.augment`) and normalised
    there. Every pass (epoch) draws its order and augmentation from a generator
    seeded by ``(seed, split, epoch)``, so epoch ``e`` is the same in every run
    and after a resume. The epoch advances by one per pass; :meth:`set_epoch`
    sets it. ImageNet: a torchvision ``DataLoader`` with ``num_workers``
    processes (at most one per CPU core), seeded the same way.

    ``augment``: ``None`` = the dataset's augmentation for ``split="train"``,
    none for test; ``True``/``False``; or a name from ``augment.AUGMENTATIONS``.
    ``shuffle``: ``None`` = shuffle the training split only.
    ``channels_last``: return x in channels-last memory format.
    ``prefetch``: in-memory datasets only: how many batches a background
    thread prepares ahead of the one being used (0 = none, each batch is made
    when it is asked for). ``None``: 1 on CUDA (the batches are made on a
    side stream, overlapping the training step), 0 on a CPU (there the thread
    would compete with the compute threads for the same cores; measured in
    ``benchmarks/train_speed.py``). The batches are the same bit for bit
    either way: one thread makes them in order from the same generator.
    """

    def __init__(self, bundle: Dataset, split: str = "train", batch_size: int = 128, augment=None, seed: int = 0,
                 device=None, drop_last: bool = False, shuffle: bool | None = None, channels_last: bool = False,
                 num_workers: int = 8, prefetch: int | None = None):
        _check_split(split)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be a non-negative integer")
        if prefetch is not None and (not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0):
            raise ValueError(f"prefetch={prefetch!r} must be None or a non-negative integer")
        if augment is None:
            augment = split == "train"
        if augment is True:
            augment = bundle.augment
        elif augment is False:
            augment = "none"
        allowed = AUGMENTATIONS + (("imagenet",) if bundle.on_disk else ())
        if augment not in allowed:
            raise ValueError(f"augment={augment!r} is not allowed for '{bundle.name}'; use None, True, False "
                             f"or one of {allowed}")
        self.bundle, self.split, self.batch_size, self.augment = bundle, split, batch_size, augment
        self.seed, self.drop_last, self.num_workers = seed, bool(drop_last), num_workers
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.channels_last = bool(channels_last)
        self.device = resolve_device(device)
        self.prefetch = (1 if self.device.type == "cuda" else 0) if prefetch is None else prefetch
        self.epoch = 0
        n = bundle.num_train if split == "train" else bundle.num_test
        self.num_samples = n
        if n == 0 or (self.drop_last and n < batch_size):
            raise ValueError(f"split '{split}' of '{bundle.name}' has {n} images, too few for a batch of {batch_size}")
        if not bundle.on_disk:
            self._scale, self._shift = _normaliser(bundle, self.device)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """The next pass yields epoch ``epoch`` (its order and augmentation)."""
        self.epoch = int(epoch)

    def _generator(self, epoch: int, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(_mix(self.seed, self.split, epoch))
        return g

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.bundle.on_disk:
            yield from self._iter_disk(epoch)
            return
        images, labels = self.bundle.on_device(self.split, self.device)
        g = self._generator(epoch, self.device)
        n = len(labels)
        order = torch.randperm(n, generator=g, device=self.device) if self.shuffle else None
        make = (lambda i: self._batch(images, labels, order, g, i))
        if self.prefetch > 0:
            yield from _prefetched(make, len(self), self.prefetch, self.device)
        else:
            for i in range(len(self)):
                yield make(i)

    def _batch(self, images, labels, order, g, i):
        """Batch ``i`` of a pass: gather, augment (drawing from ``g``), convert
        and normalise. Called for i = 0, 1, ... in order (``g`` advances)."""
        b = self.batch_size
        if order is None:
            x, y = images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b]
        else:
            idx = order[i * b:(i + 1) * b]
            x, y = images.index_select(0, idx), labels.index_select(0, idx)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = augment_pixels(x, self.augment, g)   # uint8 (none, crop_flip) or float32 0-255 (rrc_flip)
        # layout change on the (uint8) pixels, then one pass uint8 -> float32 * scale and one in-place
        # shift: the same roundings as float(x) * scale + shift in two steps, so the values are unchanged
        x = torch.mul(x.contiguous(memory_format=fmt), self._scale)
        if not x.is_contiguous(memory_format=fmt):     # C == 1 or H == W == 1: strides are ambiguous
            x = x.contiguous(memory_format=fmt)
        return x.add_(self._shift), y

    def _iter_disk(self, epoch: int):
        ds = self.bundle.train_set if self.split == "train" else self.bundle.test_set
        if self.augment == "none" and self.split == "train":   # training images, test transform
            ds = _Samples(self.bundle.train_set.samples, self.bundle.test_set.transform)
        g = torch.Generator().manual_seed(_mix(self.seed, self.split, epoch))
        dl = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=self.shuffle, generator=g,
                                         num_workers=_workers(self.num_workers), drop_last=self.drop_last,
                                         pin_memory=self.device.type == "cuda",
                                         persistent_workers=False)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in dl:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                   y.to(self.device, non_blocking=True))
