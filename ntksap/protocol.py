"""The training protocol: the one model of what ``ntksap.train.train`` runs
(``params.yaml: train``) and the paper's per-dataset protocols, the Hydra group
``ntksap/conf/train/<dataset>.yaml`` (PAPER.md section 5)::

    protocol("cifar10", epochs=3)           # ntksap/conf/train/cifar10.yaml, 3 epochs

It imports no registry (no torch), so the trainer's code (and its resume key,
:func:`ntksap.code_deps.source_digest`) does not depend on the pruning methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from .checks import not_allowed
from .schema import Distinct, NullMeans, ParamsError, Section, format_errors, knob, read_yaml

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""Hydra config directory: ``config.yaml`` (shared defaults) and the groups
``experiment/``, ``train/``, ``runs/``, ``sparsity_grid/``."""

Milestones = Annotated[list[Annotated[int, Field(strict=True, ge=1)]
                             | Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]],
                       Distinct(increasing=True)]
"""Epochs after which the lr drops; a fraction (0.5) falls at the nearest batch
(:func:`ntksap.train.milestone_steps`), so a run shorter than the paper's can keep its schedule."""


class Train(Section):
    """The training protocol (``train``; what ``ntksap.train.train`` runs).
    PAPER.md section 5 gives each dataset's: ``ntksap/conf/train/<dataset>.yaml``
    (:func:`protocol`). The execution-only fields (:attr:`EXECUTION_FIELDS`)
    say how fast it runs, not what it computes: they are not part of the
    checkpoint's fingerprint and may change between a run and its resume."""

    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = ("stack", "channels_last", "amp", "compile", "num_workers",
                                                   "eval_batch_size")

    epochs: int = knob(..., "training epochs (paper: 160 CIFAR, 200 Tiny-ImageNet, 90 ImageNet; 0 = no training, "
                       "evaluate at init)", strict=True, ge=0)
    batch_size: int = knob(..., "training mini-batch (paper: 128 CIFAR, 256 Tiny-ImageNet and ImageNet)",
                           strict=True, ge=1)
    lr: float = knob(..., "initial learning rate (paper: 0.1; 0.2 Tiny-ImageNet)", strict=True, allow_inf_nan=False,
                     gt=0)
    momentum: float = knob(0.9, "SGD momentum (paper: 0.9)", strict=True, allow_inf_nan=False, ge=0, lt=1)
    nesterov: bool = knob(False, "Nesterov momentum (paper: CIFAR-100 only)", strict=True)
    weight_decay: float = knob(..., "weight decay (paper: 1e-4 CIFAR-10 and ImageNet, 5e-4 otherwise)", strict=True,
                               allow_inf_nan=False, ge=0)
    milestones: Milestones = knob(
        [], "epochs after which lr is multiplied by gamma, fractions at the nearest batch (paper: 80,120 / 60,120 / "
        "100,150 / 30,60,80)")
    gamma: float = knob(0.1, "lr factor at each milestone (paper: 0.1)", strict=True, allow_inf_nan=False, gt=0,
                        le=1)
    augment: bool = knob(True, "the dataset's training augmentation (paper: crop + flip; digits: none)", strict=True)
    processes: Literal["auto"] | Annotated[int, Field(strict=True, ge=1)] = knob(
        1, "training processes: more than 1 launches DistributedDataParallel with torchrun, one per GPU (gloo on a "
        "CPU); auto = one per visible GPU (1 without); batch_size is the global batch")
    stack: Literal["auto", "grouped", "lockstep", "off"] = knob(
        "auto", "execution only, as the five below (not in a checkpoint's fingerprint): train the sparsities of "
        "one run and seed at once (ntksap.train.train_stacked): grouped (one network, K-grouped convolutions: one "
        "launch per layer instead of K, pays on a GPU; equal to one by one to float rounding), lockstep (the K in "
        "turn on each batch, one data pipeline: bit-identical to one by one), off (one after another); auto = "
        "grouped on CUDA, lockstep on a CPU, each where the K fit in memory, else off")
    channels_last: Annotated[bool | None, NullMeans("on")] = knob(
        None, "execution only: channels-last memory format; null = on", strict=True)
    amp: Annotated[bool | None, NullMeans("on for CUDA with bf16 support, off on a CPU")] = knob(
        None, "execution only: bf16 autocast; null = on for CUDA with bf16 support, off on a CPU", strict=True)
    compile: Annotated[bool, Field(strict=True)] | Literal["reduce-overhead"] = knob(
        False, "execution only: torch.compile the model (true), or with mode reduce-overhead (its forward and backward "
        "replayed as CUDA graphs; on an H200 2.4x faster epochs for one network, 1.3x for nine stacked masked ones); "
        "pays on long GPU runs, slow to compile on a CPU")
    num_workers: int = knob(8, "execution only: loader processes, at most one per CPU core (ImageNet only)",
                            strict=True, ge=0)
    eval_batch_size: int = knob(500, "execution only: batch size for evaluation", strict=True, ge=1)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> Train:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True is not allowed with momentum=0; allowed: false (Nesterov needs "
                             "momentum > 0)")
        return self

    def experiment(self) -> dict:
        """The fields that define the experiment (the checkpoint fingerprint's
        ``config.*``), as plain values: all but :attr:`EXECUTION_FIELDS` and
        ``processes`` (the trainer records the number that ran, ``world_size``)."""
        return self.model_dump(exclude={*self.EXECUTION_FIELDS, "processes"})


def protocols() -> list[str]:
    """Datasets with a training protocol: the files ``ntksap/conf/train/<dataset>.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "train").glob("*.yaml"))


def protocol(dataset: str, **overrides: Any) -> Train:
    """The paper's training protocol for ``dataset`` (PAPER.md section 5, read
    from ``ntksap/conf/train/<dataset>.yaml``, the Hydra group the experiment
    sets pick), with ``overrides`` (``epochs=3``) applied and validated."""
    names = protocols()
    if dataset not in names:
        raise ParamsError(str(not_allowed("dataset", dataset, "one of " + ", ".join(names)
                                          + " (the files ntksap/conf/train/<dataset>.yaml)", names)))
    path = CONF_DIR / "train" / f"{dataset}.yaml"
    values = {**(read_yaml(path) or {}), **overrides}
    source = f"train protocol {dataset!r}" + (f" with {overrides}" if overrides else "")
    try:
        return Train.model_validate(values)
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, Train, source)) from None
