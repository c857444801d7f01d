"""Where the datasets live on this machine: machine configuration, not an experiment parameter.

The pipeline's stages and ``experiment.load_dataset`` take the data folder, a local copy of a
dataset and whether to download from here, so the same params.yaml (and DVC's run cache) serves
every machine and every queued run. Three settings, each from the first of: its environment
variable, the untracked file ``ntksap.local.yaml``, the default::

    root        NTKSAP_DATA_ROOT         data: {root: ...}                       default: data
    local_path  NTKSAP_DATA_LOCAL_PATH   data: {local_paths: {<dataset>: ...}}   default: none
    download    NTKSAP_DATA_DOWNLOAD     data: {download: true | false}          default: 1

* ``root``: the folder of downloads and uint8 caches (``<root>/<dataset>/``).
* ``local_path``: a copy you provide (folder or archive, see :mod:`ntksap.data`) of the dataset
  being loaded; the environment variable names one path for whichever dataset the experiment
  uses, the file one per dataset::

      # ntksap.local.yaml (untracked, git-ignored), at the repository root or a folder above it
      data:
        root: /scratch/datasets
        download: false
        local_paths: {cifar10: /archive/cifar-10-python.tar.gz, imagenet: /archive/imagenet}

* ``download``: ``1`` (fetch an absent dataset; the default) or ``0`` (never touch the network).

Environment variables win over the file; an empty variable counts as unset. Relative paths in
the environment are taken from the working directory (a stage's is the repository root),
relative paths in the file from the file's folder. The file is looked for in the working
directory and then in each folder above it: a queued experiment, which DVC runs in a copy of
the repository under ``.dvc/tmp/exps/``, finds the workspace's file (the environment of
``dvc queue start`` reaches its jobs too).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ROOT = "NTKSAP_DATA_ROOT"
ENV_LOCAL_PATH = "NTKSAP_DATA_LOCAL_PATH"
ENV_DOWNLOAD = "NTKSAP_DATA_DOWNLOAD"
LOCAL_FILE = "ntksap.local.yaml"
DEFAULT_ROOT = "data"
_SECTION_KEYS = ("root", "download", "local_paths")
_DOWNLOAD_VALUES = {"1": True, "0": False}


def local_file(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest ``ntksap.local.yaml`` at or above ``start`` (default: the working directory)."""
    from .layout import nearest

    return nearest(LOCAL_FILE, start)


def _unknown_key(path: Path, where: str, key: str, allowed) -> ValueError:
    """The error for a key of the local file that is not one of ``allowed`` (with the closest)."""
    from .checks import closest

    near = closest(key, allowed)
    hint = f" (did you mean {near!r}?)" if near else ""
    return ValueError(f"{path}: the key {where} is not allowed{hint}; allowed: {', '.join(allowed)}")


def _read_local_file(path: Path) -> dict:
    """The ``data`` section of ``path``, checked: only known keys, values of the right kind."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict) or set(doc) - {"data"}:
        extra = sorted(set(doc) - {"data"}) if isinstance(doc, dict) else doc
        raise ValueError(f"{path}: only a 'data' section is allowed at the top, found {extra!r}")
    section = doc.get("data") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'data' must be a mapping with keys {', '.join(_SECTION_KEYS)}; got {section!r}")
    for key in section:
        if key not in _SECTION_KEYS:
            raise _unknown_key(path, f"data.{key}", key, _SECTION_KEYS)
    if "root" in section and not (isinstance(section["root"], str) and section["root"]):
        raise ValueError(f"{path}: data.root={section['root']!r} is not allowed; allowed: a folder path")
    if "download" in section and not isinstance(section["download"], bool):
        raise ValueError(f"{path}: data.download={section['download']!r} is not allowed; allowed: true or false")
    paths = section.get("local_paths") or {}
    if not isinstance(paths, dict):
        raise ValueError(f"{path}: data.local_paths must map dataset names to paths; got {paths!r}")
    from .data import DATASETS

    for name, value in paths.items():
        if name not in DATASETS:
            raise _unknown_key(path, f"data.local_paths.{name}", name, DATASETS)
        if not (isinstance(value, str) and value):
            raise ValueError(f"{path}: data.local_paths.{name}={value!r} is not allowed; allowed: a path")
    return section


def _from_file(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def dataset_location(dataset: str, environ: dict | None = None, start: str | os.PathLike | None = None) -> dict:
    """``root``, ``local_path`` and ``download`` for ``dataset`` on this machine (the keyword
    arguments of :func:`ntksap.data.get_dataset`), from the environment (``environ``, default
    ``os.environ``), then ``ntksap.local.yaml`` (searched from ``start``), then the defaults.
    A bad value raises ``ValueError`` naming the variable or key."""
    from .checks import check_choice
    from .data import DATASETS

    check_choice("dataset", dataset, DATASETS)
    env = os.environ if environ is None else environ
    path = local_file(start)
    section = _read_local_file(path) if path is not None else {}
    base = path.parent if path is not None else None

    root = DEFAULT_ROOT
    if "root" in section:
        root = _from_file(base, section["root"])
    if env.get(ENV_ROOT):
        root = str(Path(env[ENV_ROOT]).expanduser())

    download = section.get("download", True)
    if env.get(ENV_DOWNLOAD):
        value = env[ENV_DOWNLOAD].strip()
        if value not in _DOWNLOAD_VALUES:
            raise ValueError(f"{ENV_DOWNLOAD}={env[ENV_DOWNLOAD]!r} is not allowed; allowed: 1 (download a "
                             f"dataset that is not under the root) or 0 (never download)")
        download = _DOWNLOAD_VALUES[value]

    local_path, origin = None, None
    if dataset in (section.get("local_paths") or {}):
        local_path, origin = _from_file(base, section["local_paths"][dataset]), f"{path}: data.local_paths.{dataset}"
    if env.get(ENV_LOCAL_PATH):
        local_path, origin = str(Path(env[ENV_LOCAL_PATH]).expanduser()), ENV_LOCAL_PATH
    if local_path is not None and dataset == "digits":
        raise ValueError(f"{origin}={local_path!r} is set, but dataset 'digits' ships with scikit-learn and takes "
                         f"no local copy; unset it for this experiment")
    return {"root": root, "local_path": local_path, "download": download}
