"""The schema of ``params.yaml``: pydantic models of one experiment and loading
with clear errors (the ``train`` section is :class:`ntksap.protocol.Train`).

``params.yaml`` describes one experiment: a dataset and a model, the *runs*
(one curve each: a pruning method and its settings), seeds and sparsities, and
the prune / train / spectrum / plot knobs. Each field of the models below
carries one line of description (``python -m ntksap.config describe``)::

    cfg = load_params("params.yaml")        # a Params, or a ParamsError
    cfg.train                               # a Train: what ntksap.train.train runs
    protocol("cifar10", epochs=3)           # ntksap/conf/train/cifar10.yaml, 3 epochs

A bad value stops with a :class:`ParamsError` (a ``ValueError``) that starts
with the source and names the key, the value, what is allowed and, for a
misspelt key or choice, the closest valid name::

    params.yaml: runs.snip.method='snipp' is not allowed (did you mean 'snip'?); allowed: one of random, ...
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from .protocol import CONF_DIR, Train, protocol, protocols  # noqa: F401  (re-exported: the train section)
from .schema import Distinct, NullMeans, OneOf, ParamsError, Says, Section, format_errors, knob, read_yaml  # noqa: F401
DEFAULT_EXPERIMENT = "quick"
DENSE = "dense"
"""Pseudo-method of a run that is not pruned (sparsity 0, trained once per seed)."""
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
METHOD_LABELS = {"random": "Random", "magnitude": "Magnitude", "snip": "SNIP", "iterative_snip": "Iterative SNIP",
                 "grasp": "GraSP", "synflow": "SynFlow", "ntksap": "NTK-SAP", "random_erk": "Random (ERK)",
                 "synflow_l2": "SynFlow-L2", "px": "PX", "dense": "Dense"}


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
    from .data import DATASETS

    return list(DATASETS)


# -- the types the schema is written with ------------------------------------------------
Name = Annotated[str, Field(strict=True, pattern=NAME_PATTERN.pattern),
                 Says("a name of letters, digits and _ starting with a letter (it names a folder)")]
Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, lt=1)]
"""A sparsity: in [0, 1)."""
Seed = Annotated[int, Field(strict=True, ge=0)]
Seeds = Annotated[list[Seed], Field(min_length=1), Distinct()]
Sparsities = Annotated[list[Fraction], Field(min_length=1), Distinct()]


# -- the schema ------------------------------------------------------------------------
class Run(Section):
    """One curve of a figure: a pruning method and its settings (``runs.<name>``)."""

    method: Annotated[str, OneOf(method_names)] = knob(
        ..., "pruning method: random, magnitude, snip, iterative_snip, grasp, synflow, ntksap (the paper's), "
        "random_erk, synflow_l2, px (beyond the paper), or dense (not pruned; a reference line)", strict=True)
    iterations: Annotated[int | None, NullMeans("the method's paper default")] = knob(
        None, "pruning iterations T (paper: 1 for single-shot methods, 100 for SynFlow and iterative SNIP, NTK-SAP "
        "20 on CIFAR-10 and 100 elsewhere; SynFlow-L2 and PX 100; null = that default)", strict=True, ge=1)
    rounds: Annotated[int | None, NullMeans("the paper's default, 5")] = knob(
        None, "NTK-SAP resampling rounds R per iteration (paper: 5 on CIFAR-10, 1 elsewhere)", strict=True, ge=1)
    epsilon: Annotated[float | None, NullMeans("the paper's default, 0.01")] = knob(
        None, "NTK-SAP perturbation standard deviation (paper: 0.01)", strict=True, allow_inf_nan=False, gt=0)
    weights: Literal["redraw", "fixed"] = knob(
        "redraw", "NTK-SAP weights while scoring: redraw (new init per mini-batch, the paper) or fixed (the "
        "network's own init)")
    inputs: Literal["noise", "data"] = knob(
        "noise", "NTK-SAP inputs while scoring: noise (N(0, I), the paper) or data (the prune set)")
    bn_mode: Annotated[str | None, OneOf(bn_modes), NullMeans("the method's own")] = knob(
        None, "BatchNorm while scoring: train (batch statistics), eval (running statistics) or, for NTK-SAP, "
        "unperturbed (the unperturbed net's batch statistics in both passes, taken in the unperturbed pass) or "
        "unperturbed_two_pass (the same from a separate statistics pass first, as the authors' code); null = the "
        "method's own: eval for SynFlow, SynFlow-L2 and PX, unperturbed for NTK-SAP, train otherwise", strict=True)
    prune_set: Annotated[Literal["balanced", "random"] | None, NullMeans("the method's own, else prune.prune_set")] = knob(
        None, "prune set of a data-driven method: balanced or random (see prune.prune_set); null = the method's "
        "paper's (balanced for PX), else prune.prune_set")
    label: str | None = knob(None, "legend label (null = the method's name)", strict=True, min_length=1)

    @model_validator(mode="after")
    def _fits_the_method(self) -> Run:
        """NTK-SAP's own keys, the BN modes of the method, a dense run's iterations."""
        if self.method != "ntksap":
            for key, default in (("rounds", None), ("epsilon", None), ("weights", "redraw"), ("inputs", "noise")):
                if getattr(self, key) != default:
                    raise ValueError(f"{key}={getattr(self, key)!r} is not allowed for method {self.method!r}; "
                                     f"allowed: {default!r} ({key} is an NTK-SAP setting)")
        if self.bn_mode is not None and self.method != DENSE:
            from .scores import METHODS

            allowed = METHODS[self.method].bn_modes
            if self.bn_mode not in allowed:
                raise ValueError(f"bn_mode={self.bn_mode!r} is not allowed for method {self.method!r}; "
                                 f"allowed: null (the method's own) or one of {list(allowed)}")
        if self.prune_set is not None and self.method != "ntksap":
            from .scores import METHODS

            if self.method == DENSE or not METHODS[self.method].needs_data:
                raise ValueError(f"prune_set={self.prune_set!r} is not allowed for method {self.method!r}; "
                                 "allowed: null (the method reads no data)")
        if self.method == DENSE and self.iterations is not None:
            raise ValueError(f"iterations={self.iterations!r} is not allowed for method 'dense'; "
                             "allowed: null (a dense run is not pruned)")
        return self


class Track(Section):
    """NTK spectrum snapshots taken while pruning (``prune.track``)."""

    mode: Literal["spectrum", "trace", "none"] = knob(
        "spectrum", "what to record: spectrum (all eigenvalues of the fixed-weight NTK), trace (a finite-difference "
        "estimate, no eigenvalues: for models whose full NTK is too dear) or none. Seconds per snapshot on 2 CPU "
        "cores (python benchmarks/track_cost.py): ResNet-20 / CIFAR-10 spectrum 0.6 at 20 inputs, 4.5 at 100, "
        "trace 1.0 at 100; VGG-16-BN / CIFAR-100 spectrum 87 at 5 inputs, trace 1.9 at 10; ResNet-18 / "
        "Tiny-ImageNet spectrum 240 at 5 inputs, trace 3.8 at 5; digits_cnn spectrum 0.02 at 10")
    every: int = knob(5, "record after every k-th pruning iteration (and after the first and last): T / every + 3 "
                      "snapshots at most per sparsity", strict=True, ge=1)
    inputs: int = knob(16, "probe inputs from the test set (eigenvalues = inputs x classes; a spectrum's cost "
                       "grows faster than the inputs)", strict=True, ge=1)


class Prune(Section):
    """Settings shared by all runs (``prune``)."""

    per_class: int = knob(10, "prune-set size per class for data-driven methods (paper: 10)", strict=True, ge=1)
    prune_set: Literal["balanced", "random"] = knob(
        "balanced", "prune set of the data-driven methods: balanced (per_class images of every class, fixed, not "
        "augmented) or random (per_class x classes images drawn at random, training augmentation and a new order "
        "on every pass, as the authors)")
    num_samples: Annotated[int | None, NullMeans("10 x classes")] = knob(
        None, "NTK-SAP noise inputs per round (paper: 10 x classes)", strict=True, ge=1)
    batch_size: int = knob(256, "mini-batch size while scoring (paper: 256)", strict=True, ge=1)
    scope: Literal["global", "local"] = knob(
        "global", "one threshold over all layers (global, the paper) or per layer (local)")
    schedule: Literal["exponential", "linear"] = knob(
        "exponential", "density after iteration t: d^(t/T) (exponential, the paper) or linear")
    count_rule: Annotated[str, OneOf(count_rules)] = knob(
        "round", "weights kept per iteration: round (exactly round(d N), ties to the earlier weight) or authors "
        "(N - int((1 - d) N), every weight tied at the threshold pruned, as the authors' code: their masks bit for "
        "bit from the same scores)", strict=True)
    track: Track = knob(Track(), "NTK snapshots while pruning")


class Spectrum(Section):
    """Figure 2: eigenvalues of the fixed-weight NTK, dense vs each run (``spectrum``)."""

    sparsity: Fraction = knob(..., "the sparsity compared (paper: 0.738); one of `sparsities`")
    seed: Seed = knob(0, "whose masks and init (one of `seeds`)")
    num_inputs: int = knob(100, "probe inputs from the test set (paper: 100; eigenvalues = inputs x classes)",
                           strict=True, ge=1)


class Plot(Section):
    """Figures and tables (``plot``)."""

    density_sparsity: Annotated[Fraction | None, NullMeans("the highest")] = knob(
        None, "sparsity of the layer-wise density comparison")
    table_sparsities: Annotated[Sparsities | None, NullMeans("all sparsities")] = knob(
        None, "columns of Table 1 (paper: 0.8926, 0.956 on ImageNet)")
    accuracy: Literal["final", "best"] = knob(
        "final", "which test accuracy the figures and tables show: final (after the last epoch) or best (the best "
        "over epochs, as the authors' training loop reports)")


class Params(Section):
    """One experiment: everything ``params.yaml`` holds."""

    experiment: Name = knob(..., "name of the experiment; results go to results/<experiment>")
    dataset: Annotated[str, OneOf(dataset_names)] = knob(
        ..., "dataset: digits, cifar10, cifar100, tiny_imagenet or imagenet", strict=True)
    model: Annotated[str, OneOf(model_names)] = knob(
        ..., "network: digits_cnn, resnet20, vgg16_bn, resnet18_tiny, resnet18_imagenet_stem, resnet18 or resnet50",
        strict=True)
    seeds: Seeds = knob(..., "seeds; each gives a new init, prune set and training order (paper: 3)")
    sparsities: Sparsities = knob(..., "fractions of prunable weights removed (paper: 1 - 0.8^k, k = 2, 4, ..., 18)")
    runs: Annotated[dict[Name, Run], Says("a non-empty mapping from names (letters, digits, _) to runs")] = knob(
        ..., "the curves: name -> method and its settings", min_length=1)
    prune: Prune = knob(Prune(), "settings shared by all runs")
    train: Train = knob(..., "training protocol: the set's group ntksap/conf/train/<dataset>.yaml (PAPER.md "
                        "section 5) and what the set changes")
    spectrum: Spectrum = knob(..., "Figure 2 settings")
    plot: Plot = knob(Plot(), "figures and tables")

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        """Checks that span several keys."""
        def listed(v):
            return any(abs(v - s) < 1e-9 for s in self.sparsities)

        if not listed(self.spectrum.sparsity):
            raise ValueError(f"spectrum.sparsity={self.spectrum.sparsity!r} is not allowed; allowed: one of "
                             f"sparsities {self.sparsities}")
        if self.spectrum.seed not in self.seeds:
            raise ValueError(f"spectrum.seed={self.spectrum.seed!r} is not allowed; allowed: one of seeds {self.seeds}")
        v = self.plot.density_sparsity
        if v is not None and not listed(v):
            raise ValueError(f"plot.density_sparsity={v!r} is not allowed; allowed: null or one of sparsities "
                             f"{self.sparsities}")
        for v in self.plot.table_sparsities or []:
            if not listed(v):
                raise ValueError(f"plot.table_sparsities contains {v!r}, which is not allowed; allowed: values from "
                                 f"sparsities {self.sparsities}")
        if all(r.method == DENSE for r in self.runs.values()):
            raise ValueError("runs has only dense runs; allowed: at least one pruning method")
        return self

    # -- conveniences used by the notebooks ---------------------------------------------
    def pruned_sparsities(self, run: str) -> list[float]:
        """Sparsities a run is pruned and trained at: all of them, or 0 for ``dense``."""
        return [0.0] if self.runs[run].method == DENSE else list(self.sparsities)

    def prune_set(self, run: str) -> str:
        """The prune set a run's data-driven method reads: the run's own, else its
        method's paper's (:attr:`ntksap.scores.Method.prune_set`), else ``prune.prune_set``."""
        from .scores import METHODS

        r = self.runs[run]
        spec = METHODS.get(r.method)
        return r.prune_set or (spec.prune_set if spec is not None else None) or self.prune.prune_set

    def label(self, run: str) -> str:
        return self.runs[run].label or METHOD_LABELS.get(run) or run


# -- loading -----------------------------------------------------------------------------
def parse_params(data: Mapping | None, source: str = "params.yaml") -> Params:
    """Validate a parameter mapping (as loaded from YAML) into :class:`Params`.

    Raises :class:`ParamsError` whose message starts with ``source`` and names
    the key, the bad value and what is allowed.
    """
    try:
        return Params.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, Params, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (see :func:`parse_params`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file '{path}' does not exist; allowed: a YAML file such as params.yaml "
                          f"(write one with `python -m ntksap.config compose {DEFAULT_EXPERIMENT}`)")
    return parse_params(read_yaml(path), str(path))


def to_dict(params: BaseModel) -> dict:
    """The plain mapping of a :class:`Params` (or any of its sections), every default filled in."""
    return params.model_dump()
