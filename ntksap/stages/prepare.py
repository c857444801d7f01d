"""The prepare stage: decode the experiment's dataset once, verify it, and write the file every later stage reads.

``python -m ntksap.stages.prepare <dataset>`` (dvc.yaml's ``prepare``) finds the dataset where this
machine keeps it (:func:`ntksap.locations.dataset_location`: environment variables or
``ntksap.local.yaml``, never params.yaml), lets :func:`ntksap.data.get_dataset` decode it into its
uint8 cache (downloads MD5-verified, the cache checked against its sha256 checksum) and writes
``data/prepared/<dataset>.pt`` (:func:`ntksap.layout.prepared_path`), which prune, train and
spectrum depend on and read with :func:`load_prepared`:

* the in-memory datasets (digits, CIFAR, Tiny-ImageNet): the uint8 tensors, classes and their
  checksum (:func:`ntksap.data.save_cache`); nothing in it names where the data came from, so
  the same data gives the same bytes on every machine and from every source (a download or a
  local copy), and DVC's run cache serves them all;
* ImageNet, which stays on disk: an index of the verified folder, not its path (the class
  folders, the number of images, a sha256 of every image's relative path and label).
  :func:`load_prepared` opens the folder this machine names and refuses one whose index differs.
  The images themselves are not hashed (150 GB); a changed file list or labelling is caught.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path

INDEX_VERSION = 1
SOURCE = "prepared"  # the source recorded in a prepared file: the same wherever the data came from


def _imagenet_index(bundle) -> dict:
    """What pins an on-disk dataset: classes, image counts and a digest of (relative path, label)."""
    h = hashlib.sha256()
    for split, ds in (("train", bundle.train_set), ("test", bundle.test_set)):
        folder = Path(ds.root)
        for path, label in ds.samples:
            h.update(f"{split}\0{Path(path).relative_to(folder).as_posix()}\0{label}\n".encode())
    return {"version": INDEX_VERSION, "name": bundle.name, "classes": list(bundle.classes),
            "num_train": bundle.num_train, "num_test": bundle.num_test, "digest": h.hexdigest()}


def prepare(dataset: str, out: str | os.PathLike | None = None) -> Path:
    """Decode ``dataset`` into its cache (once; later calls read the cache), verify it and write
    the prepared file ``out`` (default ``data/prepared/<dataset>.pt``); returns its path."""
    from ..data import get_dataset, save_cache
    from ..files import atomic_torch_save
    from ..layout import prepared_path
    from ..locations import dataset_location

    out = Path(out) if out is not None else prepared_path(dataset)
    bundle = get_dataset(dataset, **dataset_location(dataset))
    if bundle.on_disk:
        atomic_torch_save(_imagenet_index(bundle), out)
    else:
        save_cache(replace(bundle, source=SOURCE, _device_copies={}), out)
    return out


def load_prepared(path: str | os.PathLike):
    """The :class:`ntksap.data.Dataset` bundle of a prepared file, as ``get_dataset`` gives it
    (``source`` is the file). In-memory datasets come from the file alone (checksum verified);
    ImageNet from the folder this machine names, checked against the file's index. Raises
    ``FileNotFoundError`` (run the prepare stage) or ``ValueError`` (a file that fails its check)."""
    import torch

    from ..data import get_dataset, load_cache
    from ..locations import dataset_location

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset '{path}' does not exist; run `dvc repro prepare` "
                                f"(or python -m ntksap.stages.prepare <dataset>)")
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mapped: only the name is read here
    name = obj.get("name") if isinstance(obj, dict) else None
    if name == "imagenet":
        bundle = get_dataset(name, **dataset_location(name))
        if _imagenet_index(bundle) != obj:
            raise ValueError(f"'{path}' indexes another ImageNet folder than '{bundle.source}' (classes, image "
                             f"list or labels differ); run `dvc repro prepare` again")
        return bundle
    if not isinstance(name, str):
        raise ValueError(f"'{path}' is not a prepared dataset (no dataset name in it)")
    return replace(load_cache(path, name), source=str(path))


def main(argv: list[str] | None = None) -> int:
    from ..data import DATASETS

    p = argparse.ArgumentParser(prog="python -m ntksap.stages.prepare", description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out", help="the prepared file (default: data/prepared/<dataset>.pt)")
    args = p.parse_args(argv)
    out = prepare(args.dataset, args.out)
    bundle = load_prepared(out)
    print(f"{out}: {bundle!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
