"""Train the K same-architecture networks of one learning curve in lock-step as
one "engine" module, and turn the engine back into K member state dicts.

::

    engine = stack(models, kind="grouped")      # or kind="lockstep"
    out = engine(x)                             # x (B, C, H, W) shared -> (B, K, classes)
    masks = engine.stack_tensors(member_masks)  # K dicts, member names -> engine names
    states = engine.member_states()             # K state dicts, member naming and shapes

Two engines, one API:

* :class:`Grouped` is ONE network: every ``Conv2d(cin, cout, groups=g)`` becomes
  ``Conv2d(K*cin, K*cout, groups=K*g)``, every ``BatchNorm1d/2d(C)`` a
  ``BatchNorm(K*C)`` and every ``Linear(i, o)`` a :class:`BatchedLinear` with
  weight (K, o, i). Channels are member-major (member k owns ``[k*C, (k+1)*C)``),
  so element-wise ops, pooling, residual adds and ``flatten(1)`` stay separable.
  Only Conv2d, BatchNorm1d/2d and Linear may hold parameters or buffers; a model
  that mixes channels in its forward (``torch.cat`` on channels, channel shuffle,
  softmax over dim 1, ``view`` with a hard-coded width) is silently wrong here:
  use ``kind="lockstep"`` for those.
* :class:`Lockstep` holds the K given modules (not copies) in a ModuleList and
  runs them one after the other: any model, bit-identical to training them one
  by one.

CPU timing (resnet20, K=3, batch 128, 1 thread, forward+backward, median ms on a loaded 2-core box): NCHW Grouped 2541 / Lockstep 2196 / 3 sequential 2199; channels_last 2096 / 1724 / 1724 -- Grouped ~1.2x slower on CPU (oneDNN grouped conv, BN, ReLU on K-fold tensors), channels_last ~0.8x for all; prefer Lockstep + channels_last on CPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

KINDS = ("grouped", "lockstep")

# parameter-free modules that mix channels, hence members, in a Grouped engine
_MIXING = (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, nn.Unflatten, nn.Softmax,
           nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.LocalResponseNorm, nn.CrossMapLRN2d)


# -- the batched linear layer ------------------------------------------------------
class BatchedLinear(nn.Linear):
    """K independent linear layers: weight (K, out, in), bias (K, out).

    Reads (B, K*in) as (B, K, in), or (B, K, in) as is, and returns (B, K, out).
    A subclass of ``nn.Linear`` so that :func:`ntksap.masks.prunable_modules`
    finds its ``weight`` as prunable.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        if weight.dim() != 3:
            raise ValueError(f"weight has shape {tuple(weight.shape)}; allowed: (K, out, in)")
        k, o, i = weight.shape
        if bias is not None and tuple(bias.shape) != (k, o):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; allowed: {(k, o)} for weight {(k, o, i)}")
        self.k, self.in_features, self.out_features = k, i, o
        self.weight = nn.Parameter(weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias)

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, member by member."""
        with torch.no_grad():
            for k in range(self.k):
                layer = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                  device=self.weight.device, dtype=self.weight.dtype)
                self.weight[k].copy_(layer.weight)
                if self.bias is not None:
                    self.bias[k].copy_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, i = self.k, self.in_features
        if x.dim() == 3 and x.shape[1:] == (k, i):
            h = x
        elif x.dim() == 2 and x.shape[1] == k * i:
            h = x.view(x.shape[0], k, i) if x.is_contiguous() else x.reshape(x.shape[0], k, i)
        else:
            raise ValueError(f"BatchedLinear input has shape {tuple(x.shape)}; allowed: (B, {k * i}) or (B, {k}, {i})")
        # (K, B, in) @ (K, in, out) -> (K, B, out) -> (B, K, out)
        if self.bias is None:
            out = torch.bmm(h.transpose(0, 1), self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), h.transpose(0, 1), self.weight.transpose(1, 2))
        return out.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _StackedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d(K*C) that also reads the (B, K, C) output of a BatchedLinear
    (as (B, K*C)) and returns it in that shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[1] * x.shape[2] == self.num_features and x.shape[1] != self.num_features:
            return super().forward(x.reshape(x.shape[0], -1)).view_as(x)
        return super().forward(x)


# -- shared helpers ------------------------------------------------------------
def _check_models(models) -> list[nn.Module]:
    """The models as a list; raises on an empty list, a non-module or differing architectures."""
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise ValueError(f"models={type(models).__name__} is not allowed; allowed: a list of K >= 1 nn.Module")
    models = list(models)
    if len(models) < 1:
        raise ValueError("models=[] (K=0) is not allowed; allowed: a list of K >= 1 nn.Module")
    for j, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ValueError(f"models[{j}] is a {type(m).__name__}; allowed: nn.Module")

    def signature(m):
        return ([(n, type(mod).__name__) for n, mod in m.named_modules()],
                [(n, tuple(t.shape), t.dtype) for n, t in m.named_parameters()],
                [(n, tuple(t.shape), t.dtype) for n, t in m.named_buffers()])

    ref = signature(models[0])
    for j, m in enumerate(models[1:], 1):
        sig = signature(m)
        for what, a, b in zip(("modules", "parameters", "buffers"), ref, sig):
            if a != b:
                diff = next((x, y) for x, y in zip(a + [None] * len(b), b + [None] * len(a)) if x != y)
                raise ValueError(f"models[{j}] differs in architecture from models[0] in its {what}: "
                                 f"{diff[1]} vs {diff[0]}; all K models must have the same architecture")
    devices = {t.device for m in models for t in [*m.parameters(), *m.buffers()]}
    if len(devices) > 1:
        raise ValueError(f"models are on several devices {sorted(map(str, devices))}; allowed: all on one device")
    return models


def _check_dicts(name: str, dicts, k: int) -> list[Mapping[str, torch.Tensor]]:
    """K mappings with the same keys; raises otherwise."""
    if isinstance(dicts, Mapping) or not isinstance(dicts, Sequence) or len(dicts) != k:
        got = len(dicts) if isinstance(dicts, Sequence) and not isinstance(dicts, Mapping) else type(dicts).__name__
        raise ValueError(f"{name} has {got} entries; allowed: a list of K={k} dicts")
    keys = list(dicts[0])
    for j, d in enumerate(dicts[1:], 1):
        if set(d) != set(keys):
            extra = sorted(set(d) ^ set(keys))[:3]
            raise ValueError(f"{name}[{j}] has other names than {name}[0] (e.g. {extra}); allowed: the same names in all K")
    return list(dicts)


def member_names(engine: "Grouped | Lockstep") -> list[str]:
    """The member parameter names (what :meth:`stack_tensors` takes), in order."""
    return list(engine._member_params)


# -- Grouped -------------------------------------------------------------------
class Grouped(nn.Module):
    """K same-architecture models as ONE network with K-fold channels (see the
    module docstring). Holds copies: the given models are not changed, nor
    updated by training the engine (read them back with :meth:`member_states`).

    ``engine.net`` has the member module tree, so the engine's names are
    ``net.<member name>``; conv/BN tensors are member-major concatenations
    (dim 0), linear ones stacks (K, ...); ``num_batches_tracked`` is shared.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        models = _check_models(models)
        self.k = len(models)
        first = models[0]
        replace: dict[str, nn.Module] = {}
        for name, m in first.named_modules(remove_duplicate=False):
            own = [*m._parameters.values(), *m._buffers.values()]
            if type(m) in (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear):
                replace[name] = m
            elif any(t is not None for t in own):
                raise ValueError(f"module '{name}' of type {type(m).__name__} holds parameters or buffers; "
                                 f"kind='grouped' supports only Conv2d, BatchNorm1d/2d and Linear there; "
                                 f"kind='lockstep' works for any model")
            elif isinstance(m, _MIXING):
                raise ValueError(f"module '{name}' of type {type(m).__name__} mixes channels, so members, "
                                 f"in kind='grouped'; kind='lockstep' works for any model")
        if "" in replace:
            raise ValueError(f"the model itself is a {type(first).__name__}; kind='grouped' needs a model built "
                             f"of such layers; kind='lockstep' works for any model")
        # copy the module tree without copying the layers that are rebuilt stacked
        skeleton = copy.deepcopy(first, memo={id(m): None for m in replace.values()})
        members = [dict(mod.named_modules()) for mod in models]
        self._how: dict[str, str] = {}  # member state name -> "cat" | "stack" | "shared"
        built: dict[int, nn.Module] = {}
        for name, m in replace.items():
            if id(m) not in built:
                built[id(m)] = self._stack_layer(name, [mm[name] for mm in members])
            parent, _, leaf = name.rpartition(".")
            setattr(skeleton.get_submodule(parent) if parent else skeleton, leaf, built[id(m)])
        self.net = skeleton
        self._member_params = [n for n, _ in first.named_parameters()]
        self._member_keys = list(first.state_dict())
        self.train(first.training)
        for name, m in first.named_modules():  # per-module modes (a frozen BN, say) as in member 0
            self.net.get_submodule(name).training = m.training

    def _stack_layer(self, name: str, layers: list[nn.Module]) -> nn.Module:
        """One stacked layer from the K members' layer ``name``; records how each tensor stacks."""
        m, k = layers[0], self.k
        w = m.weight if getattr(m, "weight", None) is not None else m.running_mean
        kw = dict(device="meta", dtype=w.dtype if w is not None else None)
        if type(m) is nn.Linear:
            weight = torch.stack([l.weight.detach() for l in layers])
            bias = None if m.bias is None else torch.stack([l.bias.detach() for l in layers])
            new = BatchedLinear(weight.clone(), None if bias is None else bias.clone())
            self._how.update({f"{name}.weight": "stack", f"{name}.bias": "stack"})
        else:
            if type(m) is nn.Conv2d:
                new = nn.Conv2d(k * m.in_channels, k * m.out_channels, m.kernel_size, stride=m.stride,
                                padding=m.padding, dilation=m.dilation, groups=k * m.groups,
                                bias=m.bias is not None, padding_mode=m.padding_mode, **kw)
            else:
                cls = nn.BatchNorm2d if type(m) is nn.BatchNorm2d else _StackedBatchNorm1d
                new = cls(k * m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                          track_running_stats=m.track_running_stats, **kw)
            for attr, p in m._parameters.items():
                if p is not None:
                    new._parameters[attr] = nn.Parameter(torch.cat([l._parameters[attr].detach() for l in layers]),
                                                         requires_grad=p.requires_grad)
                    self._how[f"{name}.{attr}"] = "cat"
            for attr, b in m._buffers.items():
                if b is None:
                    continue
                if attr == "num_batches_tracked":
                    values = {int(l._buffers[attr]) for l in layers}
                    if len(values) > 1:
                        raise ValueError(f"'{name}.num_batches_tracked' differs among the members "
                                         f"({sorted(values)}); allowed: one value for all K")
                    new._buffers[attr] = b.detach().clone()
                    self._how[f"{name}.{attr}"] = "shared"
                else:
                    new._buffers[attr] = torch.cat([l._buffers[attr].detach() for l in layers])
                    self._how[f"{name}.{attr}"] = "cat"
        new.train(m.training)
        for attr, p in m._parameters.items():
            if p is not None:
                new._parameters[attr].requires_grad_(p.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, ...) shared by all members -> (B, K, outputs)."""
        b, k = x.shape[0], self.k
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # repeat in the channels_last layout: (B, H, W, C) -> (B, H, W, K*C)
            h = x.permute(0, 2, 3, 1)
            xk = h.unsqueeze(3).expand(*h.shape[:3], k, h.shape[3]).reshape(*h.shape[:3], -1).permute(0, 3, 1, 2)
        else:
            xk = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b, k * x.shape[1], *x.shape[2:])
        out = self.net(xk)
        if out.dim() == 3 and out.shape[1] == k:
            return out
        if out.dim() == 2 and out.shape[1] % k == 0:
            return out.reshape(b, k, -1)
        raise ValueError(f"the stacked network returned shape {tuple(out.shape)}; allowed: (B, K={k}, n) or (B, K*n)")

    # -- names and layouts ----------------------------------------------------
    def stack_tensors(self, tensors: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """K dicts {member name -> tensor} -> {engine name -> tensor} in the engine's layout."""
        tensors = _check_dicts("tensors", tensors, self.k)
        out = {}
        for name in tensors[0]:
            how = self._how.get(name)
            if how is None:
                raise ValueError(f"tensors: '{name}' is not a parameter or buffer of the members; "
                                 f"allowed: names as in member.state_dict()")
            ts = [d[name] for d in tensors]
            if how == "shared":
                if any(not torch.equal(t, ts[0]) for t in ts[1:]):
                    raise ValueError(f"tensors: '{name}' differs among the members; allowed: one value for all K")
                out[f"net.{name}"] = ts[0]
            else:
                out[f"net.{name}"] = torch.cat(ts) if how == "cat" else torch.stack(ts)
        return out

    def unstack_tensors(self, tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """{engine name -> tensor} -> K dicts {member name -> tensor} (views, not copies)."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.k)]
        for ename, t in tensors.items():
            name = ename[4:] if ename.startswith("net.") else None
            how = self._how.get(name)
            if how is None:
                raise ValueError(f"tensors: '{ename}' is not a parameter or buffer of the engine")
            parts = [t] * self.k if how == "shared" else (t.chunk(self.k) if how == "cat" else t.unbind(0))
            for d, part in zip(out, parts):
                d[name] = part
        return out

    def member_states(self) -> list[dict[str, torch.Tensor]]:
        """K state dicts: member naming and shapes, detached clones on the engine's device."""
        per = self.unstack_tensors(self.state_dict())
        return [{n: d[n].detach().clone() for n in self._member_keys} for d in per]

    def load_member_states(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`member_states`: the K members' state dicts into the engine (exact, strict)."""
        states = _check_dicts("states", states, self.k)
        if set(states[0]) != set(self._member_keys):
            diff = sorted(set(states[0]) ^ set(self._member_keys))[:3]
            raise ValueError(f"states have other names than the members' state_dict (e.g. {diff})")
        self.load_state_dict(self.stack_tensors(states), strict=True)


# -- Lockstep ------------------------------------------------------------------
class Lockstep(nn.Module):
    """The K given models themselves (not copies) in ``members``, run one after
    the other: names ``members.<k>.<member name>``; works for any model."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        models = _check_models(models)
        self.k = len(models)
        self.members = nn.ModuleList(models)
        self._member_params = [n for n, _ in models[0].named_parameters()]
        self.training = models[0].training  # the members' own modes are left as they are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) shared by all members -> (B, K, outputs)."""
        return torch.stack([m(x) for m in self.members], 1)

    def stack_tensors(self, tensors: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """K dicts {member name -> tensor} -> {"members.<k>.<name>" -> tensor}."""
        tensors = _check_dicts("tensors", tensors, self.k)
        return {f"members.{k}.{n}": t for k, d in enumerate(tensors) for n, t in d.items()}

    def unstack_tensors(self, tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """{"members.<k>.<name>" -> tensor} -> K dicts {name -> tensor}."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.k)]
        for ename, t in tensors.items():
            head, k, name = (ename.split(".", 2) + ["", ""])[:3]
            if head != "members" or not k.isdigit() or int(k) >= self.k or not name:
                raise ValueError(f"tensors: '{ename}' is not an engine name; allowed: 'members.<k>.<name>', k < {self.k}")
            out[int(k)][name] = t
        return out

    def member_states(self) -> list[dict[str, torch.Tensor]]:
        """K state dicts (detached clones)."""
        return [{n: t.detach().clone() for n, t in m.state_dict().items()} for m in self.members]

    def load_member_states(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """The K state dicts into the members (strict)."""
        states = _check_dicts("states", states, self.k)
        for m, sd in zip(self.members, states):
            m.load_state_dict(sd, strict=True)


def stack(models: Sequence[nn.Module], kind: str = "grouped") -> Grouped | Lockstep:
    """K same-architecture models -> one engine (:class:`Grouped` or :class:`Lockstep`)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; allowed: one of {', '.join(map(repr, KINDS))}")
    return Grouped(models) if kind == "grouped" else Lockstep(models)


# -- memory check --------------------------------------------------------------
def _available_cpu_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def fits(models_or_model, k: int, batch_size: int, input_shape: tuple[int, ...],
         device, kind: str = "grouped") -> tuple[bool, str]:
    """Whether K members of this architecture train at once on ``device`` at
    ``batch_size`` with inputs (C, H, W) = ``input_shape``: (ok, a sentence with the numbers).

    CUDA: one member's measured peak for one forward+backward, x K x 1.2, plus
    parameters/gradients/momentum, against the free memory. CPU: an estimate
    (parameters x 4 for weights/grads/momentum/masks, outputs of every leaf
    module x 2 for the backward, x K) against half the available memory.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; allowed: one of {', '.join(map(repr, KINDS))}")
    for name, v in (("k", k), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not allowed; allowed: an integer >= 1")
    model = models_or_model if isinstance(models_or_model, nn.Module) else _check_models(models_or_model)[0]
    device = torch.device(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gib = 2 ** 30
    if device.type == "cuda":
        probe = copy.deepcopy(model).to(device).train()
        x = torch.randn(batch_size, *input_shape, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        probe(x).float().sum().backward()
        torch.cuda.synchronize(device)
        act = torch.cuda.max_memory_allocated(device) - base
        del probe, x
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
        need = k * act * 1.2 + k * param_bytes * 3
        ok = need < free
        return ok, (f"{k} x {kind} members at batch {batch_size} need ~{need / gib:.2f} GiB on {device} "
                    f"({act / gib:.3f} GiB measured per member forward+backward x 1.2, plus "
                    f"{3 * param_bytes / gib:.3f} GiB params/grads/momentum each); {free / gib:.2f} GiB free")
    act_numel = 0

    def hook(mod, inp, out):
        nonlocal act_numel
        if isinstance(out, torch.Tensor):
            act_numel += out.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    modes = {m: m.training for m in model.modules()}
    p = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu",
                              dtype=p.dtype if p is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    act = act_numel * batch_size * 4 * 2
    need = k * (param_bytes * 4 + act)
    avail = _available_cpu_bytes() * 0.5
    return need < avail, (f"{k} x {kind} members at batch {batch_size} need ~{need / gib:.2f} GiB "
                          f"(estimate: {param_bytes * 4 / gib:.3f} GiB params/grads/momentum/masks and "
                          f"{act / gib:.3f} GiB activations each); half the available memory is {avail / gib:.2f} GiB")
