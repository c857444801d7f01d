"""README's "Opening the results" (``jupyter lab results/<experiment>/notebooks/...``):
JupyterLab is installed with the ``pipeline`` extra, its server starts headless,
serves the Lab page, and hands an executed notebook, figures included, to the
browser through the REST contents API exactly as it lies on disk.

The server is ``jupyter lab`` itself (the README's command), on a free port, with
a token, root folder, config and runtime folders of its own (nothing of the
user's Jupyter setup is read or left behind). The executed notebook is built and
run here (one cell drawing a figure with ``ntksap.figures.style``), so a clean
clone needs no ``results/``; the pipeline's own executed notebook is checked too
when ``dvc repro`` has written it."""

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("jupyter_server", reason="jupyter_server is not installed (pip install -e '.[dev]')")
pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e '.[dev]')")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PIPELINE_NOTEBOOK = ROOT / "results" / "quick" / "notebooks" / "prune" / "seed-0.ipynb"
IMAGES = ("image/png", "image/svg+xml")
START_TIMEOUT = 90.0  # seconds for `jupyter lab` to answer /api/status
# urllib without the environment's proxies: the server is on 127.0.0.1
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.slow  # a server start and a kernel run: ~10-20 s


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, token: str, root: Path, log: Path):
        self.proc, self.url, self.token, self.root, self.log = proc, url, token, root, log

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError as e:
            return f"(no log: {e})"

    def get(self, path: str, token: bool = True, timeout: float = 30.0) -> tuple[int, dict, bytes]:
        """GET ``path`` (already quoted); the status, headers and body, errors included."""
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"token {self.token}")
        try:
            with OPENER.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def request(self, method: str, rel: str, body: dict | None = None) -> tuple[int, dict]:
        """``method`` on the contents API path of ``rel``; the status and the JSON reply."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + "/api/contents/" + urllib.parse.quote(rel), data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with OPENER.open(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return status, {"raw": raw[:2000]}

    def notebook(self, rel: str) -> dict:
        """The contents API's model of the notebook ``rel`` (relative to the root)."""
        status, _, body = self.get("/api/contents/" + urllib.parse.quote(rel) + "?content=1&type=notebook")
        assert status == 200, f"GET /api/contents/{rel}: HTTP {status}\n{body[:2000]!r}\nserver log:\n{self.log_tail()}"
        return json.loads(body)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server (it shuts down on SIGTERM), kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def start(base: Path, attempts: int = 3) -> Server:
    """``jupyter lab`` headless in ``base/root``; returns once /api/status answers."""
    root = base / "root"
    root.mkdir()
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
                     ("IPYTHONDIR", "ipython")):
        env[var] = str(base / sub)  # none of the user's Jupyter config read, no runtime files left behind
    env.pop("JUPYTER_TOKEN", None)
    for attempt in range(attempts):
        port, token = free_port(), secrets.token_hex(16)
        log = base / f"server-{attempt}.log"
        cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--allow-root",
               "--ServerApp.open_browser=False", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0",  # exactly this port, or fail (and try another)
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.terminals_enabled=False", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        server = Server(proc, f"http://127.0.0.1:{port}", token, root, log)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if proc.poll() is not None:
                    break  # exited: port taken, or a real failure (reported below)
                try:
                    status, _, body = server.get("/api/status", timeout=5)
                    if status == 200:
                        return server
                except (urllib.error.URLError, ConnectionError, socket.timeout):
                    pass
                if time.monotonic() > deadline:
                    stop(proc)
                    pytest.fail(f"`{' '.join(cmd)}` did not answer GET /api/status within {START_TIMEOUT:.0f} s; "
                                f"server log:\n{server.log_tail()}")
                time.sleep(0.25)
        except BaseException:
            stop(proc)
            raise
        if "already in use" not in server.log_tail() or attempt == attempts - 1:
            pytest.fail(f"`{' '.join(cmd)}` exited ({proc.returncode}) before answering GET /api/status; "
                        f"server log:\n{server.log_tail()}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    installed()  # the kernel and the read-only results/ config (python -m ntksap.lab install)
    s = start(tmp_path_factory.mktemp("jupyter"))
    try:
        yield s
    finally:
        stop(s.proc)


def installed() -> None:
    """``python -m ntksap.lab install`` has run in this environment (the tests' helper
    runs it when the kernel or the server config is missing)."""
    from dvcrepo import ensure_kernel

    ensure_kernel()


def kernel_name() -> str:
    """``ntksap``, the pipeline's kernel (installed by the tests' helper when absent),
    or ``python3`` when that kernel cannot be had here."""
    from dvcrepo import ensure_kernel

    try:
        ensure_kernel()
        return "ntksap"
    except (AssertionError, subprocess.CalledProcessError, OSError, KeyError, ValueError):
        return "python3"


FIGURE_CELL = """\
%matplotlib inline
import matplotlib.pyplot as plt
from ntksap.figures.style import sparsity_axis, sparsity_position, style

style()
sparsities = [0.2, 0.36, 0.488, 0.5904, 0.6723]
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot(sparsity_position(sparsities), [99.0, 98.5, 97.4, 94.4, 89.0], marker="o", label="NTK-SAP")
sparsity_axis(ax, sparsities)
ax.set_ylabel("test accuracy (%)")
ax.legend()
plt.show()
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    """A small notebook executed here: a markdown cell, a figure, a printed line."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A figure"), nbformat.v4.new_code_cell(FIGURE_CELL),
                nbformat.v4.new_code_cell('print("done")')]
    folder = tmp_path_factory.mktemp("executed")
    kernel = kernel_name()
    nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300,
                            resources={"metadata": {"path": str(folder)}}).execute()
    path = folder / "figure.ipynb"
    nbformat.write(nb, path)
    return path


def images(nb: dict) -> list[tuple[int, str]]:
    """(cell index, MIME type) of each image output of the code cells."""
    return [(i, mime) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
            for o in c.get("outputs", []) for mime in o.get("data", {}) if mime in IMAGES]


def same_as_disk(model: dict, path: Path) -> None:
    """The contents API's notebook is the file on disk: valid, same cells, sources and outputs."""
    assert model["type"] == "notebook" and model["format"] == "json", model.get("type")
    served = nbformat.from_dict(model["content"])
    nbformat.validate(served)
    disk = nbformat.read(path, as_version=4)
    assert len(served.cells) == len(disk.cells)
    for i, (a, b) in enumerate(zip(served.cells, disk.cells)):
        assert a.cell_type == b.cell_type and a.source == b.source, f"cell {i} differs"
        if b.cell_type == "code":
            assert a.get("outputs") == b.get("outputs"), f"the outputs of cell {i} differ"
    assert served.metadata.get("kernelspec") == disk.metadata.get("kernelspec")
    assert model["size"] == path.stat().st_size


def test_token_is_required(server):
    status, _, _ = server.get("/api/contents", token=False)
    assert status == 403, f"GET /api/contents without the token: HTTP {status}"


def test_lab_is_served(server):
    """The page the README's `jupyter lab` opens: JupyterLab's HTML, its config."""
    status, headers, body = server.get("/lab")
    assert status == 200, f"GET /lab: HTTP {status}\n{body[:2000]!r}\nserver log:\n{server.log_tail()}"
    ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    assert ctype.startswith("text/html"), ctype
    html = body.decode("utf-8", errors="replace")
    assert "jupyter-config-data" in html and "JupyterLab" in html, html[:2000]


def test_executed_notebook_through_contents_api(server, executed):
    target = server.root / "executed" / executed.name
    target.parent.mkdir()
    shutil.copy2(executed, target)

    status, _, body = server.get("/api/contents/executed?content=1")
    assert status == 200, body[:2000]
    assert [c["name"] for c in json.loads(body)["content"]] == [executed.name]

    model = server.notebook(f"executed/{executed.name}")
    same_as_disk(model, target)
    nb = model["content"]
    found = images(nb)
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o["output_type"] == "error"]
    assert not errors, errors
    assert found == [(1, "image/png")], f"image outputs of the figure cell: {found}"
    png = base64.b64decode(next(o for o in nb["cells"][1]["outputs"] if "image/png" in o.get("data", {}))
                           ["data"]["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, len(png)
    assert nb["cells"][2]["outputs"][0]["text"] == "done\n"


def test_pipeline_notebook_through_contents_api(server):
    """The executed pruning notebook `dvc repro` writes (README's second `jupyter lab`)."""
    if not PIPELINE_NOTEBOOK.is_file():
        pytest.skip(f"{PIPELINE_NOTEBOOK.relative_to(ROOT)} is absent (written by `dvc repro`)")
    rel = PIPELINE_NOTEBOOK.relative_to(ROOT)
    target = server.root / rel
    target.parent.mkdir(parents=True)
    shutil.copy2(PIPELINE_NOTEBOOK, target)
    model = server.notebook(rel.as_posix())
    same_as_disk(model, target)
    nb = model["content"]
    assert images(nb), f"{rel} has no image outputs"
    errors = [(i, o.get("ename")) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
              for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{rel} has error outputs: {errors}"


def test_pipeline_outputs_are_read_only(server, executed):
    """README's promise: JupyterLab opens an executed notebook under results/ read-only
    (``writable: false``, so no autosave) and the server refuses to save, create,
    rename, delete or checkpoint anything there (ntksap.lab.ResultsContentsManager,
    installed by ``python -m ntksap.lab install``), while files outside results/,
    or in a results/ folder that is not a DVC project's, stay writable."""
    project = server.root / "project"
    inside = project / "results" / "exp" / "notebooks" / "run-0.ipynb"
    outside = project / "notebooks" / "scratch.ipynb"
    foreign = server.root / "results" / "other.ipynb"  # no dvc.yaml above it
    for path in (inside, outside, foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(executed, path)
    (project / "dvc.yaml").write_text("stages: {}\n")
    before = inside.read_bytes()
    rel = lambda p: p.relative_to(server.root).as_posix()  # noqa: E731

    status, listed = server.request("GET", rel(inside) + "/checkpoints")  # what JupyterLab asks on opening
    assert status == 200 and listed == [], (status, listed)
    assert not (inside.parent / ".ipynb_checkpoints").exists(), "listing checkpoints created a folder in results/"
    model = server.notebook(rel(inside))
    assert model["writable"] is False, f"an executed notebook under results/ is served writable: {model['writable']}"
    same_as_disk(model, inside)  # read-only, not hidden: its figures are all there
    assert server.notebook(rel(outside))["writable"] is True
    assert server.notebook(rel(foreign))["writable"] is True
    status, listing = server.request("GET", rel(inside.parent))
    assert status == 200 and [(c["name"], c["writable"]) for c in listing["content"]] == [(inside.name, False)]

    content = dict(model["content"], metadata={**model["content"]["metadata"], "edited": True})
    status, reply = server.request("PUT", rel(inside), {"type": "notebook", "format": "json", "content": content})
    assert status == 403, f"saving {rel(inside)}: HTTP {status} {reply}"
    assert "Save Notebook As" in reply.get("message", "") and "dvc repro" in reply["message"], reply
    assert inside.read_bytes() == before, "a refused save changed the file"
    for method, target, body in (
            ("PUT", project / "results" / "exp" / "new.ipynb", {"type": "notebook", "format": "json",
                                                                "content": content}),
            ("DELETE", inside, None),
            ("PATCH", inside, {"path": rel(project / "notebooks" / "moved.ipynb")}),
            ("PATCH", outside, {"path": rel(project / "results" / "exp" / "moved.ipynb")}),
            ("POST", Path(str(inside) + "/checkpoints"), None)):
        status, reply = server.request(method, rel(target), body)
        assert status == 403, f"{method} {rel(target)}: HTTP {status} {reply}"
    assert inside.read_bytes() == before and outside.is_file()
    assert not (project / "results" / "exp" / "new.ipynb").exists()
    assert not (inside.parent / ".ipynb_checkpoints").exists()

    status, reply = server.request("PUT", rel(outside), {"type": "notebook", "format": "json", "content": content})
    assert status == 200, f"saving {rel(outside)} (outside results/): HTTP {status} {reply}"
    assert json.loads(outside.read_text())["metadata"]["edited"] is True


def test_pipeline_output_rule(tmp_path):
    """ntksap.lab.pipeline_output against the folders it looks at."""
    from ntksap.lab import pipeline_output

    (tmp_path / "a" / "results" / "x").mkdir(parents=True)
    (tmp_path / "a" / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "a" / "sub" / "results").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "dvc.yaml").write_text("stages: {}\n")
    assert pipeline_output(tmp_path, "a/results/x/nb.ipynb")
    assert pipeline_output(tmp_path, "/a/results/x/new.ipynb")      # not there yet: still refused
    assert pipeline_output(tmp_path, "a/results/metrics.json")
    assert not pipeline_output(tmp_path, "a/results")              # the folder itself
    assert not pipeline_output(tmp_path, "a/notebooks/prune.ipynb")
    assert not pipeline_output(tmp_path, "a/dvc.yaml")
    assert not pipeline_output(tmp_path, "results/nb.ipynb")        # no dvc.yaml above it (tmp_path's parents have none)
    assert pipeline_output(tmp_path, "a/sub/results/nb.ipynb")      # the nearest project's results/
    assert not pipeline_output(tmp_path, "a/sub/notebooks/results.ipynb")
    # the same files, whatever folder the server was started in (no dependence on its root)
    project = tmp_path / "a"
    for root in (Path("/"), tmp_path, project, project / "results", project / "results" / "x"):
        for rel, expected in (("results/x/nb.ipynb", True), ("results/metrics.json", True),
                              ("notebooks/prune.ipynb", False), ("sub/results/nb.ipynb", True)):
            target = project / rel
            if root in target.parents:
                assert pipeline_output(root, target.relative_to(root).as_posix()) is expected, (root, rel)
    assert not pipeline_output(tmp_path / "a" / "results", "")  # results/ itself, seen from inside


def test_install_keeps_other_settings_and_refuses_to_clobber(tmp_path):
    """``python -m ntksap.lab install --prefix P``: the kernel, and the contents manager set
    in P's server config with every other key kept; a config naming another manager, or
    not JSON, is refused with nothing changed (``--force`` replaces the manager)."""
    from ntksap.lab import KERNEL, MANAGER, config_path, configured

    def install(*extra):
        return subprocess.run([sys.executable, "-m", "ntksap.lab", "install", "--prefix", str(tmp_path), *extra],
                              capture_output=True, text=True)

    config = config_path(tmp_path)
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"ServerApp": {"port": 9999}, "LabApp": {"news_url": None}}))
    r = install()
    assert r.returncode == 0, r.stderr
    spec = json.loads((tmp_path / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json").read_text())
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve() and spec["display_name"] == KERNEL
    assert json.loads(config.read_text()) == {"ServerApp": {"port": 9999, "contents_manager_class": MANAGER},
                                              "LabApp": {"news_url": None}}
    assert configured(tmp_path)

    other = {"ServerApp": {"contents_manager_class": "jupytext.TextFileContentsManager"}}
    for text in (json.dumps(other), "{not json"):
        config.write_text(text)
        r = install()
        assert r.returncode == 2 and str(config) in r.stderr, (r.returncode, r.stderr)
        assert config.read_text() == text and not configured(tmp_path)
    config.write_text(json.dumps(other))
    assert install("--force").returncode == 0 and configured(tmp_path)
