"""The masked functional forward shared by the score functions and the NTK.

A model's tensors, the masked parameters, BatchNorm batch statistics and a
call of the model on given tensors, written once for :mod:`ntksap.scores` and
:mod:`ntksap.ntk`.

The user's model is never changed: the network runs through
``torch.func.functional_call`` on copies of its tensors (:func:`model_tensors`,
:func:`masked_params`, :func:`call`); modes, BatchNorm momenta and hooks are
set only inside :func:`borrowed` (or :func:`scoring_mode`) and restored on exit::

    params, buffers = model_tensors(model)
    stats = bn_batch_statistics(model, masked_params(params, masks), buffers, x)
    with scoring_mode(model, "eval"):
        out = call(model, masked_params(params, masks), stats, x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm


def to_format(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in channels-last memory layout when ``channels_last`` and it is 4-D, else ``t``."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def model_tensors(model: nn.Module, device=None, dtype=None, channels_last: bool = False) -> tuple[dict, dict]:
    """Detached copies of the model's parameters and buffers: (params, buffers),
    each name -> tensor (a tied weight once, under its ``named_parameters`` name),
    on ``device`` (None: where each one is), floating tensors in ``dtype`` (None:
    their own), 4-D ones channels-last when ``channels_last``."""
    def conv(t: Tensor) -> Tensor:
        t = t.detach().to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else None, copy=True)
        return to_format(t, channels_last)

    return ({n: conv(p) for n, p in model.named_parameters()},
            {n: conv(b) for n, b in model.named_buffers()})


def masked_params(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` with every masked weight replaced by ``weight * mask``."""
    out = dict(params)
    for n, m in masks.items():
        out[n] = params[n] * m
    return out


def call(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor):
    """``model(x)`` with the given tensors (keyed by ``named_parameters`` /
    ``named_buffers`` names; any left out keep the model's own) via
    ``functional_call``. Every attribute slot that holds a parameter or buffer is
    passed exactly once: weights tied between modules are replaced in each
    module, and a module registered under two names is swapped (and restored)
    once, which ``tie_weights=True`` gets wrong. A name the model does not have
    is a ``KeyError``."""
    canonical = {id(t): n for n, t in model.named_parameters()}
    canonical.update({id(t): n for n, t in model.named_buffers()})
    tensors = {**params, **buffers}
    unknown = set(tensors) - set(canonical.values())
    if unknown:
        raise KeyError(f"call: the model has no parameter or buffer {sorted(unknown)}")
    slots, seen = {}, set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is None or (id(mod), attr) in seen or canonical.get(id(t)) not in tensors:
                continue
            seen.add((id(mod), attr))
            slots[f"{mname}.{attr}" if mname else attr] = tensors[canonical[id(t)]]
    return functional_call(model, slots, (x,), tie_weights=False)


# -- modes ----------------------------------------------------------------------------
@contextlib.contextmanager
def borrowed(model: nn.Module):
    """Lets a call set modes, BatchNorm momenta/tracking and hooks on ``model``:
    yields a list for hook handles; on exit (also on error) the hooks are
    removed and every module's ``training`` flag, and each BatchNorm's
    ``momentum`` and ``track_running_stats``, are as they were."""
    saved = [(m, m.training, getattr(m, "momentum", None), getattr(m, "track_running_stats", None))
             for m in model.modules()]
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        for m, training, momentum, tracking in saved:
            m.training = training
            if isinstance(m, _BatchNorm):
                m.momentum, m.track_running_stats = momentum, tracking


def set_modes(model: nn.Module, bn: str = "eval", update_running_stats: bool = True) -> None:
    """Every module in eval mode (dropout off) except BatchNorm for ``bn="train"``:
    train mode (batch statistics), which updates the running-statistic buffers it
    is given unless ``update_running_stats=False``. Call inside :func:`borrowed`."""
    for m in model.modules():
        batchnorm = bn == "train" and isinstance(m, _BatchNorm)
        m.training = batchnorm
        if batchnorm and not update_running_stats:
            m.track_running_stats = False


@contextlib.contextmanager
def scoring_mode(model: nn.Module, bn_mode: str = "eval"):
    """Run ``model`` as a method scores: every module in eval mode (dropout off,
    so scores depend on the seed alone) except BatchNorm layers, which are in
    train mode (batch statistics) for ``bn_mode="train"``. Restores every
    module's mode afterwards (:func:`borrowed`), whatever it was."""
    with borrowed(model):
        set_modes(model, "train" if bn_mode == "train" else "eval")
        yield model


def _affine_batchnorm(self: _BatchNorm, x: Tensor) -> Tensor:
    """An eval-mode BatchNorm with running statistics as one per-channel affine
    map, ``x * scale + shift``: the same function as ``F.batch_norm`` to float
    rounding, with a one-multiply backward for ``x`` (no gradient reaches the
    statistics, weight or bias). Anything else runs the module's own forward."""
    if self.training or self.running_mean is None or self.running_var is None:
        return type(self).forward(self, x)
    scale = torch.rsqrt(self.running_var + self.eps)
    shift = -self.running_mean * scale
    if self.weight is not None:
        scale, shift = scale * self.weight, shift * self.weight + self.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@contextlib.contextmanager
def affine_batchnorm(model: nn.Module):
    """Inside, every BatchNorm layer of ``model`` in eval mode normalises as one
    affine map (:func:`_affine_batchnorm`: the same function to float rounding,
    cheaper than ``F.batch_norm`` and its backward on a CPU; NTK-SAP's scoring
    passes). The layers' own ``forward`` is back on exit."""
    import types

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and "forward" not in vars(m)]
    try:
        for m in bns:
            m.forward = types.MethodType(_affine_batchnorm, m)
        yield model
    finally:
        for m in bns:
            vars(m).pop("forward", None)


# -- BatchNorm batch statistics ----------------------------------------------------------
def _statistics_buffers(model: nn.Module, buffers: Mapping[str, Tensor],
                        reset: bool = False) -> tuple[dict[str, Tensor], list]:
    """``buffers`` with each BatchNorm layer's running statistics replaced by
    fresh tensors (copies, or with ``reset`` mean 0, variance 1 and
    ``num_batches_tracked`` 0), and those layers (the ones that have them)."""
    fresh, bns = dict(buffers), []
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(mod, _BatchNorm) and pre + "running_mean" in buffers:
            bns.append(mod)
            mean, var = buffers[pre + "running_mean"], buffers[pre + "running_var"]
            fresh[pre + "running_mean"] = torch.zeros_like(mean) if reset else mean.clone()
            fresh[pre + "running_var"] = torch.ones_like(var) if reset else var.clone()
            if reset and pre + "num_batches_tracked" in buffers:
                fresh[pre + "num_batches_tracked"] = torch.zeros_like(buffers[pre + "num_batches_tracked"])
    return fresh, bns


@torch.no_grad()
def bn_batch_statistics(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                        x: Tensor) -> dict[str, Tensor]:
    """Buffers whose BatchNorm running statistics are the batch statistics of the
    network ``params`` on ``x`` (per channel: mean and *unbiased* variance), set
    by one no-grad pass with only the BatchNorm layers in train mode, momentum 1,
    on fresh copies (PAPER.md section 2). Other buffers, and BatchNorm layers
    without running-statistic buffers, are as given; ``buffers`` itself and the
    model (modes, momenta) are unchanged."""
    fresh, bns = _statistics_buffers(model, buffers, reset=True)
    with borrowed(model):
        set_modes(model, "train")
        for mod in bns:
            mod.momentum, mod.track_running_stats = 1.0, True
        call(model, params, fresh, x)
    return fresh





def channel_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and *unbiased* variance of ``x`` (N, C, ...) over every
    dimension but 1: shape (C,) each, in ``x``'s dtype. Two passes over ``x``
    (the mean, then the squared deviations from it) over a view of its memory
    as it lies (channels-last: rows of C; else the contiguous inner dimension
    first), with no copy: on a CPU 3-5x faster than a train-mode
    ``F.batch_norm`` (which also writes the normalised tensor) and than
    ``torch.var_mean`` over dimensions (0, 2, 3), within float rounding of both."""
    n, c = x.shape[0], x.shape[1]
    count = x.numel() // max(c, 1)
    if count < 2:
        raise ValueError(f"channel_statistics: x of shape {tuple(x.shape)} has {count} value per channel; "
                         f"the unbiased variance needs at least 2")
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)     # a view: (N H W, C), channels innermost
        mean = rows.sum(0) / count
        var = (rows - mean).square_().sum(0) / (count - 1)
        return mean, var
    flat = x.reshape(n, c, -1)                          # a view when contiguous: (N, C, L)
    mean = flat.sum(2).sum(0) / count
    var = (flat - mean.view(1, c, 1)).square_().sum(2).sum(0) / (count - 1)
    return mean, var


@contextlib.contextmanager
def statistics_of_next_call(model: nn.Module, buffers: Mapping[str, Tensor]):
    """Yields ``(stats, calls)``: buffers for :func:`call` whose BatchNorm running
    statistics the next call of ``model`` on them (in eval mode) sets, layer by
    layer, to the batch statistics of that layer's own input (per channel: mean
    and *unbiased* variance over all dimensions but 1, detached), just before
    the layer normalises with them. Later calls normalise with them as they
    are. ``calls``: how often each BatchNorm layer ran in that call (name ->
    count; a layer run twice keeps its last input's statistics). ``buffers``
    and the model are unchanged.

    This folds :func:`bn_batch_statistics`' extra pass into the first forward:
    upstream layers normalise with the unbiased variance here, with the biased
    one in that pass's train mode, a relative difference of order 1/(inputs
    per channel) in the statistics."""
    fresh, bns = _statistics_buffers(model, buffers)
    names = {id(mod): name for name, mod in model.named_modules()}
    calls: dict[str, int] = {}
    recording = [True]

    def record(mod, args):
        if not recording[0]:
            return
        with torch.no_grad():
            mean, var = channel_statistics(args[0].detach())
            mod.running_mean.copy_(mean)
            mod.running_var.copy_(var)
        calls[names[id(mod)]] = calls.get(names[id(mod)], 0) + 1

    def stop(_mod, _args, _out):
        recording[0] = False

    with borrowed(model) as handles:
        handles += [mod.register_forward_pre_hook(record) for mod in bns]
        handles.append(model.register_forward_hook(stop))
        yield fresh, calls
