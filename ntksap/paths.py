"""Path copies of a ReLU network: ReLU gates recorded, replayed or removed, and the tensors of PX's two copies.

A ReLU network (Conv/Linear weights, eval-mode BatchNorm, ReLU, pooling, sums)
computes ``f_k(x) = sum_p a_p(x) v_p(theta) x_s[p]`` plus bias terms: ``p``
runs over the paths from an input unit ``s[p]`` to output ``k``, ``v_p`` is the
product of the weights on the path (an eval BatchNorm's per-channel scale
``gamma / sqrt(var + eps)`` is one of them) and ``a_p(x)`` is 1 when every ReLU
on the path is active. PX (:func:`ntksap.scores.px_scores`) runs the network
three ways: as it is, recording each ReLU's gate ``1[input > 0]``
(:func:`relu_gates` ``"record"``); with every ReLU replaced by the recorded
gate (``"replay"``); and with every ReLU removed (``"linear"``). The copies'
tensors come from :func:`path_tensors`.

Nonlinearities other than ReLU have no place in the decomposition:
:func:`check_relu_network` refuses models built with them (modules) before any
work, and :func:`relu_gates` refuses them when they are called as functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

GATE_ACTIONS = ("record", "replay", "linear")
"""What :func:`relu_gates` does with each ReLU call."""

PATH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
"""Modules whose ``weight`` is a path weight (their ``bias``, if any, a bias)."""

_RELUS = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_INPLACE_RELUS = {torch.relu_, Tensor.relu_}
_NOT_RELU = {torch.tanh, Tensor.tanh, torch.sigmoid, Tensor.sigmoid, F.sigmoid, F.tanh, F.gelu, F.silu, F.mish,
             F.hardswish, F.hardsigmoid, F.hardtanh, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus,
             F.softmax, torch.softmax, Tensor.softmax, F.log_softmax, F.glu, F.layer_norm, F.group_norm,
             F.instance_norm, F.scaled_dot_product_attention, torch.exp, Tensor.exp}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class _Gates(TorchFunctionMode):
    def __init__(self, action: str, gates: list[Tensor], method: str):
        super().__init__()
        self.action, self.gates, self.method, self.next = action, gates, method, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            x = args[0]
            inplace = func in _INPLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            if self.action == "record":
                self.gates.append(x.detach() > 0)
                return func(*args, **kwargs)
            if self.action == "linear":
                return x
            if self.next >= len(self.gates):
                raise RuntimeError(f"{self.method}: the forward called ReLU more often than when its gates were "
                                   f"recorded ({len(self.gates)} calls)")
            gate = self.gates[self.next].to(x.dtype)
            self.next += 1
            return x.mul_(gate) if inplace else x * gate
        if func in _NOT_RELU:
            raise ValueError(f"{self.method}: the model calls {_name(func)}, which the path decomposition of a ReLU "
                             "network has no place for; allowed: Conv/Linear layers, eval-mode BatchNorm, ReLU, "
                             "pooling and sums")
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_gates(action: str, gates: list[Tensor], method: str = "px"):
    """Inside, every ReLU call (``F.relu``, ``nn.ReLU``, ``torch.relu`` and
    their in-place forms) of any model is treated by ``action``
    (:data:`GATE_ACTIONS`): ``record`` runs it and appends its gate
    ``input > 0`` (bool, the input's shape) to ``gates``; ``replay``
    multiplies its input by the next gate of ``gates`` instead (calls in the
    recorded order); ``linear`` returns its input. A nonlinearity other than
    ReLU is a ``ValueError`` naming it (and ``method``)."""
    if action not in GATE_ACTIONS:
        raise ValueError(f"action={action!r} is not allowed; allowed: one of {list(GATE_ACTIONS)}")
    with _Gates(action, gates, method):
        yield gates


def check_relu_network(model: nn.Module, method: str = "px") -> None:
    """``ValueError`` unless ``model`` is built from what a path decomposition
    covers: every module holding parameters of its own is a Conv, Linear,
    Embedding or BatchNorm (with running statistics), and no module is a
    nonlinearity other than ReLU (``torch.nn`` activations, LayerNorm,
    GroupNorm, attention). Nonlinearities called as functions are refused
    while scoring (:func:`relu_gates`)."""
    for name, mod in model.named_modules():
        where = f"module '{name}'" if name else "the model"
        if isinstance(mod, _BatchNorm):
            if mod.running_mean is None or mod.running_var is None:
                raise ValueError(f"{method}: {where} ({type(mod).__name__}) has no running statistics "
                                 "(track_running_stats=False); allowed: BatchNorm layers with running statistics")
            continue
        activation = type(mod).__module__ == "torch.nn.modules.activation" and not isinstance(mod, nn.ReLU)
        own = [n for n, p in mod.named_parameters(recurse=False) if p is not None]
        if activation or (own and not isinstance(mod, PATH_MODULES)):
            raise ValueError(f"{method}: {where} is a {type(mod).__name__}, which the path decomposition of a "
                             "ReLU network has no place for; allowed: Conv, Linear, Embedding and BatchNorm "
                             "layers with ReLU, pooling and sums between them")


def path_tensors(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                 weight: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, buffers)`` of a copy of ``model`` whose path weights are
    ``weight``: ``"one"`` (every Conv/Linear/Embedding weight 1, every
    BatchNorm the identity) or ``"square"`` (every weight squared, every
    BatchNorm scaling by its eval-mode scale squared, ``(gamma / sqrt(var +
    eps))^2``). Every bias and BatchNorm shift is 0, so only paths from the
    input remain. A BatchNorm gets mean 0 and a weight (or, without affine
    parameters, a running variance) that gives that scale in eval mode."""
    if weight not in ("one", "square"):
        raise ValueError(f"weight={weight!r} is not allowed; allowed: 'one' or 'square'")
    p, b = dict(params), dict(buffers)
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(mod, PATH_MODULES):
            w = p[pre + "weight"] if pre + "weight" in p else None
            if w is not None:
                p[pre + "weight"] = torch.ones_like(w) if weight == "one" else w * w
            if pre + "bias" in p:
                p[pre + "bias"] = torch.zeros_like(p[pre + "bias"])
        elif isinstance(mod, _BatchNorm) and pre + "running_var" in b:
            var = b[pre + "running_var"]
            root = torch.sqrt(var.to(torch.float64) + mod.eps)
            gamma = p[pre + "weight"].to(torch.float64) if pre + "weight" in p else torch.ones_like(root)
            scale = torch.ones_like(root) if weight == "one" else (gamma / root) ** 2   # the copy's scale
            b[pre + "running_mean"] = torch.zeros_like(b[pre + "running_mean"])
            if pre + "weight" in p:   # weight / sqrt(var + eps) = scale
                p[pre + "weight"] = (scale * root).to(p[pre + "weight"].dtype)
                p[pre + "bias"] = torch.zeros_like(p[pre + "bias"])
            else:                     # no affine parameters: 1 / sqrt(var' + eps) = scale
                b[pre + "running_var"] = (scale.pow(-2) - mod.eps).to(var.dtype)
    return p, b
