"""The code a pipeline stage runs: the project modules a notebook or module imports, transitively.

Found statically (``ast``, nothing is imported or executed), so dvc.yaml can list exactly the
files each stage's result depends on, and the trainer can hash the source it runs::

    notebook_modules("notebooks/prune.ipynb")   # {'ntksap', 'ntksap.stages', 'ntksap.stages.prune', ...}
    module_closure({"ntksap.train"})            # every module ntksap.train imports, and so on
    source_files({"ntksap.train"})              # ['ntksap/__init__.py', 'ntksap/augment.py', ...]
    source_digest({"ntksap.train"})             # sha256 of those files (paths and bytes)

    python -m ntksap.code_deps notebooks/prune.ipynb      # the deps list of a stage, as YAML
    python -m ntksap.code_deps --check dvc.yaml           # every stage's listed deps equal the closure
    python -m ntksap.code_deps --write dvc.yaml           # rewrite those lists in place

What counts as an import of module ``m`` (each found anywhere in its file: module level, in
functions, absolute or relative; not under ``if TYPE_CHECKING:``, which never runs):

* ``import a.b.c`` and ``from a.b import c``: ``a.b.c`` when it is a module, else ``a.b``;
  importing a module runs every package ``__init__`` on the way, so ``a`` and ``a.b`` count too;
* a name a package exports lazily (PEP 562): a module-level dict literal ``_PUBLIC`` in its
  ``__init__`` maps the name to the submodule holding it (``ntksap/__init__.py``), and both
  ``from ntksap import Masks`` and ``ntksap.Masks`` then count as importing ``ntksap.masks``;
* a string constant that is exactly a project module's dotted name: ``"-m", "ntksap.distributed"``
  (a command line the module launches) or ``importlib.import_module("ntksap.data")``.

Only modules of the packages under ``root`` (the folder holding ``ntksap/``) are followed;
third-party imports are not code of this project.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the ``ntksap`` package (the repository root in a checkout)."""
PACKAGE = "ntksap"
LAZY_EXPORTS = "_PUBLIC"
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


# -- modules and their files -------------------------------------------------------------------
def module_file(module: str, root: str | Path = ROOT) -> Path | None:
    """The file of ``module`` under ``root`` (``a/b.py`` or ``a/b/__init__.py``), None if absent."""
    base = Path(root).joinpath(*module.split("."))
    for path in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _local(module: str, root: Path) -> bool:
    """True for a module of a package under ``root`` (not a third-party one, not a loose script)."""
    return (root / module.split(".")[0] / "__init__.py").is_file() and module_file(module, root) is not None


def _is_package(module: str, root: Path) -> bool:
    path = module_file(module, root)
    return path is not None and path.name == "__init__.py"


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs each package on the way."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _lazy_exports(package: str, root: Path) -> dict[str, str]:
    """Name -> submodule (dotted, absolute) of a package's lazy exports (its ``_PUBLIC`` dict)."""
    path = module_file(package, root)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == LAZY_EXPORTS for t in targets):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):  # not a literal: nothing to read statically
                return {}
            return {str(k): f"{package}.{str(v).lstrip('.')}" for k, v in value.items()}
    return {}


def _resolve_from(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"'from {'.' * level}{target or ''} import' in {module} goes above the top package")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend([node.test, *node.orelse])
        else:
            todo.extend(ast.iter_child_nodes(node))


def _imports_in(tree: ast.AST, module: str, is_package: bool, root: Path) -> set[str]:
    """Project modules that code ``tree`` (of ``module``; ``""`` for a notebook) imports."""
    found: set[str] = set()
    bound: dict[str, str] = {}  # local name -> the package it is bound to (for `pkg.Name` lookups)

    def add(name: str) -> None:
        for m in _with_parents(name):
            if _local(m, root):
                found.add(m)

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node.level, node.module)
            add(base)
            lazy = _lazy_exports(base, root)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if module_file(sub, root) is not None:
                    add(sub)
                    bound[alias.asname or alias.name] = sub
                elif alias.name in lazy:
                    add(lazy[alias.name])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            if _local(node.value, root):
                add(node.value)
    for node in _runtime_nodes(tree):  # `ntksap.Masks` after `import ntksap`: a lazy export's module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            package = bound[node.value.id]
            if _is_package(package, root):
                lazy = _lazy_exports(package, root)
                if node.attr in lazy:
                    add(lazy[node.attr])
    return found


def module_imports(module: str, root: str | Path = ROOT) -> set[str]:
    """The project modules ``module``'s file imports directly (see the module docstring)."""
    root = Path(root)
    path = module_file(module, root)
    if path is None:
        raise ModuleNotFoundError(f"module {module!r} is not under '{root}'")
    tree = ast.parse(path.read_text(), str(path))
    return _imports_in(tree, module, path.name == "__init__.py", root) - {module}


def module_closure(modules: Iterable[str], root: str | Path = ROOT) -> set[str]:
    """``modules``, their packages and every project module they import, transitively."""
    root = Path(root)
    todo = [m for name in modules for m in _with_parents(name)]
    for name in todo:
        if not _local(name, root):
            raise ModuleNotFoundError(f"module {name!r} is not under '{root}'")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(module_imports(name, root) - seen)
    return seen


# -- notebooks --------------------------------------------------------------------------------------
def _cell_source(source: str) -> str:
    """A code cell as Python: IPython's magics and shell escapes become plain calls."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # without IPython: drop the magic lines
        return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    return TransformerManager().transform_cell(source)


def notebook_modules(path: str | Path, root: str | Path = ROOT) -> set[str]:
    """The project modules a notebook's code cells import directly (with their packages)."""
    path = Path(path)
    book = json.loads(path.read_text())
    found: set[str] = set()
    for i, cell in enumerate(book.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        try:
            tree = ast.parse(_cell_source(source), f"{path} (cell {i})")
        except SyntaxError as exc:
            raise SyntaxError(f"{path}: code cell {i} is not valid Python: {exc}") from exc
        found |= _imports_in(tree, "", False, Path(root))
    return found


def entry_modules(entry: str | Path, root: str | Path = ROOT) -> set[str]:
    """What a stage runs: a notebook (``.ipynb``) -> the modules it imports; a module name
    (``python -m ntksap.config``) -> that module."""
    if str(entry).endswith(".ipynb"):
        return notebook_modules(entry, root)
    return {str(entry)}


# -- files and digests ----------------------------------------------------------------------------------
def source_files(modules: Iterable[str], root: str | Path = ROOT) -> list[str]:
    """The files (posix paths relative to ``root``, sorted) of the closure of ``modules``."""
    root = Path(root)
    return sorted(module_file(m, root).relative_to(root).as_posix() for m in module_closure(modules, root))


def source_digest(modules: Iterable[str], root: str | Path = ROOT) -> str:
    """sha256 (hex) of the closure of ``modules``: each file's relative path and bytes, in
    path order. Any edit to code that ``modules`` run changes it."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in source_files(modules, root):
        content = (root / rel).read_bytes()
        h.update(f"{rel}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()


# -- dvc.yaml --------------------------------------------------------------------------------------------
RUNNER = "ntksap.execute"
"""The module that runs a pipeline notebook (papermill's command line, :mod:`ntksap.execute`)."""
_NOTEBOOK = re.compile(rf"(?:\bpapermill|-m\s+{re.escape(RUNNER)})\s+(\S+\.ipynb)")
_MODULE = re.compile(r"\bpython3?\s+-m\s+([\w.]+)")


def stage_entries(cmd: str | list[str]) -> list[str]:
    """What a stage's command runs: each module it starts (``python -m <module>``, the
    notebook runner included) and the notebook it executes (``python -m ntksap.execute
    <notebook>`` or ``papermill <notebook>``); empty when it runs neither."""
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    return _MODULE.findall(cmd) + _NOTEBOOK.findall(cmd)


def stage_deps(entries: str | Iterable[str], root: str | Path = ROOT) -> list[str]:
    """The code deps (``ntksap/...`` files) of a stage that runs ``entries`` (notebooks,
    module names)."""
    root = Path(root)
    entries = [entries] if isinstance(entries, str) else list(entries)
    modules: set[str] = set()
    for entry in entries:
        modules |= entry_modules(root / entry if entry.endswith(".ipynb") else entry, root)
    return source_files(modules, root)


def _listed(deps) -> list[str]:
    paths = [d if isinstance(d, str) else next(iter(d)) for d in deps or []]
    return [p for p in paths if p.startswith(f"{PACKAGE}/")]


def check_dvc_yaml(path: str | Path = "dvc.yaml", root: str | Path | None = None) -> dict[str, tuple]:
    """Stage -> (listed, derived) ``ntksap/`` deps for every stage of ``path`` where they differ."""
    import yaml

    path = Path(path)
    root = Path(root) if root is not None else path.resolve().parent
    stages = yaml.safe_load(path.read_text())["stages"]
    wrong = {}
    for name, stage in stages.items():
        entries = stage_entries(stage["cmd"])
        if not entries:
            continue
        listed, derived = _listed(stage.get("deps")), stage_deps(entries, root)
        if listed != derived:
            wrong[name] = (listed, derived)
    return wrong


def write_dvc_yaml(path: str | Path = "dvc.yaml", root: str | Path | None = None) -> list[str]:
    """Rewrite, in place, each stage's run of ``- ntksap/...`` dep lines in ``path`` with the
    derived closure (comments and everything else stay). Returns the stages changed."""
    import yaml

    path = Path(path)
    root = Path(root) if root is not None else path.resolve().parent
    wrong = check_dvc_yaml(path, root)
    stages = yaml.safe_load(path.read_text())["stages"]
    lines = path.read_text().splitlines(keepends=True)
    out, stage, i = [], None, 0
    dep_line = re.compile(rf"^(\s+)- {PACKAGE}/\S+\s*$")
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  ([\w-]+):", line)
        if m and m.group(1) in stages:
            stage = m.group(1)
        d = dep_line.match(line)
        if d and stage in wrong:
            indent = d.group(1)
            while i < len(lines) and dep_line.match(lines[i]):
                i += 1
            out += [f"{indent}- {p}\n" for p in wrong[stage][1]]
            continue
        out.append(line)
        i += 1
    path.write_text("".join(out))
    left = check_dvc_yaml(path, root)
    if left:
        raise RuntimeError(f"{path}: stages {sorted(left)} list no `- {PACKAGE}/...` deps to replace; add one")
    return sorted(wrong)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ntksap.code_deps", description=__doc__.splitlines()[0])
    p.add_argument("entries", nargs="*", help="notebooks (.ipynb) or module names (ntksap.config)")
    p.add_argument("--check", metavar="DVC_YAML", help="compare every stage's ntksap/ deps with the closure")
    p.add_argument("--write", metavar="DVC_YAML", help="rewrite every stage's ntksap/ deps with the closure")
    p.add_argument("--indent", type=int, default=6, help="spaces before each '- path' line (default 6)")
    args = p.parse_args(argv)
    if args.write:
        changed = write_dvc_yaml(args.write)
        print(f"{args.write}: rewrote the code deps of {', '.join(changed)}" if changed
              else f"{args.write}: every stage's code deps are already exact")
        return 0
    if args.check:
        wrong = check_dvc_yaml(args.check)
        for name, (listed, derived) in wrong.items():
            print(f"{name}: listed but not imported {sorted(set(listed) - set(derived))}; imported but not "
                  f"listed {sorted(set(derived) - set(listed))}" if set(listed) != set(derived)
                  else f"{name}: listed out of order (sorted: {derived})")
        if wrong:
            print(f"fix with: python -m ntksap.code_deps --write {args.check}")
        return 1 if wrong else 0
    if not args.entries:
        p.error("give a notebook or module, --check DVC_YAML or --write DVC_YAML")
    root = Path.cwd() if (Path.cwd() / PACKAGE / "__init__.py").is_file() else ROOT
    files = sorted({f for e in args.entries for f in stage_deps(e, root)})
    print("".join(f"{' ' * args.indent}- {f}\n" for f in files), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
