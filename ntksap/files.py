"""Crash-safe file writing: a file is either its old or its complete new self.

Every result the project writes (masks, checkpoints, metrics) goes through
these helpers, so an interruption or a full disk never leaves a partial file
under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


def _umask_mode() -> int:
    """Permissions a plainly created file would get (0666 less the umask);
    ``mkstemp`` itself creates files readable by the owner only."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(binary_file)`` on a temporary file in ``path``'s folder,
    fsync, then rename it to ``path``: ``path`` always holds either its old or
    its complete new content; on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` atomically."""
    with open(src, "rb") as source:
        _atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))
