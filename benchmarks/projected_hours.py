"""Projected training hours of every named experiment set from measured
ResNet-20 epoch times (``benchmarks/epoch_time.py --json``).

For each set (``ntksap/conf/experiment/*.yaml``, composed as the pipeline does):

    trainings = len(seeds) x sum over runs of (len(sparsities), or 1 for a dense run)
    hours     = trainings x epochs x seconds per epoch per network / 3600
                (+ trainings x compile seconds for the torch.compile columns; a stacked
                compile counted once per K networks)

Each column takes the masked row of the epoch-time JSON where it was measured
(``masked``, ``stacked_masked``, ``stacked_masked_compile_graphs``: a pruned
network trains masked), else the unmasked one; ``stacked_graphs`` is the
stacked engine under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs,
``train.compile: reduce-overhead``).

ResNet-20 / CIFAR-10 sets use the measured seconds directly. Other models are
a **scaled estimate**: the ResNet-20 seconds times the ratio of one epoch's
multiply-accumulates, (3 x train images + test images) x the model's forward
MACs per image (``ntksap.masks.layer_flops``: conv and linear layers, dense)
over the same for ResNet-20 on CIFAR-10. A batch-128 ResNet-20 step is
launch-bound on a large GPU (docs/scaling.md), bigger networks use the GPU
better, so the scaled figures are upper bounds for them, far too high for the
ImageNet models; the column ``at N TFLOP/s`` gives the other end: the epoch's
work (2 FLOPs per MAC) at ``--tflops`` sustained (default 100, about an
eighth of an H100/H200's dense bf16 peak). ImageNet's JPEG decoding is in
neither.

    python benchmarks/projected_hours.py --epoch-json /tmp/device_check/epoch_time.json
    python benchmarks/projected_hours.py --seconds eager=3.1,compile=2.2,stacked=0.6,stacked_graphs=0.45
    python benchmarks/projected_hours.py --seconds 2.5 --sets cifar10_resnet20 ablation_R

The sets are composed with ``ntksap.config.compose`` (Hydra) where it can be
imported, else with a small reader of the same YAML files (``--composer``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CONF = ROOT / "ntksap" / "conf"

# train / test images per epoch (ntksap/data.py's datasets; ImageNet: ILSVRC-2012 train / val)
DATASET_IMAGES = {"digits": (1437, 360), "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),
                  "tiny_imagenet": (100_000, 10_000), "imagenet": (1_281_167, 50_000)}
MEASURED = ("resnet20", "cifar10")
COLUMNS = ("eager", "compile", "stacked", "stacked_graphs")
# column <- epoch_time.py rows, the masked one first (a pruned network trains masked; dense is 1 of 22 per seed)
SOURCES = {"eager": ("masked", "eager"), "compile": ("compile",),
           "stacked": ("stacked_masked", "stacked"),
           "stacked_graphs": ("stacked_masked_compile_graphs", "stacked_compile_graphs")}
COMPILED = ("compile", "stacked_graphs")   # the columns that pay a one-off compile per training


# -- composing the named sets ------------------------------------------------------------
def _read(path: Path) -> tuple[dict, bool]:
    import yaml

    text = path.read_text()
    is_global = any(line.strip() == "# @package _global_" for line in text.splitlines()[:3])
    return yaml.safe_load(text) or {}, is_global


def _merge(a: dict, b: dict) -> dict:
    """Hydra's merge: mappings merged key by key, anything else replaced."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _group(group: str, option: str) -> dict:
    data, is_global = _read(CONF / group / f"{option}.yaml")
    data.pop("defaults", None)
    return data if is_global else {group: data}


def mini_compose(name: str) -> dict:
    """The set ``name`` composed from ntksap/conf as Hydra does for these files:
    config.yaml's body, then its groups (``train``, with the set's ``override``),
    then the set's own defaults list in order (``_self_`` = the set's body)."""
    base, _ = _read(CONF / "config.yaml")
    base_defaults = base.pop("defaults", [])
    exp, _ = _read(CONF / "experiment" / f"{name}.yaml")
    exp_defaults = exp.pop("defaults", ["_self_"])
    overrides, own = {}, []
    for entry in exp_defaults:
        if entry == "_self_":
            own.append(None)
            continue
        (key, value), = entry.items()
        if key.startswith("override "):
            overrides[key.removeprefix("override ").strip().lstrip("/")] = value
        else:
            own.append((key.lstrip("/"), value))
    out: dict = {}
    for entry in base_defaults:
        if entry == "_self_":
            out = _merge(out, base)
            continue
        (key, value), = entry.items()
        if key == "experiment":
            for item in own:
                out = _merge(out, exp if item is None else _group(*item))
        else:
            out = _merge(out, _group(key, overrides.get(key, value)))
    return out


def set_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_sets(names, composer: str = "auto") -> tuple[dict, str]:
    """name -> composed mapping, and which composer was used."""
    if composer in ("auto", "hydra"):
        try:
            from ntksap.config import compose

            return {n: compose(n) for n in names}, "hydra (ntksap.config.compose)"
        except ImportError as exc:
            if composer == "hydra":
                raise
            why = f"{exc.name or exc} missing"
    else:
        why = "asked for"
    return {n: mini_compose(n) for n in names}, f"YAML reader ({why})"


# -- counting ------------------------------------------------------------------------------
def trainings(cfg: dict) -> int:
    per_seed = sum(1 if (run or {}).get("method") == "dense" else len(cfg["sparsities"])
                   for run in cfg["runs"].values())
    return per_seed * len(cfg["seeds"])


_MACS: dict = {}


def epoch_macs(model: str, dataset: str) -> float:
    """Multiply-accumulates of one training epoch (3 x forward per training image,
    1 x per test image) of ``model`` on ``dataset``."""
    if (model, dataset) not in _MACS:
        import torch

        import ntksap
        from ntksap.data import SPECS
        from ntksap.masks import layer_flops

        spec = SPECS[dataset]
        torch.manual_seed(0)
        net = ntksap.build_model(model, spec.num_classes, init=None)
        per_image = sum(dense for dense, _ in layer_flops(net, spec.input_shape).values())
        n_train, n_test = DATASET_IMAGES[dataset]
        _MACS[model, dataset] = (per_image, per_image * (3 * n_train + n_test))
    return _MACS[model, dataset][1]


# -- measured seconds ------------------------------------------------------------------------
def seconds_from_json(path: str) -> tuple[dict, dict, str]:
    """(variant -> per-network s/epoch, variant -> compile s, a description) from epoch_time.py's JSON."""
    d = json.loads(Path(path).read_text())
    rows = {v: r for v, r in d.get("rows", {}).items() if r.get("status") == "ok"}
    secs, comp, used = {}, {}, []
    for col, names in SOURCES.items():
        found = [v for v in names if v in rows]
        if not found:
            continue
        secs[col] = float(rows[found[0]]["per_network_epoch_s"])
        used.append(found[0])
        if col in COMPILED:
            # once per training; a stacked compile is shared by its K networks. The largest of the rows: a
            # later row of the same graph finds it in inductor's cache and reports ~0 s
            comp[col] = max(float(rows[v].get("compile_s", 0.0)) / int(rows[v].get("networks", 1)) for v in found)
    where = f"{d.get('device')}{' (' + d['gpu'] + ')' if d.get('gpu') else ''}, torch {d.get('torch')}"
    k = d.get("k")
    return secs, comp, (f"measured by epoch_time.py on {where}; rows {', '.join(used)}"
                        + (f"; stacked K={k}" if any(c.startswith("stacked") for c in secs) else ""))


def parse_seconds(text: str) -> dict:
    if "=" not in text:
        return {"eager": float(text)}
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in COLUMNS:
            raise SystemExit(f"--seconds: '{k}' is not allowed; use {', '.join(COLUMNS)}")
        out[k.strip()] = float(v)
    return out


def project(cfgs: dict, secs: dict, compile_s: dict, tflops: float = 100.0) -> list[dict]:
    base = epoch_macs(*MEASURED)
    rows = []
    for name, cfg in cfgs.items():
        model, dataset = cfg["model"], cfg["dataset"]
        n, epochs = trainings(cfg), int(cfg["train"]["epochs"])
        try:
            ratio = 1.0 if (model, dataset) == MEASURED else epoch_macs(model, dataset) / base
        except Exception as exc:  # noqa: BLE001  (a model that cannot be built here, e.g. no torchvision)
            rows.append({"set": name, "model": model, "dataset": dataset, "trainings": n, "epochs": epochs,
                         "macs_ratio": None, "basis": f"n/a: {type(exc).__name__}: {exc}",
                         "hours": {c: math.nan for c in secs}, "compute_bound_hours": math.nan, "best": None,
                         "best_hours": None})
            continue
        hours = {}
        compute_h = n * epochs * 2 * epoch_macs(model, dataset) / (tflops * 1e12) / 3600
        for col, s in secs.items():
            extra = compile_s.get(col, 0.0) if epochs else 0.0
            hours[col] = n * (epochs * s * ratio + extra) / 3600
        best = min(hours, key=hours.get) if hours else None
        rows.append({"set": name, "model": model, "dataset": dataset, "trainings": n, "epochs": epochs,
                     "macs_ratio": ratio,
                     "basis": "measured" if ratio == 1.0 else f"scaled estimate (MACs x{ratio:.3g})",
                     "hours": hours, "compute_bound_hours": compute_h, "best": best,
                     "best_hours": hours.get(best) if best else None})
    return rows


def fmt_hours(h: float) -> str:
    if not math.isfinite(h):
        return "n/a"
    if h == 0:
        return "0"
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:,.1f} h" if h < 1000 else f"{h:,.0f} h"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--epoch-json", help="the JSON written by benchmarks/epoch_time.py --json")
    src.add_argument("--seconds",
                     help="ResNet-20 seconds per epoch per network: S (eager) or eager=S,compile=S,stacked=S")
    ap.add_argument("--compile-seconds", type=float, default=0.0,
                    help="with --seconds: one-off compile per training (of the compile and stacked_graphs columns)")
    ap.add_argument("--tflops", type=float, default=100.0, help="sustained TFLOP/s of the compute-bound column")
    ap.add_argument("--sets", nargs="+", default=None, help="named sets (default: all)")
    ap.add_argument("--composer", choices=["auto", "hydra", "yaml"], default="auto")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    if args.epoch_json:
        secs, comp, source = seconds_from_json(args.epoch_json)
    else:
        secs, source = parse_seconds(args.seconds), "given on the command line"
        comp = {c: args.compile_seconds for c in COMPILED if c in secs}
    if not secs:
        print("projected hours: skipped: no measured epoch time (no variant finished)")
        return 1
    names = args.sets or set_names()
    unknown = sorted(set(names) - set(set_names()))
    if unknown:
        raise SystemExit(f"--sets: {unknown} unknown; allowed: {', '.join(set_names())}")
    cfgs, how = compose_sets(names, args.composer)
    rows = project(cfgs, secs, comp, args.tflops)
    cols = [c for c in COLUMNS if c in secs]
    print(f"ResNet-20 seconds per epoch per network ({source}): "
          + ", ".join(f"{c} {secs[c]:.3g} s" + (f" + {comp[c]:.0f} s compile per training" if comp.get(c) else "")
                      for c in cols))
    print(f"sets composed with the {how}; hours = trainings x epochs x s/epoch (x MACs ratio) / 3600")
    w = max(len(r["set"]) for r in rows)
    wm = max(len(r["model"] + r["dataset"]) + 1 for r in rows)
    tf = f"at {args.tflops:g} TFLOP/s"
    print(f"{'set':<{w}} {'model/dataset':<{wm}} {'trainings':>9} {'epochs':>6} " + "".join(f"{c:>15}" for c in cols)
          + f" {tf:>17}  basis")
    for r in rows:
        print(f"{r['set']:<{w}} {r['model'] + '/' + r['dataset']:<{wm}} {r['trainings']:>9} {r['epochs']:>6} "
              + "".join(f"{fmt_hours(r['hours'][c]):>15}" for c in cols)
              + f" {fmt_hours(r['compute_bound_hours']):>17}  {r['basis']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"seconds": secs, "compile_seconds": comp, "source": source,
                                               "composer": how, "rows": rows}, indent=1) + "\n")
    for r in rows:   # one line per set, for a summary
        if r["best"] is not None and math.isfinite(r["best_hours"]):
            low = (f"; {fmt_hours(r['compute_bound_hours'])} at {args.tflops:g} TFLOP/s"
                   if r["macs_ratio"] != 1.0 else "")
            print(f"projected {r['set']}: {fmt_hours(r['best_hours'])} ({r['best']}; {r['trainings']} trainings x "
                  f"{r['epochs']} epochs; {r['basis']}{low})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
