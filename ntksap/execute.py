"""Runs a pipeline notebook: papermill's command line, without an import it never uses.

``python -m ntksap.execute IN OUT -k ntksap -p name value ...`` takes exactly
papermill's arguments (``papermill --help``). The one difference: jsonschema,
which nbformat imports to validate notebooks, imports ``rfc3987_syntax`` when
it is installed (jupyter-server pulls it in) and builds an IRI grammar with it,
about 1.5 s of every papermill start on a 2-core CPU. nbformat's schema checks
no IRI format, so the import is made to fail, as if the package were absent;
every DVC stage that runs a notebook starts that much sooner. Nothing else in
papermill is changed, and nothing here imports torch (the kernel does).
"""

from __future__ import annotations

import sys

SKIPPED_MODULES = ("rfc3987_syntax",)
"""Modules made to fail on import in this process (``None`` in ``sys.modules``)."""


def main(argv: list[str] | None = None) -> None:
    """papermill's command line with :data:`SKIPPED_MODULES` unimportable."""
    for name in SKIPPED_MODULES:
        sys.modules.setdefault(name, None)
    from papermill.cli import papermill

    papermill.main(args=argv, prog_name="papermill")


if __name__ == "__main__":
    main()
