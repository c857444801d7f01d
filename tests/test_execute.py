"""``python -m ntksap.execute`` (the pipeline's papermill): the executed notebook
is left read-only, after a success and after a failure, and a read-only one
from an earlier run is replaced; papermill's output argument is found as
papermill parses it."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ntksap.execute import local_output

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]


def notebook(path: Path, body: str) -> Path:
    """A two-cell notebook: a papermill ``parameters`` cell (``value = 0``), then ``body``."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("value = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def execute(src: Path, out: Path, value: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ntksap.execute", str(src), str(out), "-k", "python3",
                           "--no-progress-bar", "--log-level", "WARNING", "-p", "value", str(value)],
                          cwd=src.parent, capture_output=True, text=True, timeout=300)


def printed(out: Path) -> str:
    cell = nbformat.read(out, as_version=4).cells[-1]
    return "".join(o.get("text", "") for o in cell["outputs"] if o["output_type"] == "stream")


def writable_bits(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o222


@pytest.mark.parametrize("argv, expected", [
    (["in.ipynb", "out/run.ipynb", "-k", "ntksap", "-p", "run", "x"], "out/run.ipynb"),
    (["-k", "ntksap", "in.ipynb", "done.ipynb", "--log-level", "WARNING"], "done.ipynb"),
    (["in.ipynb", "-"], None),
    (["in.ipynb", "s3://bucket/run.ipynb"], None),
    (["in.ipynb"], None),
])
def test_the_output_is_found_as_papermill_parses_it(argv, expected):
    kept = list(argv)
    assert local_output(argv) == (Path(expected) if expected else None)
    assert argv == kept  # papermill still gets every argument


@pytest.mark.slow
def test_executed_notebook_is_read_only_and_a_rerun_replaces_it(tmp_path):
    src = notebook(tmp_path / "in.ipynb", "print('value', value * 2)")
    out = tmp_path / "out.ipynb"
    first = execute(src, out, 3)
    assert first.returncode == 0, first.stderr[-3000:]
    assert printed(out) == "value 6\n"
    assert writable_bits(out) == 0, oct(out.stat().st_mode)
    assert os.access(out, os.R_OK)
    again = execute(src, out, 5)  # over the read-only notebook of the first run
    assert again.returncode == 0, again.stderr[-3000:]
    assert printed(out) == "value 10\n" and writable_bits(out) == 0
    assert stat.S_IMODE(src.stat().st_mode) & stat.S_IWUSR  # the source notebook is untouched


@pytest.mark.slow
def test_a_failed_notebook_is_kept_read_only_with_its_error(tmp_path):
    src = notebook(tmp_path / "in.ipynb", "raise ValueError(f'bad value {value}')")
    out = tmp_path / "out.ipynb"
    done = execute(src, out, 7)
    assert done.returncode != 0 and "bad value 7" in done.stderr + done.stdout
    errors = [o for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])
              if o["output_type"] == "error"]
    assert errors and errors[0]["evalue"] == "bad value 7"
    assert writable_bits(out) == 0
