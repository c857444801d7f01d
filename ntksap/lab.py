"""Jupyter and the pipeline: the ``ntksap`` kernel, and a server that opens ``results/`` read-only.

    python -m ntksap.lab install     # into this environment (sys.prefix), once after `pip install`

installs the Jupyter kernel ``ntksap`` (the one papermill runs every pipeline
notebook with, as ``python -m ipykernel install --sys-prefix --name ntksap``)
and sets ``ServerApp.contents_manager_class`` to :class:`ResultsContentsManager`
in the environment's Jupyter server config,
``<sys.prefix>/etc/jupyter/jupyter_server_config.json`` (other keys there are
kept), so every ``jupyter lab`` (and ``jupyter notebook``) of this environment
uses it. (The ``jupyter_server_config.d/`` folder would not do: the server
reads only the extensions to enable from it.)

Everything under ``results/`` of a DVC project (a folder holding ``dvc.yaml``)
is written by ``dvc repro``: executed notebooks, masks, checkpoints, metrics.
DVC checks its outputs out as plain writable copies, and root ignores file
permissions anyway, so nothing on disk stops JupyterLab's autosave from
changing an executed notebook, after which ``dvc status`` reports its stage
changed and ``dvc repro`` runs it again. :class:`ResultsContentsManager` is
Jupyter's default file manager with one rule (:func:`pipeline_output`): such
files are reported ``writable: false``, so JupyterLab opens them read-only
(no autosave), and saving, creating, renaming or deleting anything there is
refused with HTTP 403 and a message pointing to *File > Save Notebook As*
outside ``results/``; no checkpoint is listed, made or restored there (listing
would create ``.ipynb_checkpoints/``). Everything else behaves as Jupyter's own manager.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path, PurePosixPath

try:
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from tornado import web
except ModuleNotFoundError as e:  # the core install has no Jupyter
    raise ModuleNotFoundError(f"ntksap.lab needs Jupyter's server ({e}): install the pipeline extra, "
                              f"pip install -e '.[pipeline]'") from e

KERNEL = "ntksap"
"""The kernel name dvc.yaml's stages run their notebooks with (``-k ntksap``)."""
RESULTS = "results"
"""The folder of a DVC project whose files the pipeline owns."""
CONFIG_NAME = "jupyter_server_config.json"
MANAGER = "ntksap.lab.ResultsContentsManager"


def pipeline_output(root: str | Path, path: str) -> bool:
    """Whether the API path ``path`` (relative to the server's ``root``, ``/``-separated)
    lies in ``results/`` of the nearest folder above it on disk that holds a ``dvc.yaml``:
    a file the pipeline writes. The same file gets the same answer wherever the server
    was started (the repository, a folder above it, or ``results/`` itself). ``results/``
    itself is not one (so a new experiment's folder can appear in it); anything inside it is."""
    target = Path(os.path.abspath(Path(root, *PurePosixPath(path.strip("/")).parts)))
    for folder in target.parents:  # the nearest project first
        if (folder / "dvc.yaml").is_file():
            rest = target.relative_to(folder).parts
            return len(rest) >= 2 and rest[0] == RESULTS
    return False


class ResultsContentsManager(AsyncLargeFileManager):
    """Jupyter's default contents manager, with the files of :func:`pipeline_output`
    reported read-only and protected from saves, new files, renames and deletes."""

    def _guard(self, path: str, action: str) -> None:
        if pipeline_output(self.root_dir, path):
            raise web.HTTPError(
                403, f"Cannot {action} '{path}': it is an output of the DVC pipeline (results/ is written by "
                     f"`dvc repro`; a changed file there makes its stage run again). To experiment, use "
                     f"File > Save Notebook As with a path outside results/.")

    async def get(self, path, content=True, type=None, format=None, require_hash=False):
        model = await super().get(path, content=content, type=type, format=format, require_hash=require_hash)
        # a directory's entries are made by this same method, so they are marked too
        if model["type"] != "directory" and pipeline_output(self.root_dir, model["path"]):
            model["writable"] = False
        return model

    async def save(self, model, path=""):
        self._guard(path, "save")
        return await super().save(model, path)

    async def delete_file(self, path):
        self._guard(path, "delete")
        return await super().delete_file(path)

    async def rename_file(self, old_path, new_path):
        self._guard(old_path, "rename")
        self._guard(new_path, "rename a file to")
        return await super().rename_file(old_path, new_path)

    # checkpoints: Jupyter keeps them in .ipynb_checkpoints/ beside the file, created on first use,
    # even by a listing; inside a DVC output folder that would be a file DVC did not write
    async def create_checkpoint(self, path):
        self._guard(path, "checkpoint")
        return await super().create_checkpoint(path)

    async def list_checkpoints(self, path):
        if pipeline_output(self.root_dir, path):
            return []  # none can exist, and listing would create the folder
        return await super().list_checkpoints(path)

    async def restore_checkpoint(self, checkpoint_id, path):
        self._guard(path, "restore a checkpoint of")
        return await super().restore_checkpoint(checkpoint_id, path)

    async def delete_checkpoint(self, checkpoint_id, path):
        self._guard(path, "delete a checkpoint of")
        return await super().delete_checkpoint(checkpoint_id, path)


def config_path(prefix: str | Path | None = None) -> Path:
    """The server config file :func:`install` edits under ``prefix`` (default ``sys.prefix``)."""
    return Path(prefix or sys.prefix) / "etc" / "jupyter" / CONFIG_NAME


def configured(prefix: str | Path | None = None) -> bool:
    """Whether the server config under ``prefix`` names :class:`ResultsContentsManager`."""
    try:
        return json.loads(config_path(prefix).read_text())["ServerApp"]["contents_manager_class"] == MANAGER
    except (OSError, ValueError, KeyError, TypeError):
        return False


def install(prefix: str | Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Installs the kernel :data:`KERNEL` (this Python) into ``prefix`` (default
    ``sys.prefix``, the environment) and sets ``ServerApp.contents_manager_class``
    to :class:`ResultsContentsManager` in its server config, keeping every other
    key. Refuses, changing nothing, when that file is not a JSON object or names
    another contents manager (``force``: replace it). Returns (the kernel's
    folder, the config file)."""
    from ipykernel.kernelspec import install as install_kernel

    from .files import atomic_write_text

    prefix = Path(prefix or sys.prefix)
    config = config_path(prefix)
    settings = {}
    if config.is_file():
        try:
            settings = json.loads(config.read_text() or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON ({e}); fix or remove it, then install again") from None
        if not isinstance(settings, dict) or not isinstance(settings.get("ServerApp", {}), dict):
            raise ValueError(f"{config} is not a JSON object of sections; fix or remove it, then install again")
    current = settings.get("ServerApp", {}).get("contents_manager_class")
    if current not in (None, MANAGER) and not force:
        raise ValueError(f"{config} sets ServerApp.contents_manager_class to {current!r}; installing would replace "
                         f"it with {MANAGER!r} (results/ read-only). Rerun with --force to replace it")
    kernel_dir = Path(install_kernel(kernel_name=KERNEL, display_name=KERNEL, prefix=str(prefix)))
    settings.setdefault("ServerApp", {})["contents_manager_class"] = MANAGER
    atomic_write_text(json.dumps(settings, indent=2) + "\n", config)
    return kernel_dir, config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ntksap.lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="the kernel 'ntksap' and the read-only results/ server config, into "
                                       "this environment")
    p.add_argument("--prefix", default=None, help="install under this prefix instead of sys.prefix")
    p.add_argument("--force", action="store_true", help="replace another contents manager named in the config")
    args = parser.parse_args(argv)
    if args.command == "install":
        try:
            kernel_dir, config = install(args.prefix, force=args.force)
        except ValueError as e:
            parser.exit(2, f"python -m ntksap.lab install: {e}\n")
        print(f"kernel '{KERNEL}': {kernel_dir}")
        print(f"server config (results/ read-only in jupyter lab): {config}")


if __name__ == "__main__":
    main()
