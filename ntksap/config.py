"""The pipeline's parameters: the schema of ``params.yaml``, loading with
validation, and the named experiment sets.

``params.yaml`` describes one experiment: a dataset and a model, the *runs*
(one curve each: a pruning method and its settings), seeds and sparsities, and
the prune / train / spectrum / plot knobs. Its schema is the dataclasses below,
one line of description per field (``python -m ntksap.config describe``).

The named sets of PAPER.md section 6 are files of a Hydra config group,
``ntksap/conf/experiment/<name>.yaml``, over the shared defaults in
``ntksap/conf/config.yaml``. DVC composes them into ``params.yaml``::

    dvc exp run -S experiment=cifar10_resnet20          # Figure 1, left panel
    python -m ntksap.config compose cifar10_resnet20    # the same params.yaml, without running

Every stage starts with :func:`load_params`, which stops with a
:class:`ParamsError` (a ``ValueError``) naming the key, the value and what is
allowed: an unknown method, model or dataset, a sparsity outside [0, 1), a
negative epoch count, a misspelt key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""Hydra config directory: ``config.yaml`` (shared defaults) and ``experiment/*.yaml``."""
DEFAULT_EXPERIMENT = "quick"
DENSE = "dense"
"""Pseudo-method of a run that is not pruned (sparsity 0, trained once per seed)."""
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ParamsError(ValueError):
    """A bad parameter: the message names the key, the value and what is allowed."""


# -- checks: one small callable per kind of value ---------------------------------------
class Check:
    """Validates and normalises one value; ``allowed`` says what passes."""

    allowed = "any value"

    def __call__(self, key: str, value: Any) -> Any:
        return value

    def fail(self, key: str, value: Any, allowed: str | None = None) -> None:
        raise ParamsError(f"{key}={value!r} is not allowed; allowed: {allowed or self.allowed}")


class Int(Check):
    def __init__(self, low: int | None = None):
        self.low = low
        self.allowed = "an integer" + (f" >= {low}" if low is not None else "")

    def __call__(self, key, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self.fail(key, value)
        if self.low is not None and value < self.low:
            self.fail(key, value)
        return int(value)


class Float(Check):
    def __init__(self, low: float | None = None, high: float | None = None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is not None and high is not None:
            self.allowed = f"a number in {lo}, {hi}"
        elif low is not None:
            self.allowed = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            self.allowed = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            self.allowed = "a finite number"

    def __call__(self, key, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            self.fail(key, value)
        v = float(value)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            self.fail(key, value)
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            self.fail(key, value)
        return v


class Bool(Check):
    allowed = "true or false"

    def __call__(self, key, value):
        if not isinstance(value, bool):
            self.fail(key, value)
        return value


class Str(Check):
    def __init__(self, pattern: re.Pattern | None = None, what: str = "a string"):
        self.pattern, self.allowed = pattern, what

    def __call__(self, key, value):
        if not isinstance(value, str) or not value or (self.pattern and not self.pattern.match(value)):
            self.fail(key, value)
        return value


class Choice(Check):
    """One of a fixed list; ``options`` may be a function (read the registries late)."""

    def __init__(self, options: Sequence[str] | Callable[[], Sequence[str]]):
        self._options = options

    @property
    def options(self) -> list[str]:
        return list(self._options() if callable(self._options) else self._options)

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.options)

    def __call__(self, key, value):
        if not isinstance(value, str) or value not in self.options:
            close = difflib.get_close_matches(str(value), self.options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamsError(f"{key}={value!r} is not allowed{hint}; allowed: {self.allowed}")
        return value


class Either(Check):
    """One of fixed words (e.g. ``auto``), returned as they are, or what ``inner`` allows."""

    def __init__(self, words: Sequence[str], inner: Check):
        self.words, self.inner = list(words), inner

    def exempt(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.words

    @property
    def allowed(self) -> str:
        return " or ".join(repr(w) for w in self.words) + f" or {self.inner.allowed}"

    def __call__(self, key, value):
        if self.exempt(value):
            return value
        try:
            return self.inner(key, value)
        except ParamsError:
            self.fail(key, value)


class Optional(Either):
    """``null`` or what ``inner`` allows."""

    def __init__(self, inner: Check, none_means: str = ""):
        super().__init__([], inner)
        self.none_means = none_means

    def exempt(self, value: Any) -> bool:
        return value is None

    @property
    def allowed(self) -> str:
        return f"null ({self.none_means}) or {self.inner.allowed}" if self.none_means else f"null or {self.inner.allowed}"


class ListOf(Check):
    def __init__(self, inner: Check, nonempty: bool = True, unique: bool = True, increasing: bool = False):
        self.inner, self.nonempty, self.unique, self.increasing = inner, nonempty, unique, increasing

    @property
    def allowed(self) -> str:
        kind = " strictly increasing list" if self.increasing else (" list without repeats" if self.unique else " list")
        return ("a non-empty" if self.nonempty else "a") + kind + f", each item {self.inner.allowed}"

    def __call__(self, key, value):
        if not isinstance(value, (list, tuple)) or (self.nonempty and not value):
            self.fail(key, value)
        out = [self.inner(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if self.unique and len(set(out)) != len(out):
            self.fail(key, value)
        if self.increasing and out != sorted(set(out)):
            self.fail(key, value)
        return out


class Section(Check):
    """A nested mapping validated by a dataclass schema."""

    def __init__(self, cls: type):
        self.cls = cls
        self.allowed = f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}"

    def __call__(self, key, value):
        return _build(self.cls, value, key)


class MapOf(Check):
    """A non-empty mapping ``name -> section``; names are identifiers."""

    def __init__(self, cls: type):
        self.cls = cls
        self.allowed = "a non-empty mapping from names (letters, digits, _) to runs"

    def __call__(self, key, value):
        if not isinstance(value, Mapping) or not value:
            self.fail(key, value)
        out = {}
        for name, sub in value.items():
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                raise ParamsError(f"{key}: the name {name!r} is not allowed; allowed: a name of letters, digits "
                                  "and _ starting with a letter (it becomes a folder and a DVC stage name)")
            out[name] = _build(self.cls, sub, f"{key}.{name}")
        return out


def knob(default: Any = MISSING, doc: str = "", check: Check | None = None) -> Any:
    """A dataclass field of the schema: its default, one line of description
    (with the paper's value), and the :class:`Check` it must pass."""
    meta = {"doc": doc, "check": check or Check()}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _build(cls: type, value: Any, prefix: str):
    """Instantiate schema ``cls`` from a mapping: refuse unknown keys (with the
    closest allowed key), fill defaults, run every field's check."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"'{prefix}'" if prefix else "the top level"
    if not isinstance(value, Mapping):
        raise ParamsError(f"{prefix or 'params'}={value!r} is not allowed; allowed: a mapping with keys "
                          f"{', '.join(fields)}")
    for k in value:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParamsError(f"unknown key '{_join(prefix, k)}'{hint} with value {value[k]!r}; "
                              f"allowed keys at {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ParamsError(f"missing key '{key}' ({f.metadata['doc']}); allowed: "
                                  f"{f.metadata['check'].allowed}")
            continue
        kwargs[name] = f.metadata["check"](key, value[name])
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


# -- registries (imported late: they import torch) --------------------------------------
def method_names() -> list[str]:
    from .scores import METHODS

    return [*METHODS, DENSE]


def bn_modes() -> list[str]:
    from .scores import BN_MODES

    return list(BN_MODES)


def count_rules() -> list[str]:
    from .pruning import COUNT_RULES

    return list(COUNT_RULES)


def model_names() -> list[str]:
    from .models import MODELS

    return list(MODELS)


def dataset_names() -> list[str]:
    try:
        from .data import DATASETS
    except ImportError:  # the data module is not there: the paper's datasets
        return ["digits", "cifar10", "cifar100", "tiny_imagenet", "imagenet"]
    return list(DATASETS)


# -- the schema ------------------------------------------------------------------------
@dataclass(kw_only=True)
class Run:
    """One curve of a figure: a pruning method and its settings (``runs.<name>``)."""

    method: str = knob(MISSING, "pruning method: random, magnitude, snip, iterative_snip, grasp, synflow, "
                       "ntksap, or dense (not pruned; a reference line)", Choice(method_names))
    iterations: int | None = knob(None, "pruning iterations T (paper: 1 for single-shot methods, 100 for SynFlow "
                                  "and iterative SNIP, NTK-SAP 20 on CIFAR-10 and 100 elsewhere; null = that "
                                  "default)", Optional(Int(1), "the method's paper default"))
    rounds: int | None = knob(None, "NTK-SAP resampling rounds R per iteration (paper: 5 on CIFAR-10, 1 elsewhere)",
                              Optional(Int(1), "the paper's default, 5"))
    epsilon: float | None = knob(None, "NTK-SAP perturbation standard deviation (paper: 0.01)",
                                 Optional(Float(0, low_open=True), "the paper's default, 0.01"))
    weights: str = knob("redraw", "NTK-SAP weights while scoring: redraw (new init per mini-batch, the paper) or "
                        "fixed (the network's own init)", Choice(["redraw", "fixed"]))
    inputs: str = knob("noise", "NTK-SAP inputs while scoring: noise (N(0, I), the paper) or data (the prune set)",
                       Choice(["noise", "data"]))
    bn_mode: str | None = knob(None, "BatchNorm while scoring: train (batch statistics), eval (running statistics) "
                               "or, for NTK-SAP, unperturbed (the unperturbed net's batch statistics in both "
                               "passes); null = the method's own, as the authors' code: eval for SynFlow, "
                               "unperturbed for NTK-SAP, train otherwise",
                               Optional(Choice(bn_modes), "the method's own"))
    label: str | None = knob(None, "legend label (null = the method's name)", Optional(Str()))


@dataclass(kw_only=True)
class Data:
    """Where datasets come from (``data``)."""

    root: str = knob("data", "folder for downloaded and prepared datasets", Str())
    local_path: str | None = knob(None, "a local copy of the dataset (archive or folder) to use instead of "
                                  "downloading", Optional(Str(), "download or use data/"))
    download: bool = knob(True, "download the dataset when it is not under root", Bool())


@dataclass(kw_only=True)
class Track:
    """NTK spectrum snapshots taken while pruning (``prune.track``)."""

    mode: str = knob("spectrum", "what to record: spectrum (all eigenvalues of the fixed-weight NTK), trace "
                     "(a finite-difference estimate; for big models) or none", Choice(["spectrum", "trace", "none"]))
    every: int = knob(5, "record after every k-th pruning iteration (and after the first and last)", Int(1))
    inputs: int = knob(16, "probe inputs from the test set (eigenvalues = inputs x classes)", Int(1))


@dataclass(kw_only=True)
class Prune:
    """Settings shared by all runs (``prune``)."""

    per_class: int = knob(10, "prune-set size per class for data-driven methods (paper: 10)", Int(1))
    prune_set: str = knob("balanced", "prune set of the data-driven methods: balanced (per_class images of every "
                          "class, fixed, not augmented) or random (per_class x classes images drawn at random, "
                          "training augmentation and a new order on every pass, as the authors)",
                          Choice(["balanced", "random"]))
    num_samples: int | None = knob(None, "NTK-SAP noise inputs per round (paper: 10 x classes)",
                                   Optional(Int(1), "10 x classes"))
    batch_size: int = knob(256, "mini-batch size while scoring (paper: 256)", Int(1))
    scope: str = knob("global", "one threshold over all layers (global, the paper) or per layer (local)",
                      Choice(["global", "local"]))
    schedule: str = knob("exponential", "density after iteration t: d^(t/T) (exponential, the paper) or linear",
                         Choice(["exponential", "linear"]))
    count_rule: str = knob("round", "weights kept per iteration: round (exactly round(d N), ties to the earlier "
                           "weight) or authors (N - int((1 - d) N), every weight tied at the threshold pruned, "
                           "as the authors' code: their masks bit for bit from the same scores)",
                           Choice(count_rules))
    track: Track = knob(Track(), "NTK snapshots while pruning", Section(Track))


@dataclass(kw_only=True)
class Train:
    """The training protocol (``train``); PAPER.md section 5 gives each dataset's."""

    epochs: int = knob(MISSING, "training epochs (paper: 160 CIFAR, 200 Tiny-ImageNet, 90 ImageNet; 0 = no "
                       "training, evaluate at init)", Int(0))
    batch_size: int = knob(MISSING, "training mini-batch (paper: 128 CIFAR, 256 Tiny-ImageNet and ImageNet)", Int(1))
    lr: float = knob(MISSING, "initial learning rate (paper: 0.1; 0.2 Tiny-ImageNet)", Float(0, low_open=True))
    momentum: float = knob(0.9, "SGD momentum (paper: 0.9)", Float(0, 1, high_open=True))
    nesterov: bool = knob(False, "Nesterov momentum (paper: CIFAR-100 only)", Bool())
    weight_decay: float = knob(MISSING, "weight decay (paper: 1e-4 CIFAR-10 and ImageNet, 5e-4 otherwise)",
                               Float(0))
    milestones: list[int] = knob([], "epochs after which lr is multiplied by gamma (paper: 80,120 / 60,120 / "
                                 "100,150 / 30,60,80)", ListOf(Int(1), nonempty=False, increasing=True))
    gamma: float = knob(0.1, "lr factor at each milestone (paper: 0.1)", Float(0, 1, low_open=True))
    augment: bool = knob(True, "the dataset's training augmentation (paper: crop + flip; digits: none)", Bool())
    processes: int | str = knob(1, "training processes: more than 1 launches DistributedDataParallel with torchrun, "
                                "one per GPU (gloo on a CPU); auto = one per visible GPU (1 without); batch_size "
                                "is the global batch", Either(["auto"], Int(1)))


@dataclass(kw_only=True)
class Spectrum:
    """Figure 2: eigenvalues of the fixed-weight NTK, dense vs each run (``spectrum``)."""

    sparsity: float = knob(MISSING, "the sparsity compared (paper: 0.738); one of `sparsities`",
                           Float(0, 1, high_open=True))
    seed: int = knob(0, "whose masks and init (one of `seeds`)", Int(0))
    num_inputs: int = knob(100, "probe inputs from the test set (paper: 100; eigenvalues = inputs x classes)",
                           Int(1))


@dataclass(kw_only=True)
class Plot:
    """Figures and tables (``plot``)."""

    density_sparsity: float | None = knob(None, "sparsity of the layer-wise density comparison",
                                          Optional(Float(0, 1, high_open=True), "the highest"))
    table_sparsities: list[float] | None = knob(None, "columns of Table 1 (paper: 0.8926, 0.956 on ImageNet)",
                                                Optional(ListOf(Float(0, 1, high_open=True)), "all sparsities"))
    accuracy: str = knob("final", "which test accuracy the figures and tables show: final (after the last epoch) "
                         "or best (the best over epochs, as the authors' training loop reports)",
                         Choice(["final", "best"]))


@dataclass(kw_only=True)
class Params:
    """One experiment: everything ``params.yaml`` holds."""

    experiment: str = knob(MISSING, "name of the experiment; results go to results/<experiment>",
                           Str(NAME_PATTERN, "a name of letters, digits and _ starting with a letter"))
    dataset: str = knob(MISSING, "dataset: digits, cifar10, cifar100, tiny_imagenet or imagenet",
                        Choice(dataset_names))
    model: str = knob(MISSING, "network: digits_cnn, resnet20, vgg16_bn, resnet18_tiny, resnet18_imagenet_stem, "
                      "resnet18 or resnet50", Choice(model_names))
    seeds: list[int] = knob(MISSING, "seeds; each gives a new init, prune set and training order (paper: 3)",
                            ListOf(Int(0)))
    sparsities: list[float] = knob(MISSING, "fractions of prunable weights removed (paper: 1 - 0.8^k, "
                                   "k = 2, 4, ..., 18)", ListOf(Float(0, 1, high_open=True)))
    runs: dict[str, Run] = knob(MISSING, "the curves: name -> method and its settings", MapOf(Run))
    data: Data = knob(Data(), "where datasets come from", Section(Data))
    prune: Prune = knob(Prune(), "settings shared by all runs", Section(Prune))
    train: Train = knob(MISSING, "training protocol", Section(Train))
    spectrum: Spectrum = knob(MISSING, "Figure 2 settings", Section(Spectrum))
    plot: Plot = knob(Plot(), "figures and tables", Section(Plot))

    # -- conveniences used by the notebooks ---------------------------------------------
    def pruned_sparsities(self, run: str) -> list[float]:
        """Sparsities a run is pruned and trained at: all of them, or 0 for ``dense``."""
        return [0.0] if self.runs[run].method == DENSE else list(self.sparsities)

    def label(self, run: str) -> str:
        return self.runs[run].label or METHOD_LABELS.get(run) or run


METHOD_LABELS = {"random": "Random", "magnitude": "Magnitude", "snip": "SNIP", "iterative_snip": "Iterative SNIP",
                 "grasp": "GraSP", "synflow": "SynFlow", "ntksap": "NTK-SAP", "dense": "Dense"}


def _cross_checks(p: Params) -> None:
    """Checks that span several keys."""
    if not any(abs(p.spectrum.sparsity - s) < 1e-9 for s in p.sparsities):
        raise ParamsError(f"spectrum.sparsity={p.spectrum.sparsity!r} is not allowed; allowed: one of "
                          f"sparsities {p.sparsities}")
    if p.spectrum.seed not in p.seeds:
        raise ParamsError(f"spectrum.seed={p.spectrum.seed!r} is not allowed; allowed: one of seeds {p.seeds}")
    for which in ("density_sparsity",):
        v = getattr(p.plot, which)
        if v is not None and not any(abs(v - s) < 1e-9 for s in p.sparsities):
            raise ParamsError(f"plot.{which}={v!r} is not allowed; allowed: null or one of sparsities {p.sparsities}")
    for v in p.plot.table_sparsities or []:
        if not any(abs(v - s) < 1e-9 for s in p.sparsities):
            raise ParamsError(f"plot.table_sparsities contains {v!r}, which is not allowed; allowed: values from "
                              f"sparsities {p.sparsities}")
    for name, run in p.runs.items():
        if run.method != "ntksap":
            for key, default in (("rounds", None), ("epsilon", None), ("weights", "redraw"), ("inputs", "noise")):
                if getattr(run, key) != default:
                    raise ParamsError(f"runs.{name}.{key}={getattr(run, key)!r} is not allowed for method "
                                      f"{run.method!r}; allowed: {default!r} ({key} is an NTK-SAP setting)")
        if run.bn_mode is not None and run.method != DENSE:
            from .scores import METHODS

            allowed = METHODS[run.method].bn_modes
            if run.bn_mode not in allowed:
                raise ParamsError(f"runs.{name}.bn_mode={run.bn_mode!r} is not allowed for method {run.method!r}; "
                                  f"allowed: null (the method's own) or one of {list(allowed)}")
        if run.method == DENSE and run.iterations is not None:
            raise ParamsError(f"runs.{name}.iterations={run.iterations!r} is not allowed for method 'dense'; "
                              "allowed: null (a dense run is not pruned)")
    if all(r.method == DENSE for r in p.runs.values()):
        raise ParamsError("runs has only dense runs; allowed: at least one pruning method")


def parse_params(data: Mapping, source: str = "params.yaml") -> Params:
    """Validate a parameter mapping (as loaded from YAML) into :class:`Params`.

    Raises :class:`ParamsError` whose message starts with ``source`` and names
    the key, the bad value and what is allowed.
    """
    try:
        params = _build(Params, data if data is not None else {}, "")
        _cross_checks(params)
    except ParamsError as exc:
        raise ParamsError(f"{source}: {exc}") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (see :func:`parse_params`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file '{path}' does not exist; allowed: a YAML file such as params.yaml "
                          f"(write one with `python -m ntksap.config compose {DEFAULT_EXPERIMENT}`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(data, str(path))


def to_dict(params: Params) -> dict:
    """The plain mapping of a :class:`Params` (every default filled in)."""
    return dataclasses.asdict(params)


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
        raise ParamsError(f"experiment={experiment!r} is not allowed; allowed: one of {', '.join(sets)}")
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

    def emit(mapping, cls, indent):
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
        for k, v in mapping.items():
            f = fields.get(k)
            doc = f"  # {f.metadata['doc']}" if f is not None and f.metadata.get("doc") else ""
            sub = f.metadata["check"] if f is not None else None
            pad = "  " * indent
            if isinstance(v, Mapping) and isinstance(sub, Section):
                lines.append(f"{pad}{k}:{doc}")
                emit(v, sub.cls, indent + 1)
            elif isinstance(v, Mapping) and isinstance(sub, MapOf):
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
Composed from ntksap/conf/config.yaml + ntksap/conf/experiment/{name}.yaml; switch sets with
    dvc exp run -S experiment=<name>        (names: python -m ntksap.config list)
which rewrites this file (without these comments). Each key is described by its comment;
`python -m ntksap.config check` validates the file. Results go to results/<experiment>/."""


def describe() -> str:
    """Every key with its description and what is allowed (Markdown table rows)."""
    rows = ["| key | description | allowed |", "|---|---|---|"]

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            chk = f.metadata["check"]
            key = _join(prefix, f.name)
            if isinstance(chk, Section):
                walk(chk.cls, key)
            elif isinstance(chk, MapOf):
                walk(chk.cls, f"{key}.<name>")
            else:
                rows.append(f"| `{key}` | {f.metadata['doc']} | {chk.allowed} |")

    walk(Params, "")
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
