"""ntksap.code_deps: the import closure of a notebook or module, and the check that
dvc.yaml lists, for every stage, exactly the ntksap files its code imports.

Cost: a second or two (files are parsed, nothing is imported)."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ntksap import code_deps

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


# a tiny package: every kind of import the closure must follow, and modules nothing imports
PACKAGE = {
    "pkg/__init__.py": """
        import importlib
        _PUBLIC = {"Thing": "lazy_target", "other": "unused_lazy"}
        def __getattr__(name):
            return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        """,
    "pkg/a.py": """
        import os
        from . import b                       # relative, a module
        from .sub import c as renamed         # relative, from a subpackage, aliased
        def late():
            import pkg.d                      # absolute, inside a function
            from .sub.deep import e           # relative, two packages down
        """,
    "pkg/b.py": "from .a import late  # a cycle back to a\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": "from .. import Thing  # a lazy export of the top package\n",
    "pkg/sub/deep/__init__.py": "from ... import f\n",
    "pkg/sub/deep/e.py": "import numpy\n",
    "pkg/d.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from . import unused              # never runs: not a dependency
        COMMAND = ["python", "-m", "pkg.launched"]   # a module it launches
        """,
    "pkg/f.py": "import pkg\nx = pkg.other_name\n",
    "pkg/g.py": "import pkg\ny = pkg.Thing  # a lazy export by attribute\n",
    "pkg/lazy_target.py": "",
    "pkg/launched.py": "",
    "pkg/unused.py": "",
    "pkg/unused_lazy.py": "",
    "loose.py": "import pkg.unused\n",   # a script beside the package, not a module of it
}


def _naive_closure(start: set[str]) -> set[str]:
    """The same closure by hand: what each module of PACKAGE imports, read off its text above."""
    imports = {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg.sub.c", "pkg.d", "pkg.sub.deep.e"},
        "pkg.b": {"pkg.a"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.lazy_target"},
        "pkg.sub.deep": {"pkg.f"},
        "pkg.sub.deep.e": set(),
        "pkg.d": {"pkg.launched"},
        "pkg.f": set(),
        "pkg.g": {"pkg.lazy_target"},
        "pkg.lazy_target": set(), "pkg.launched": set(), "pkg.unused": set(), "pkg.unused_lazy": set(),
    }
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            parts = m.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages on the way
            todo += imports[m]
    return seen


@pytest.mark.parametrize("start", [{"pkg.a"}, {"pkg.b"}, {"pkg.g"}, {"pkg.sub.deep.e"}, {"pkg.d", "pkg.unused"}])
def test_closure_on_a_tiny_package_matches_a_naive_check(tmp_path, start):
    _write(tmp_path, PACKAGE)
    assert code_deps.module_closure(start, tmp_path) == _naive_closure(start)


def test_closure_details(tmp_path):
    _write(tmp_path, PACKAGE)
    closure = code_deps.module_closure({"pkg.a"}, tmp_path)
    assert "pkg.unused" not in closure            # only under `if TYPE_CHECKING:`
    assert "pkg.unused_lazy" not in closure       # a lazy export nobody uses
    assert "pkg.launched" in closure              # named as a string: `python -m pkg.launched`
    assert "pkg.sub.deep" in closure              # a package on the way counts
    assert code_deps.source_files({"pkg.sub.c"}, tmp_path) == ["pkg/__init__.py", "pkg/lazy_target.py",
                                                               "pkg/sub/__init__.py", "pkg/sub/c.py"]
    with pytest.raises(ModuleNotFoundError, match="'pkg.nope'"):
        code_deps.module_closure({"pkg.nope"}, tmp_path)
    with pytest.raises(ModuleNotFoundError, match="'loose'"):
        code_deps.module_closure({"loose"}, tmp_path)  # not a module of a package


def test_notebook_modules_read_code_cells_only(tmp_path):
    _write(tmp_path, PACKAGE)
    book = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["import pkg.unused\n"]},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": ["%matplotlib inline\n", "!echo hi\n", "from pkg import g\n", "from pkg.sub import c\n"]},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nb.ipynb").write_text(json.dumps(book))
    assert code_deps.notebook_modules(tmp_path / "nb.ipynb", tmp_path) == {"pkg", "pkg.g", "pkg.sub", "pkg.sub.c"}


def test_source_digest_covers_path_and_content(tmp_path):
    _write(tmp_path, PACKAGE)
    files = code_deps.source_files({"pkg.sub.c"}, tmp_path)
    h = hashlib.sha256()
    for rel in files:
        content = (tmp_path / rel).read_bytes()
        h.update(f"{rel}\0{len(content)}\0".encode() + content)
    digest = code_deps.source_digest({"pkg.sub.c"}, tmp_path)
    assert digest == h.hexdigest()
    (tmp_path / "pkg/lazy_target.py").write_text("# one line more\n")      # a file of the closure
    changed = code_deps.source_digest({"pkg.sub.c"}, tmp_path)
    assert changed != digest
    (tmp_path / "pkg/unused.py").write_text("# outside the closure\n")
    assert code_deps.source_digest({"pkg.sub.c"}, tmp_path) == changed


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_the_closure_of_its_code():
    """THE check: a stage's `ntksap/...` deps are the import closure of its notebook
    (`papermill notebooks/x.ipynb`) or module (`python -m ntksap.x`), nothing more or less."""
    stages = _stages()
    assert set(stages) >= {"check", "prepare", "prune", "train", "spectrum", "plot"}
    for name, stage in stages.items():
        entries = code_deps.stage_entries(stage["cmd"])
        assert entries, f"stage {name} runs neither a notebook nor a python -m module: {stage['cmd']}"
        notebooks = [e for e in entries if e.endswith(".ipynb")]
        if notebooks:  # a notebook runs through the runner, whose code is the stage's too
            assert code_deps.RUNNER in entries and len(notebooks) == 1, (name, entries)
        modules = set().union(*(code_deps.entry_modules(ROOT / e if e.endswith(".ipynb") else e, ROOT)
                                for e in entries))
        expected = sorted(code_deps.module_file(m, ROOT).relative_to(ROOT).as_posix()
                          for m in code_deps.module_closure(modules, ROOT))
        listed = [d for d in stage["deps"] if isinstance(d, str) and d.startswith("ntksap/")]
        assert listed == expected, (
            f"stage {name}: listed but not imported {sorted(set(listed) - set(expected))}, imported but not "
            f"listed {sorted(set(expected) - set(listed))}; fix: python -m ntksap.code_deps --write dvc.yaml")
        for entry in notebooks:
            assert entry in stage["deps"], f"stage {name} runs {entry} without depending on it"
    assert code_deps.check_dvc_yaml(ROOT / "dvc.yaml") == {}


def test_every_stage_imports_what_it_runs():
    """The closure is not empty by accident: each stage reaches its own stage module."""
    stages = _stages()
    deps = {name: set(s["deps"]) - {d for d in s["deps"] if not isinstance(d, str)} for name, s in stages.items()}
    assert "ntksap/config.py" in deps["check"]
    assert "ntksap/stages/prepare.py" in deps["prepare"] and "ntksap/locations.py" in deps["prepare"]
    for stage in ("prune", "train", "spectrum"):
        assert f"ntksap/stages/{stage}.py" in deps[stage]
    assert {"ntksap/train.py", "ntksap/augment.py", "ntksap/distributed.py"} <= deps["train"]
    assert "ntksap/figures/accuracy.py" in deps["plot"]
    assert not any("ntksap/figures/accuracy.py" in deps[s] for s in stages if s != "plot")


def test_cli_prints_the_deps_list_and_checks_dvc_yaml(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ntksap.code_deps", "notebooks/prune.ipynb"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out) == code_deps.stage_deps("notebooks/prune.ipynb", ROOT)
    checked = subprocess.run([sys.executable, "-m", "ntksap.code_deps", "--check", "dvc.yaml"], cwd=ROOT,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # --write puts back a list that was edited by hand, and leaves everything else as it was
    text = (ROOT / "dvc.yaml").read_text()
    broken = text.replace("      - ntksap/augment.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(broken)
    for name in ("ntksap", "notebooks"):
        (tmp_path / name).symlink_to(ROOT / name)
    assert subprocess.run([sys.executable, "-m", "ntksap.code_deps", "--check", "dvc.yaml"], cwd=tmp_path,
                          capture_output=True, text=True).returncode == 1
    assert code_deps.write_dvc_yaml(tmp_path / "dvc.yaml")
    assert (tmp_path / "dvc.yaml").read_text() == text


@pytest.mark.parametrize("module", ["ntksap.config", "ntksap.stages.prepare", "ntksap.stages.train",
                                    "ntksap.results"])
def test_what_an_import_loads_is_inside_the_static_closure(module):
    """A runtime cross-check: the ntksap modules that importing ``module`` loads
    (module-level imports; a fresh interpreter) all lie in its static closure."""
    script = (f"import sys, {module}; "
              "print(sorted(m for m in sys.modules if m == 'ntksap' or m.startswith('ntksap.')))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(eval(loaded.stdout)) <= code_deps.module_closure({module}, ROOT)


def test_source_digest_does_not_depend_on_where_the_checkout_is(tmp_path):
    """The resume key hashes the trainer's source: two checkouts of the same code in different
    folders give the same digest (a machine's path is not part of it), an edit changes it."""
    import shutil

    from ntksap.code_deps import ROOT, source_digest

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("a", "deep/b"):
        shutil.copytree(ROOT / "ntksap", tmp_path / name / "ntksap", ignore=ignore)
    modules = ["ntksap.train", "ntksap.distributed"]
    here = source_digest(modules)
    assert source_digest(modules, tmp_path / "a") == source_digest(modules, tmp_path / "deep/b") == here
    with open(tmp_path / "a" / "ntksap" / "augment.py", "a") as f:
        f.write("# an edit\n")
    assert source_digest(modules, tmp_path / "a") != here
