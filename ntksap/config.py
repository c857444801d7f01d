"""The pipeline's parameters on the command line: composing the named
experiment sets into ``params.yaml``, checking it, describing every key.

The named sets of PAPER.md section 6 are files of a Hydra config group,
``ntksap/conf/experiment/<name>.yaml``, over the shared defaults in
``ntksap/conf/config.yaml``; each picks its training protocol from the group
``train/<dataset>.yaml`` and may pick the runs of Figure 1 (``runs/figure1.yaml``)
and the paper's sparsities (``sparsity_grid/paper.yaml``). DVC composes them into
``params.yaml``::

    dvc exp run -S experiment=cifar10_resnet20          # Figure 1, left panel
    python -m ntksap.config compose cifar10_resnet20    # the same params.yaml, without running
    python -m ntksap.config check                       # validate params.yaml (the pipeline's first stage)
    python -m ntksap.config describe                    # every key, its description, what is allowed

The schema itself, and its validation, are :mod:`ntksap.params`.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from .checks import not_allowed
from .params import CONF_DIR, DEFAULT_EXPERIMENT, Params, ParamsError, load_params, parse_params
from .schema import allowed, core_type, field_type, is_model, schema_keys


# -- named experiment sets (Hydra config group) ----------------------------------------
def experiment_sets() -> dict[str, str]:
    """Named parameter sets: name -> the one-line description at the top of its file."""
    out = {}
    for f in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        lines = [ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#") and "@package" not in ln]
        out[f.stem] = lines[0] if lines else ""
    return out


def compose(experiment: str = DEFAULT_EXPERIMENT, overrides: Sequence[str] = ()) -> dict:
    """The ``params.yaml`` mapping of a named set plus Hydra ``overrides``
    (``"train.epochs=3"``), composed exactly as ``dvc exp run -S`` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    sets = experiment_sets()
    if experiment not in sets:
        raise ParamsError(str(not_allowed("experiment", experiment, "one of " + ", ".join(sets), sets)))
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={experiment}", *overrides])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


def render_params(data: Mapping, header: str = "") -> str:
    """YAML text of a parameter mapping, with each known key's description as
    a comment (what ``params.yaml`` looks like in the repository)."""
    import yaml

    def scalar(v):
        return yaml.safe_dump(v, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("\n...").strip()

    lines = [f"# {h}" if h else "#" for h in header.splitlines()]

    def emit(mapping, model, indent):
        fields = model.model_fields if model is not None else {}
        for k, v in mapping.items():
            f = fields.get(k)
            doc = f"  # {f.description}" if f is not None and f.description else ""
            sub = core_type(f.annotation) if f is not None else None
            pad = "  " * indent
            if isinstance(v, Mapping) and is_model(sub):
                lines.append(f"{pad}{k}:{doc}")
                emit(v, sub, indent + 1)
            elif isinstance(v, Mapping) and typing.get_origin(sub) is dict:   # runs: one line per run
                lines.append(f"{pad}{k}:{doc}")
                for name, run in v.items():
                    lines.append(f"{pad}  {name}: {scalar(run)}")
            else:
                lines.append(f"{pad}{k}: {scalar(v)}{doc}")

    emit(data, Params, 0)
    return "\n".join(lines) + "\n"


def write_params(data: Mapping, path: str | Path = "params.yaml", header: str = "") -> None:
    """Validate ``data`` and write it atomically with comments (:func:`render_params`)."""
    from .files import atomic_write_text

    parse_params(data, str(path))
    atomic_write_text(render_params(data, header), path)


PARAMS_HEADER = """\
Parameters of the pipeline (dvc.yaml): one experiment, here the named set '{name}'.
Composed from ntksap/conf/config.yaml, ntksap/conf/experiment/{name}.yaml and the groups it picks
(train/<dataset>.yaml, runs/, sparsity_grid/); switch sets with
    dvc exp run -S experiment=<name>        (names: python -m ntksap.config list)
which rewrites this file (without these comments). Each key is described by its comment;
`python -m ntksap.config check` validates the file. Results go to results/<experiment>/."""


def describe(model: type[BaseModel] = Params) -> str:
    """Every key of the schema (:mod:`ntksap.params`) with its description and
    what is allowed, as Markdown table rows generated from the models."""
    rows = ["| key | description | allowed |", "|---|---|---|"]
    for key, field in schema_keys(model):
        rows.append(f"| `{key}` | {field.description} | {allowed(field_type(field))} |")
    return "\n".join(rows)


# -- command line -----------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntksap.config", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a params file (the pipeline's first stage)")
    c.add_argument("path", nargs="?", default="params.yaml")
    c.add_argument("--stamp", help="on success, write this file (a constant text, so later stages only "
                   "depend on the check having passed)")
    k = sub.add_parser("compose", help="write params.yaml for a named set (what `dvc exp run -S experiment=...` does)")
    k.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT)
    k.add_argument("overrides", nargs="*", help="Hydra overrides such as train.epochs=3")
    k.add_argument("-o", "--output", default="params.yaml", help="file to write ('-' for stdout)")
    sub.add_parser("list", help="the named experiment sets")
    sub.add_parser("describe", help="every key, its description and what is allowed")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            p = load_params(args.path)
            print(f"{args.path}: valid; experiment '{p.experiment}': {p.dataset}/{p.model}, "
                  f"{len(p.runs)} runs x {len(p.seeds)} seeds x {len(p.sparsities)} sparsities")
            if args.stamp:
                from .files import atomic_write_text

                atomic_write_text("params valid\n", args.stamp)
        elif args.command == "compose":
            data = compose(args.experiment, args.overrides)
            header = PARAMS_HEADER.format(name=args.experiment)
            if args.output == "-":
                parse_params(data, "composed parameters")
                sys.stdout.write(render_params(data, header))
            else:
                write_params(data, args.output, header)
        elif args.command == "list":
            for name, text in experiment_sets().items():
                print(f"{name:26s} {text}")
        elif args.command == "describe":
            print(describe())
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
