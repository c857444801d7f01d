"""Runs a pipeline notebook: papermill's command line, without an import it never uses,
leaving the executed notebook without write permission.

``python -m ntksap.execute IN OUT -k ntksap -p name value ...`` takes exactly
papermill's arguments (``papermill --help``). Two differences:

* jsonschema, which nbformat imports to validate notebooks, imports
  ``rfc3987_syntax`` when it is installed (jupyter-server pulls it in) and
  builds an IRI grammar with it, about 1.5 s of every papermill start on a
  2-core CPU. nbformat's schema checks no IRI format, so the import is made to
  fail, as if the package were absent; every DVC stage that runs a notebook
  starts that much sooner.
* The executed notebook ``OUT`` (a local file) is a pipeline output, so it is
  left without write permission (:func:`read_only`), also when the run fails
  or is interrupted; a read-only ``OUT`` left by an earlier run is made
  writable first, so papermill can replace it. Run by hand, JupyterLab then
  opens it read-only. Under ``dvc repro`` DVC commits the output to its cache
  and checks out a fresh copy with default permissions (copy link type), so
  a pipeline notebook ends up writable again (README, "Opening the results").

Nothing else in papermill is changed, and nothing here imports torch (the kernel does).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SKIPPED_MODULES = ("rfc3987_syntax",)
"""Modules made to fail on import in this process (``None`` in ``sys.modules``)."""

WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_only(path: Path) -> None:
    """Clears every write permission bit of ``path`` (read and execute bits stay)."""
    path.chmod(_mode(path) & ~WRITE_BITS)


def local_output(argv: list[str]) -> Path | None:
    """The executed notebook's path among papermill's arguments ``argv``, when it
    is a local file (not ``-``, stdout, nor a URL such as ``s3://...``), else None."""
    from papermill.cli import papermill

    out = papermill.make_context("papermill", list(argv), resilient_parsing=True).params.get("output_path")
    if not out or out == "-" or "://" in out:
        return None
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """papermill's command line with :data:`SKIPPED_MODULES` unimportable and
    the executed notebook left without write permission."""
    for name in SKIPPED_MODULES:
        sys.modules.setdefault(name, None)
    from papermill.cli import papermill

    argv = sys.argv[1:] if argv is None else list(argv)
    out = local_output(argv)
    if out is not None and out.exists() and not os.access(out, os.W_OK):
        out.chmod(_mode(out) | stat.S_IWUSR)
    try:
        papermill.main(args=argv, prog_name="papermill")
    finally:
        if out is not None and out.exists():
            read_only(out)


if __name__ == "__main__":
    main()
