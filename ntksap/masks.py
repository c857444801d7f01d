"""Pruning masks: which weights are prunable, how a mask set is held, applied,
saved, reported and exported to ``torch.nn.utils.prune``.

A mask set (:class:`Masks`) is a ``dict`` from a parameter name (exactly as in
``model.named_parameters()``) to a float tensor of 0s and 1s with the shape of
that parameter. Only the ``weight`` of ``Conv`` and ``Linear`` modules is
prunable; biases and normalisation layers never are.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .files import atomic_torch_save, atomic_write_text

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def _excluded(module_name: str, exclude: Iterable[str]) -> bool:
    return any(module_name == pat or fnmatch.fnmatchcase(module_name, pat) for pat in exclude)


def prunable_modules(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is prunable: every Conv and Linear layer.

    ``exclude`` holds module names or ``fnmatch`` patterns (``"fc"``, ``"*.shortcut.*"``).
    """
    exclude = list(exclude)
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES)
        and getattr(m, "weight", None) is not None
        and not _excluded(name, exclude)
    }


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its name in ``model.named_parameters()``: the first
    name of a parameter shared by several modules (tied weights), the only one
    ``named_parameters``, ``state_dict`` loading and ``functional_call`` use."""
    return {id(p): n for n, p in model.named_parameters()}


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Parameter name (as in ``model.named_parameters()``) -> prunable weight.

    A weight shared by several modules (a ``Linear`` tied to an ``Embedding``,
    say) is prunable when any prunable module uses it, and is listed once,
    under its ``named_parameters`` name: one mask that every module using it
    sees. ``exclude`` removes a shared weight only when every prunable module
    that uses it is excluded."""
    names = parameter_names(model)
    out: dict[str, nn.Parameter] = {}
    for m in prunable_modules(model, exclude).values():
        name = names.get(id(m.weight))
        if name is not None and name not in out:
            out[name] = m.weight
    return out


class Masks(dict):
    """A strict mask set: parameter name -> float tensor holding only 0 and 1.

    Behaves as a plain ``dict`` (it is one), and refuses anything that is not a
    0/1 tensor on assignment.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        for name, mask in (masks or {}).items():
            self[name] = mask

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if not isinstance(name, str):
            raise TypeError(f"mask names must be str, got {type(name).__name__}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask '{name}' must be a torch.Tensor, got {type(mask).__name__}")
        mask = mask.detach().to(torch.float32)
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError(f"mask '{name}' must hold only 0 and 1")
        super().__setitem__(name, mask)

    def update(self, *args, **kwargs) -> None:  # route through __setitem__
        for name, mask in dict(*args, **kwargs).items():
            self[name] = mask

    @classmethod
    def ones_like(cls, model: nn.Module, exclude: Iterable[str] = ()) -> "Masks":
        """All-ones masks for every prunable weight of ``model``."""
        return cls({n: torch.ones_like(p, dtype=torch.float32) for n, p in prunable_parameters(model, exclude).items()})

    # -- counts -----------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self.values())

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum().item()) for m in self.values()))

    @property
    def density(self) -> float:
        return self.kept / max(self.numel, 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def to(self, device: torch.device | str) -> "Masks":
        return Masks({n: m.to(device) for n, m in self.items()})

    # -- files ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the masks atomically (temporary file, then rename) as a plain
        ``dict`` of CPU tensors that ``torch.load(path, weights_only=True)`` reads,
        plus a small JSON summary beside it (``<path>.json``, advisory: it is
        written second). Temporaries left by an earlier interrupted save are removed."""
        path = Path(path)
        if path.parent.is_dir():
            for stale in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.json.*.tmp")]:
                stale.unlink(missing_ok=True)
        atomic_torch_save({n: m.cpu() for n, m in self.items()}, path)
        summary = {"kept": self.kept, "numel": self.numel, "density": self.density,
                   "layers": {n: {"kept": int(m.sum()), "numel": m.numel()} for n, m in self.items()}}
        atomic_write_text(json.dumps(summary, indent=1), path.with_name(path.name + ".json"))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Masks":
        """Read masks written by :meth:`save` (or any ``dict`` of 0/1 tensors)."""
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # truncated, corrupt or unsafe file
            raise ValueError(f"cannot read masks from '{path}': {exc}") from exc
        if not isinstance(data, Mapping):
            raise ValueError(f"'{path}' holds a {type(data).__name__}, not a dict of masks")
        return cls(data)

    def report(self, model: nn.Module | None = None, input_shape: tuple[int, ...] | None = None) -> pd.DataFrame:
        """Per-layer table (name, shape, numel, kept, density) with a final
        ``total`` row. With ``model`` and ``input_shape`` (C, H, W), adds the
        multiply-accumulates of one forward pass of one input through each
        layer, dense (``flops_dense``) and remaining (``flops``)."""
        rows = [{"name": n, "shape": tuple(m.shape), "numel": m.numel(), "kept": int(m.sum().item())}
                for n, m in self.items()]
        df = pd.DataFrame(rows, columns=["name", "shape", "numel", "kept"])
        if model is not None and input_shape is not None:
            fl = layer_flops(model, input_shape, self)
            df["flops_dense"] = df["name"].map(lambda n: fl.get(n, (0, 0))[0])
            df["flops"] = df["name"].map(lambda n: fl.get(n, (0, 0))[1])
        total = {"name": "total", "shape": None, "numel": df["numel"].sum(), "kept": df["kept"].sum()}
        for col in ("flops_dense", "flops"):
            if col in df:
                total[col] = df[col].sum()
        df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
        df["density"] = df["kept"] / df["numel"].clip(lower=1)
        return df


# -- applying masks to a model ---------------------------------------------------
class MaskHandle:
    """Returned by :func:`apply_masks`; ``remove()`` detaches the gradient hooks."""

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Parameters of ``model`` named in ``masks``; raises ``ValueError`` on a
    missing name or a shape mismatch."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"masks: '{name}' is not a parameter of the model")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"masks: '{name}' has shape {tuple(mask.shape)}, "
                             f"the parameter has {tuple(params[name].shape)}")
    return {n: params[n] for n in masks}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], hooks: bool = True) -> MaskHandle:
    """Zero the pruned weights of ``model`` in place and (``hooks=True``) mask
    their gradients, so plain SGD/Adam keep them exactly zero.

    For optimizers whose update is not zero for a zero gradient, also call
    :func:`enforce_masks_after_step`.
    """
    handles = []
    for name, p in check_masks(model, masks).items():
        m = masks[name].to(device=p.device, dtype=p.dtype)
        p.mul_(m)
        if hooks:
            handles.append(p.register_hook(lambda g, m=m: g * m))
    return MaskHandle(handles)


def enforce_masks_after_step(optimizer: torch.optim.Optimizer, model: nn.Module,
                             masks: Mapping[str, torch.Tensor]):
    """Re-zero pruned weights after every ``optimizer.step()`` (a step post hook).
    Returns the hook handle."""
    pairs = [(p, masks[n].to(device=p.device, dtype=p.dtype)) for n, p in check_masks(model, masks).items()]

    def _hook(opt, args, kwargs):
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)

    return optimizer.register_step_post_hook(_hook)


# -- torch.nn.utils.prune interoperation ------------------------------------------
def to_torch_prune(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Put ``model`` in ``torch.nn.utils.prune`` form in place: each masked
    ``weight`` becomes ``weight_orig`` (parameter) and ``weight_mask`` (buffer),
    in every module that uses it (a tied weight stays one parameter)."""
    from torch.nn.utils import prune

    params = check_masks(model, masks)
    for name, mask in masks.items():
        for module in model.modules():
            for attr, p in list(module._parameters.items()):
                if p is params[name]:
                    prune.custom_from_mask(module, attr, mask.to(p.device))
    return model


def from_torch_prune(model: nn.Module, remove: bool = True) -> Masks:
    """Read the ``*_mask`` buffers of a model pruned with ``torch.nn.utils.prune``;
    with ``remove=True`` make the pruning permanent (plain ``weight`` again).
    A tied weight gives one mask, under its ``named_parameters`` name."""
    from torch.nn.utils import prune

    names = parameter_names(model)
    masks = Masks()
    for module in model.modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            orig = module._parameters.get(buf_name[:-5] + "_orig") if buf_name.endswith("_mask") else None
            if orig is None:
                continue
            name = names[id(orig)][:-len("_orig")]
            if name not in masks:
                masks[name] = buf.detach().clone()
            if remove:
                prune.remove(module, buf_name[:-5])
    return masks


# -- FLOPs -----------------------------------------------------------------------
@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...],
                masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[int, int]]:
    """Multiply-accumulates of one forward pass of a single input of shape
    ``input_shape`` (C, H, W) through each Conv/Linear layer:
    parameter name -> (dense, remaining under ``masks``).

    Each weight is used (output elements x fan-in / weights) times: a conv's
    once per output position, a linear layer's once per input row, a stacked
    engine's K-member layers (:mod:`ntksap.stacked`) once per row of its own
    member, so an engine costs its members' sum. Embedding lookups,
    normalisation, activations and pooling are not counted.
    """
    masks = masks or {}
    out: dict[str, tuple[int, int]] = {}
    handles = []
    names = parameter_names(model)
    for module in prunable_modules(model).values():
        pname = names[id(module.weight)]

        def hook(mod, inp, outp, pname=pname):
            w = mod.weight
            kept = int(masks[pname].sum().item()) if pname in masks else w.numel()
            if isinstance(mod, nn.Linear):
                fan_in = w.shape[-1]
            elif w.dim() >= 3:  # conv: (in / groups) x kernel
                fan_in = w[0].numel()
            else:  # an embedding: lookups, no multiply-accumulates
                fan_in = 0
            uses = outp.numel() * fan_in // w.numel()                  # per weight
            prev = out.get(pname, (0, 0))
            out[pname] = (prev[0] + uses * w.numel(), prev[1] + uses * kept)

        handles.append(module.register_forward_hook(hook))
    from .functional import scoring_mode

    try:
        with scoring_mode(model, "eval"):
            p = next(model.parameters())
            model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    return out
