"""The empirical neural tangent kernel (NTK) of a masked network: the full
matrix, its spectrum, the cheap trace estimate that NTK-SAP's score is built
on, and a pruning callback that records how the spectrum moves (PAPER.md
sections 1-2 and Figure 2).

For ``n`` inputs and a network with ``k`` outputs, the fixed-weight NTK is

    Theta = J J^T,   J = d vec f(x; theta * m) / d theta      ((n*k) x P)

with row/column index ``i*k + c`` (input ``i``, output unit ``c``) and ``P``
the parameters in scope. Masked weights are zero in the forward pass and their
Jacobian columns are zero, so they contribute nothing. ``tr(Theta) =
||J||_F^2`` is what NTK-SAP estimates with random finite differences
(:func:`ntk_trace_estimate`).

BatchNorm while computing the NTK (``bn=``):

* ``"eval"`` (default, as the authors' spectrum plots): the batch statistics
  of ``inputs`` under the masked network (mean and *unbiased* variance, set by
  one no-grad train-mode pass with momentum 1) are then held fixed, eval mode.
  Each sample's output depends on that sample only, so J is per-sample.
* ``"running"``: eval mode with the model's own running statistics (a trained
  network as it is evaluated).
* ``"train"``: true train-mode BatchNorm; the statistics are recomputed from
  the batch inside the function, so every output depends on every input and J
  is the Jacobian of the batched function (samples are coupled). Costs one
  full-batch backward pass per output row and holds J in memory.

Other layers always run in eval mode (dropout off). The user's model is never
changed: the network runs through ``torch.func.functional_call`` on copies of
its tensors (:mod:`ntksap.functional`, shared with the score functions); modes,
BatchNorm momenta and hooks are set only for the duration of a call and
restored in ``finally``.

How ``"eval"``/``"running"`` are computed fast (ResNet-20, n=100, k=10: see
``benchmarks/ntk_speed.py``): one forward pass per chunk of inputs with a zero
"tap" added to the output of every leaf module that owns parameters, then one
backward pass with respect to the taps, batched over the ``k`` output units
(``torch.autograd.grad(..., is_grads_batched=True)``), gives the gradient at
each tap for every (input, unit) pair (the inputs
are independent, so the gradient of the sum over inputs separates them); each
module's per-sample Jacobian follows from its input
and that gradient (unfold + batched matmul for Conv2d, closed forms for Linear
and BatchNorm, ``torch.func.vmap(vjp)`` of the module for anything else), and
Theta is accumulated block by block, ``Theta = sum_b J_b J_b^T`` (float32
products, float64 sum), using only the unmasked columns. For each layer either
J_b or the (smaller) tap gradient is kept, so the whole J is never held.
Parameters outside such modules (modules called twice, weights shared between
modules, parameters of non-leaf modules) go through ``torch.func.vmap(jacrev)``
of the whole per-sample network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .checks import check_choice, check_int, check_positive
from .files import atomic_write_text
from .functional import bn_batch_statistics, borrowed, call, masked_params, model_tensors, set_modes
from .masks import Masks, check_masks, prunable_parameters

BN_MODES = ("eval", "train", "running")
PARAM_SCOPES = ("all", "prunable")
RECORDER_MODES = ("spectrum", "trace")

# transient memory of one chunk of inputs (tap gradients, inputs, activations)
_CHUNK_BUDGET_BYTES = 512 * 2**20
# pool narrow Jacobian blocks up to this many columns before a Gram product
_GRAM_MIN_COLS = 8192


# -- argument checks ---------------------------------------------------------------------
def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError(f"model: {type(model).__name__} has no parameters")
    return model


def _check_inputs(model: nn.Module, inputs, bn: str, name: str = "inputs") -> Tensor:
    if not isinstance(inputs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (n, *input_shape), got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(f"{name} has shape {tuple(inputs.shape)}; it must be (n, *input_shape) with n >= 1")
    if bn == "train" and inputs.shape[0] < 2:
        raise ValueError(f"{name} holds {inputs.shape[0]} input; bn='train' needs n >= 2 (batch statistics)")
    p = next(model.parameters())
    if inputs.is_floating_point():
        return inputs.detach().to(device=p.device, dtype=p.dtype)
    return inputs.detach().to(device=p.device)


def _check_masks(model: nn.Module, masks) -> dict[str, Tensor]:
    """``masks`` (None, :class:`Masks` or dict name -> 0/1 tensor) on the
    parameters' devices and dtypes."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be None, a Masks or a dict name -> 0/1 tensor, got {type(masks).__name__}")
    try:
        masks = masks if isinstance(masks, Masks) else Masks(masks)
    except TypeError as exc:
        raise ValueError(f"masks: {exc}") from exc
    params = check_masks(model, masks)
    return {n: masks[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}


def _scope(model: nn.Module, params: str) -> list[str]:
    """Names of the parameters whose Jacobian columns make up J."""
    check_choice("params", params, PARAM_SCOPES)
    named = dict(model.named_parameters())
    if params == "all":
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        names = [n for n in prunable_parameters(model) if n in named and named[n].requires_grad]
    if not names:
        raise ValueError(f"params={params!r}: the model has no trainable parameters in this scope")
    return names


def _check_bn_buffers(model: nn.Module, bn: str) -> None:
    if bn == "train":
        return
    for name, mod in model.named_modules():
        if isinstance(mod, _BatchNorm) and (mod.running_mean is None or mod.running_var is None):
            raise ValueError(f"bn={bn!r} needs BatchNorm running-statistic buffers, but '{name}' has "
                             "track_running_stats=False; use bn='train'")


def _check_output(out, n: int) -> None:
    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != n:
        raise ValueError(f"model: the output must be a tensor (n, ...) with one row per input, got "
                         f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))} for n={n}")


def _batched_grads(out: Tensor, wrt: Mapping[str, Tensor], grad_outputs: Tensor, **kw) -> dict[str, Tensor]:
    """name -> the gradients of ``out`` at each ``wrt[name]`` for every row of
    ``grad_outputs`` ((rows, *out.shape): shape (rows, *wrt[name].shape)), in one
    batched backward (``torch.autograd.grad(..., is_grads_batched=True)``; unlike
    ``torch.func.vjp`` it does not import ``torch._dynamo``, 1.4 s of every
    process). Zero where ``out`` does not depend on ``wrt[name]``."""
    grads = torch.autograd.grad(out, list(wrt.values()), grad_outputs, is_grads_batched=True, allow_unused=True,
                                **kw)
    rows = grad_outputs.shape[0]
    return {n: g if g is not None else t.new_zeros((rows, *t.shape)) for (n, t), g in zip(wrt.items(), grads)}


def _prepare(model, inputs, masks, bn, params):
    """Checks (cheap, before any work) and the tensors every computation needs."""
    _check_model(model)
    check_choice("bn", bn, BN_MODES)
    scope = _scope(model, params)
    x = _check_inputs(model, inputs, bn)
    masks = _check_masks(model, masks)
    _check_bn_buffers(model, bn)
    params, buffers = model_tensors(model)
    return x, masks, scope, masked_params(params, masks), buffers


# -- per-module, per-sample Jacobians from a module's input and output gradient ----------------
def _sum_trailing(t: Tensor, start: int) -> Tensor:
    return t.sum(dim=tuple(range(start, t.dim()))) if t.dim() > start else t


def _unfold(a: Tensor, mod: nn.Conv2d) -> Tensor:
    """``F.unfold`` of a conv's input, (s, Cin*kh*kw, positions), as one strided copy
    (ATen's im2col runs one parallel region per sample and stalls on a busy CPU)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    s, c, h, w = a.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    n0, c0, h0, w0 = a.stride()
    windows = a.as_strided((s, c, kh, kw, ho, wo), (n0, c0, h0 * dh, w0 * dw, h0 * sh, w0 * sw))
    return windows.reshape(s, c * kh * kw, ho * wo)


def _jac_conv2d(mod: nn.Conv2d, attrs, a: Tensor, g: Tensor, local) -> dict[str, Tensor]:
    """Conv2d: J_w[i, c] = G_ic @ unfold(a_i)^T, J_b[i, c] = sum over positions of G_ic."""
    s, k, cout = g.shape[0], g.shape[1], g.shape[2]
    out = {}
    if "weight" in attrs:
        u = _unfold(a, mod)
        out["weight"] = torch.bmm(g.reshape(s, k * cout, -1), u.transpose(1, 2)).reshape(s, k, *mod.weight.shape)
    if "bias" in attrs:
        out["bias"] = _sum_trailing(g, 3)
    return out


def _jac_linear(mod: nn.Linear, attrs, a: Tensor, g: Tensor, local) -> dict[str, Tensor]:
    """Linear: J_W[i, c] = sum over leading positions of g_ic a_i^T, J_b = sum of g_ic."""
    s, k = g.shape[:2]
    g3 = g.reshape(s, k, -1, g.shape[-1])
    out = {}
    if "weight" in attrs:
        out["weight"] = torch.einsum("skpo,spi->skoi", g3, a.reshape(s, -1, a.shape[-1]))
    if "bias" in attrs:
        out["bias"] = g3.sum(2)
    return out


def _jac_batchnorm(mod: _BatchNorm, attrs, a: Tensor, g: Tensor, local) -> dict[str, Tensor]:
    """Eval-mode BatchNorm y = x_hat * w + b: J_w = sum_positions g * x_hat, J_b = sum_positions g."""
    s, k, ch = g.shape[0], g.shape[1], g.shape[2]
    g4 = g.reshape(s, k, ch, -1)
    out = {}
    if "weight" in attrs:
        xhat = (a.reshape(s, ch, -1) - local["running_mean"].view(1, ch, 1)) \
            * torch.rsqrt(local["running_var"].view(1, ch, 1) + mod.eps)
        out["weight"] = torch.einsum("skcp,scp->skc", g4, xhat)
    if "bias" in attrs:
        out["bias"] = g4.sum(3)
    return out


def _jac_generic(mod: nn.Module, attrs, a: Tensor, g: Tensor, local) -> dict[str, Tensor]:
    """Any per-sample module: ``vmap`` over inputs of ``vmap`` over output units of
    the module's ``vjp`` with respect to its parameters ``attrs``."""
    wrt = {n: local[n] for n in attrs}
    const = {n: v for n, v in local.items() if n not in wrt}

    def per_sample(ai, gi):
        _, pullback = vjp(lambda p: functional_call(mod, {**const, **p}, (ai.unsqueeze(0),))[0], wrt)
        return vmap(pullback)(gi)[0]

    return vmap(per_sample)(a, g)


def _module_jacobian_fn(mod: nn.Module):
    """The fastest exact per-sample Jacobian rule for ``mod`` (eval mode)."""
    cls = type(mod)
    if (cls.forward is nn.Conv2d.forward and isinstance(mod, nn.Conv2d) and mod.groups == 1
            and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)):
        return _jac_conv2d
    if cls.forward is nn.Linear.forward and isinstance(mod, nn.Linear):
        return _jac_linear
    if isinstance(mod, _BatchNorm) and cls.forward is _BatchNorm.forward and mod.affine:
        return _jac_batchnorm
    return _jac_generic


# -- the per-sample engine (bn = "eval" / "running") ----------------------------------------
@dataclass
class _Block:
    """One leaf module whose parameters in scope get their Jacobian from a tap."""
    name: str                      # module name
    module: nn.Module
    attrs: list[str]               # its parameters in scope (attribute names)
    full: list[str]                # the same as model parameter names
    jac: object                    # per-sample Jacobian rule
    in_shape: tuple = ()
    out_shape: tuple = ()
    keep_taps: bool = False        # store (input, tap gradient) instead of J
    J: Tensor | None = None        # (n, k, cols)
    A: Tensor | None = None        # (n, *in_shape)
    G: Tensor | None = None        # (n, k, *out_shape)


def _kept_index(masks: Mapping[str, Tensor], name: str, device) -> Tensor | None:
    """Flat indices of the unmasked entries of parameter ``name`` (None: all)."""
    if name not in masks:
        return None
    return masks[name].reshape(-1).nonzero().squeeze(1).to(device)


def _compress(jac: Mapping[str, Tensor], names: list[str], index: Mapping[str, Tensor | None]) -> Tensor:
    """Per-parameter Jacobians (s, k, *shape) -> (s, k, kept columns), names in order."""
    parts = []
    for n in names:
        t = jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1)
        parts.append(t if index[n] is None else t.index_select(2, index[n]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


class _PerSampleNTK:
    """Theta for per-sample networks (all BatchNorm in eval mode), see module doc."""

    def __init__(self, model, x, masks, scope, eff, stats, chunk_size, progress):
        self.model, self.x, self.masks, self.eff, self.stats = model, x, masks, eff, stats
        self.scope, self.progress = scope, progress
        self.n = x.shape[0]
        self.dtype = eff[scope[0]].dtype
        self.index = {n: _kept_index(masks, n, x.device) for n in scope}
        self.cols = {n: (eff[n].numel() if self.index[n] is None else int(self.index[n].numel())) for n in scope}
        self.canonical = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        self.active = False
        self.clone_inputs = self.changed = False
        self.inputs: dict[str, tuple[Tensor, int]] = {}
        self.taps: dict[str, Tensor] = {}
        self.blocks, self.fallback, self.k = self._plan()
        self.chunk = chunk_size or self._auto_chunk()

    # which modules get taps ------------------------------------------------------------
    def _plan(self):
        model, scope = self.model, set(self.scope)
        owners: dict[int, int] = {}  # how many (module, attribute) slots hold each parameter
        for _, mod in model.named_modules(remove_duplicate=False):
            for _, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        pname_of = {id(p): n for n, p in model.named_parameters()}
        candidates: dict[str, _Block] = {}
        for mname, mod in model.named_modules():
            if next(mod.children(), None) is not None:
                continue
            attrs, full = [], []
            for attr, p in mod.named_parameters(recurse=False):
                pn = pname_of.get(id(p))
                if pn in scope and owners[id(p)] == 1:
                    attrs.append(attr)
                    full.append(pn)
            if attrs:
                candidates[mname] = _Block(mname, mod, attrs, full, _module_jacobian_fn(mod))
        calls: dict[str, list] = {name: [] for name in candidates}

        batch = min(self.n, 2)  # a probe pass; a module qualifies if its first dimension indexes the inputs

        def probe(mod, args, kwargs, output, name):
            ok = (len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and isinstance(output, Tensor)
                  and args[0].dim() >= 1 and output.dim() >= 1 and args[0].shape[0] == output.shape[0] == batch)
            calls[name].append((ok, tuple(args[0].shape[1:]) if ok else (), tuple(output.shape[1:]) if ok else ()))

        with borrowed(model) as handles, torch.no_grad():
            for name, b in candidates.items():
                handles.append(b.module.register_forward_hook(
                    lambda m, a, kw, o, name=name: probe(m, a, kw, o, name), with_kwargs=True))
            set_modes(model)
            out = call(model, self.eff, self.stats, self.x[:batch])
        _check_output(out, batch)
        k = out[0].numel()
        blocks = []
        for name, b in candidates.items():
            if len(calls[name]) == 1 and calls[name][0][0]:
                b.in_shape, b.out_shape = calls[name][0][1], calls[name][0][2]
                cols = sum(self.cols[n] for n in b.full)
                b.keep_taps = k * math.prod(b.out_shape) + math.prod(b.in_shape) < k * cols
                blocks.append(b)
        covered = {n for b in blocks for n in b.full}
        fallback = [n for n in self.scope if n not in covered]
        return blocks, fallback, k

    def _auto_chunk(self) -> int:
        per = sum((self.k + 4) * math.prod(b.out_shape) + math.prod(b.in_shape) for b in self.blocks)
        per += sum(self.k * self.eff[n].numel() for n in self.fallback)
        per *= torch.finfo(self.dtype).bits // 8
        return max(1, min(self.n, _CHUNK_BUDGET_BYTES // max(per, 1)))

    # the tap hook ---------------------------------------------------------------------------
    def _hook(self, mod, args, output, name):
        """Records the module's input (and its version, or a copy once an in-place op
        has been seen to change one later) and adds the zero tap whose gradient is
        the gradient at the module's output."""
        if not self.active:
            return None
        if output.shape != self.taps[name].shape:
            raise RuntimeError(f"module '{name}' gave an output of shape {tuple(output.shape)} on this chunk, "
                               f"expected {tuple(self.taps[name].shape)}; it is not per-sample")
        a = args[0].detach()
        self.inputs[name] = (a.clone() if self.clone_inputs else a, a._version)
        return output + self.taps[name]

    def _local(self, b: _Block) -> dict[str, Tensor]:
        """The module's own parameters and buffers as used now (attribute -> tensor)."""
        local = {a: self.eff[self.canonical[id(p)]] for a, p in b.module.named_parameters(recurse=False)}
        local.update({a: self.stats[self.canonical[id(t)]] for a, t in b.module.named_buffers(recurse=False)})
        return local

    def _block_jacobian(self, b: _Block, a: Tensor, g: Tensor) -> Tensor:
        return _compress(b.jac(b.module, b.attrs, a, g, self._local(b)), b.attrs,
                         {a_: self.index[f] for a_, f in zip(b.attrs, b.full)})

    def _allocate(self):
        n, k, dev, dt = self.n, self.k, self.x.device, self.dtype
        for b in self.blocks:
            if b.keep_taps:
                b.A = torch.empty((n, *b.in_shape), device=dev, dtype=dt)
                b.G = torch.empty((n, k, *b.out_shape), device=dev, dtype=dt)
            else:
                b.J = torch.empty((n, k, sum(self.cols[f] for f in b.full)), device=dev, dtype=dt)
        self.fallback_J = (torch.empty((n, k, sum(self.cols[f] for f in self.fallback)), device=dev, dtype=dt)
                           if self.fallback else None)

    def _run_chunk(self, lo: int, hi: int) -> None:
        """Jacobian blocks (or tap gradients) of inputs lo..hi-1."""
        xs, k, s = self.x[lo:hi], self.k, hi - lo
        if self.blocks:
            taps = {b.name: torch.zeros((s, *b.out_shape), device=xs.device, dtype=self.dtype, requires_grad=True)
                    for b in self.blocks}

            def f(t):
                self.taps, self.inputs = t, {}
                self.active = True
                try:
                    out = call(self.model, self.eff, self.stats, xs)
                finally:
                    self.active = False
                missing = [b.name for b in self.blocks if b.name not in self.inputs]
                if missing:
                    raise RuntimeError(f"modules {missing} ran in the probe pass but not on this chunk")
                self.changed = any(a._version != v for a, v in self.inputs.values())
                return out.reshape(s, -1), {n: a for n, (a, _) in self.inputs.items()}

            # the chunk's inputs are independent, so the gradient of sum_i f_ic at a tap is
            # the per-sample gradient of each f_ic: one backward, batched over the k output units
            with torch.enable_grad():
                out, inputs = f(taps)
            self.taps, self.inputs = {}, {}
            if self.changed and not self.clone_inputs:  # a module input was changed in place after use:
                self.clone_inputs = True           # redo this chunk with copies of the inputs
                return self._run_chunk(lo, hi)
            eye = torch.eye(k, device=xs.device, dtype=out.dtype)
            grads = _batched_grads(out, taps, eye.unsqueeze(1).expand(k, s, k))  # name -> (k, s, *out_shape)
            del out
            for b in self.blocks:
                a, g = inputs.pop(b.name), grads.pop(b.name).transpose(0, 1)
                if b.keep_taps:
                    b.A[lo:hi], b.G[lo:hi] = a, g
                else:
                    b.J[lo:hi] = self._block_jacobian(b, a, g)
        if self.fallback:
            self.fallback_J[lo:hi] = self._fallback_jacobian(xs)

    def _fallback_jacobian(self, xs: Tensor) -> Tensor:
        """``vmap`` over inputs of ``jacrev`` of the per-sample network, restricted to
        the parameters no tap covers."""
        wrt = {n: self.eff[n] for n in self.fallback}
        const = {n: v for n, v in self.eff.items() if n not in wrt}

        def f(p, xi):
            return call(self.model, {**const, **p}, self.stats, xi.unsqueeze(0)).reshape(-1)

        with torch.enable_grad():
            jac = vmap(jacrev(f), in_dims=(None, 0))(wrt, xs)
        return _compress(jac, self.fallback, self.index)

    def _jacobian_blocks(self):
        """Yields (n*k, cols) Jacobian blocks, freeing each stored block as it goes."""
        nk = self.n * self.k
        if self.fallback_J is not None:
            J, self.fallback_J = self.fallback_J, None
            yield J.reshape(nk, -1)
        for b in self.blocks:
            if b.keep_taps:  # all inputs at once: unfold(A) is no larger than this J
                J = self._block_jacobian(b, b.A, b.G)
                b.A = b.G = None
            else:
                J, b.J = b.J, None
            yield J.reshape(nk, -1)

    def compute(self) -> Tensor:
        model = self.model
        with borrowed(model) as handles:
            set_modes(model)
            for b in self.blocks:
                handles.append(b.module.register_forward_hook(
                    lambda m, a, o, name=b.name: self._hook(m, a, o, name)))
            self._allocate()
            starts = range(0, self.n, self.chunk)
            for lo in tqdm(starts, desc="ntk: jacobian", disable=not self.progress, leave=False):
                self._run_chunk(lo, min(self.n, lo + self.chunk))
            # the tap hooks are inactive from here on (self.active is False)
            return _gram(self._jacobian_blocks(), self.n * self.k, self.x.device, self.progress)


# -- Theta = sum_b J_b J_b^T ------------------------------------------------------------
def _lower_gram_add(theta: Tensor, J: Tensor, depth: int = 3) -> None:
    """Adds J J^T to ``theta`` (float64) on and below the diagonal blocks of a
    recursive halving of the rows: about 56 % of the products of ``J @ J.T``."""
    rows = J.shape[0]
    if depth == 0 or rows < 256:
        theta += J @ J.T
        return
    h = rows // 2
    _lower_gram_add(theta[:h, :h], J[:h], depth - 1)
    _lower_gram_add(theta[h:, h:], J[h:], depth - 1)
    theta[h:, :h] += J[h:] @ J[:h].T


def _gram(blocks, rows: int, device, progress: bool = False) -> Tensor:
    """``sum_b J_b J_b^T`` over the blocks (each (rows, cols_b), products in the
    blocks' dtype, sum in float64), exactly symmetric. Blocks narrower than
    ``_GRAM_MIN_COLS / 8`` are pooled so each product is a reasonably wide GEMM."""
    theta = torch.zeros((rows, rows), device=device, dtype=torch.float64)
    pool, pooled = [], 0
    for J in tqdm(blocks, desc="ntk: gram", disable=not progress, leave=False):
        if J.shape[1] == 0:
            continue
        if J.shape[1] >= _GRAM_MIN_COLS // 8:
            _lower_gram_add(theta, J)
            continue
        pool.append(J)
        pooled += J.shape[1]
        if pooled >= _GRAM_MIN_COLS:
            _lower_gram_add(theta, torch.cat(pool, 1))
            pool, pooled = [], 0
    if pool:
        _lower_gram_add(theta, torch.cat(pool, 1))
    return torch.tril(theta) + torch.tril(theta, -1).T


# -- train-mode BatchNorm: the Jacobian of the batched function -------------------------------
def _train_mode_ntk(model, x, masks, scope, eff, buffers, chunk_size, progress) -> Tensor:
    index = {n: _kept_index(masks, n, x.device) for n in scope}
    wrt = {n: eff[n] for n in scope}
    const = {n: v for n, v in eff.items() if n not in wrt}
    with borrowed(model):
        set_modes(model, "train", update_running_stats=False)

        def f(p):
            out = call(model, {**const, **p}, buffers, x)
            _check_output(out, x.shape[0])
            return out.reshape(-1)

        leaves = {n: v.detach().requires_grad_(True) for n, v in wrt.items()}
        with torch.enable_grad():
            out = f(leaves)
        rows = out.numel()
        eye = torch.eye(rows, device=x.device, dtype=out.dtype)
        chunk = chunk_size or 64
        J = torch.empty((rows, sum(eff[n].numel() if index[n] is None else index[n].numel() for n in scope)),
                        device=x.device, dtype=out.dtype)
        for lo in tqdm(range(0, rows, chunk), desc="ntk: rows", disable=not progress, leave=False):
            hi = min(rows, lo + chunk)
            jac = _batched_grads(out, leaves, eye[lo:hi], retain_graph=True)
            J[lo:hi] = _compress({n: v.unsqueeze(1) for n, v in jac.items()}, scope, index).squeeze(1)
    return _gram(iter([J]), rows, x.device, progress)


# -- public API ------------------------------------------------------------------------------------
def empirical_ntk(model: nn.Module, inputs: Tensor, masks: Mapping[str, Tensor] | None = None,
                  params: str = "all", bn: str = "eval", chunk_size: int | None = None,
                  progress: bool = False) -> Tensor:
    """The fixed-weight NTK ``Theta = J J^T`` of ``model`` with weights
    ``theta * masks`` on ``inputs`` (n, *input_shape): a float64 (n*k, n*k)
    tensor on the model's device, row/column ``i*k + c`` for input ``i`` and
    output unit ``c`` (k = outputs per input).

    ``params``: ``"all"`` trainable parameters (prunable weights, biases,
    BatchNorm affine) or only the ``"prunable"`` Conv/Linear weights.
    ``masks``: :class:`~ntksap.masks.Masks` or dict name -> 0/1 tensor; masked
    weights are zero and contribute nothing. ``bn``: ``"eval"`` (batch
    statistics of ``inputs`` held fixed; per-sample), ``"running"`` (the
    model's running statistics) or ``"train"`` (statistics of the batch inside
    the function; couples samples; slow). ``chunk_size``: inputs per
    forward/backward chunk (``"train"``: output rows per vmapped backward);
    None picks one that keeps the transient memory near 512 MiB.
    The model (weights, buffers, modes, hooks) is unchanged afterwards.
    """
    chunk_size = check_int("chunk_size", chunk_size, 1, allow_none=True)
    x, masks, scope, eff, buffers = _prepare(model, inputs, masks, bn, params)
    if bn == "train":
        return _train_mode_ntk(model, x, masks, scope, eff, buffers, chunk_size, progress)
    stats = bn_batch_statistics(model, eff, buffers, x) if bn == "eval" else buffers
    return _PerSampleNTK(model, x, masks, scope, eff, stats, chunk_size, progress).compute()


def spectrum_summary(theta: Tensor) -> dict:
    """Eigen-decomposition summary of a symmetric NTK matrix ``theta``:
    ``eigenvalues`` (float64, CPU, sorted descending, ``torch.linalg.eigvalsh``),
    ``trace`` (sum of the diagonal), ``max``, ``min`` and ``condition`` =
    max / min (``inf`` when min <= 0, i.e. the kernel is singular to rounding)."""
    if not isinstance(theta, Tensor) or theta.dim() != 2 or theta.shape[0] != theta.shape[1]:
        raise ValueError(f"theta must be a square matrix, got {getattr(theta, 'shape', type(theta).__name__)}")
    t = theta.detach().to(torch.float64)
    eig = torch.linalg.eigvalsh((t + t.T) / 2).flip(0).cpu()
    top, bottom = float(eig[0]), float(eig[-1])
    return {"eigenvalues": eig, "trace": float(t.diagonal().sum()), "max": top, "min": bottom,
            "condition": top / bottom if bottom > 0 else math.inf}


def ntk_spectrum(model: nn.Module, inputs: Tensor, masks: Mapping[str, Tensor] | None = None, **kw) -> dict:
    """Spectrum of :func:`empirical_ntk` (``kw`` are its options): a dict with
    ``eigenvalues`` (float64 CPU tensor, descending), ``trace``, ``max``,
    ``min`` and ``condition`` (see :func:`spectrum_summary`)."""
    return spectrum_summary(empirical_ntk(model, inputs, masks, **kw))


@torch.no_grad()
def ntk_trace_estimate(model: nn.Module, inputs: Tensor, masks: Mapping[str, Tensor] | None = None,
                       epsilon: float = 1e-3, draws: int = 16, seed: int = 0, bn: str = "eval",
                       params: str = "all", batch_size: int | None = None) -> float:
    """Finite-difference estimate of ``tr(Theta) = ||J||_F^2`` without J (the
    quantity NTK-SAP's score differentiates, PAPER.md section 1):

        mean over draws of  || f(x; theta*m) - f(x; (theta + dtheta)*m) ||^2 / epsilon^2

    summed over all inputs and output units, with ``dtheta ~ N(0, epsilon^2 I)``
    on the parameters in scope (``params``). Since
    ``E ||J dtheta||^2 = epsilon^2 tr(J^T J)``, it converges to the exact trace
    as ``draws`` grows (standard error ``sqrt(2/draws) ||Theta||_F``) and
    ``epsilon`` shrinks (bias O(epsilon^2) in expectation; for one fixed set of
    draws the finite-difference error is O(epsilon)). NTK-SAP perturbs only the
    prunable weights: ``params="prunable"``.

    The draws come from a CPU ``torch.Generator`` seeded with ``seed``: for each
    draw, one ``randn`` per parameter in scope in ``named_parameters`` order
    (so results match across devices); the global RNG is untouched. ``bn`` as in
    :func:`empirical_ntk` (``"eval"``: the unperturbed network's batch
    statistics, shared by both passes, as the authors do). ``batch_size``: inputs
    per forward pass for ``"eval"``/``"running"`` (None: all at once).
    """
    epsilon = check_positive("epsilon", epsilon)
    draws = check_int("draws", draws, 1)
    seed = check_int("seed", seed, 0)
    batch_size = check_int("batch_size", batch_size, 1, allow_none=True)
    x, masks, scope, eff, buffers = _prepare(model, inputs, masks, bn, params)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with borrowed(model):
        stats = bn_batch_statistics(model, eff, buffers, x) if bn == "eval" else buffers
        set_modes(model, bn, update_running_stats=False)
        step = x.shape[0] if (batch_size is None or bn == "train") else batch_size

        def forward(p):
            outs = []
            for lo in range(0, x.shape[0], step):
                out = call(model, p, stats, x[lo:lo + step])
                _check_output(out, min(step, x.shape[0] - lo))
                outs.append(out.reshape(-1))
            return torch.cat(outs)

        base = forward(eff)
        theta = {n: p.detach() for n, p in model.named_parameters()}
        total = 0.0
        for _ in range(draws):
            shifted = dict(theta)
            for n in scope:
                p = theta[n]
                shifted[n] = p + torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * epsilon
            diff = (forward(masked_params(shifted, masks)) - base).to(torch.float64)
            total += float(diff.pow(2).sum()) / epsilon**2
    return total / draws


# -- recording the spectrum while pruning -------------------------------------------------------
_NTK_KW = {"params", "bn", "chunk_size", "progress"}
_TRACE_KW = {"params", "bn", "epsilon", "draws", "seed", "batch_size"}


class SpectrumRecorder:
    """A ``ntksap.prune(..., callback=rec)`` callback that records the NTK of the
    current masked network (the model's weights times the current masks) on a
    fixed probe batch every ``every`` iterations.

    ``mode="spectrum"``: the full spectrum (:func:`ntk_spectrum`; ``kw``: params,
    bn, chunk_size, progress). ``mode="trace"``: only the finite-difference
    trace estimate (:func:`ntk_trace_estimate`; ``kw``: params, bn, epsilon,
    draws, seed, batch_size), for models too large for the full matrix. Record
    the dense network with ``rec.record(0)``. Recording never touches the global
    RNG, so pruning gives the same masks with or without the recorder.

    Results: :meth:`frame` (long: iteration, density, index, eigenvalue),
    :meth:`summary` (iteration, density, trace, max, min, condition),
    :attr:`spectra` (iteration -> eigenvalues) and :meth:`save`.
    """

    def __init__(self, model: nn.Module, probe_inputs: Tensor, every: int = 1, mode: str = "spectrum", **kw):
        self.model = _check_model(model)
        self.mode = check_choice("mode", mode, RECORDER_MODES)
        self.every = check_int("every", every, 1)
        allowed = _NTK_KW if mode == "spectrum" else _TRACE_KW
        unknown = sorted(set(kw) - allowed)
        if unknown:
            raise ValueError(f"{unknown[0]}={kw[unknown[0]]!r} is not an option of mode={mode!r}; "
                             f"allowed: {sorted(allowed)}")
        bn = check_choice("bn", kw.get("bn", "eval"), BN_MODES)
        check_choice("params", kw.get("params", "all"), PARAM_SCOPES)
        _check_bn_buffers(model, bn)
        if mode == "spectrum":
            check_int("chunk_size", kw.get("chunk_size"), 1, allow_none=True)
        else:
            check_positive("epsilon", kw.get("epsilon", 1e-3))
            check_int("draws", kw.get("draws", 16), 1)
            check_int("seed", kw.get("seed", 0), 0)
            check_int("batch_size", kw.get("batch_size"), 1, allow_none=True)
        self.probe_inputs = _check_inputs(model, probe_inputs, bn, "probe_inputs")
        self.kw = kw
        self.records: list[dict] = []
        self.spectra: dict[int, Tensor] = {}

    def __call__(self, iteration: int, masks: Mapping[str, Tensor], scores=None) -> None:
        if iteration % self.every == 0:
            self.record(iteration, masks)

    def record(self, iteration: int, masks: Mapping[str, Tensor] | None = None) -> dict:
        """Measure the network with ``masks`` (None: dense) now and store it under
        ``iteration``; returns the summary row."""
        iteration = check_int("iteration", iteration, 0)
        if masks is None:
            density = 1.0
        else:
            m = masks if isinstance(masks, Masks) else Masks(masks)
            density = m.density
        row = {"iteration": iteration, "density": density}
        if self.mode == "spectrum":
            spec = ntk_spectrum(self.model, self.probe_inputs, masks, **self.kw)
            self.spectra[iteration] = spec.pop("eigenvalues")
            row.update(spec)
        else:
            row.update(trace=ntk_trace_estimate(self.model, self.probe_inputs, masks, **self.kw),
                       max=math.nan, min=math.nan, condition=math.nan)
        self.records = [r for r in self.records if r["iteration"] != iteration] + [row]
        return row

    def summary(self) -> pd.DataFrame:
        """One row per recording: iteration, density, trace, max, min, condition."""
        cols = ["iteration", "density", "trace", "max", "min", "condition"]
        return pd.DataFrame(self.records, columns=cols).sort_values("iteration", ignore_index=True)

    def frame(self) -> pd.DataFrame:
        """Long table of the recorded spectra: iteration, density, index
        (0 = largest), eigenvalue; plot with ``ntksap.figures.spectra.plot_spectra(frame, hue="density")``."""
        if self.mode != "spectrum":
            raise ValueError("frame() needs mode='spectrum'; this recorder has mode='trace' (use summary())")
        density = {r["iteration"]: r["density"] for r in self.records}
        parts = [pd.DataFrame({"iteration": it, "density": density[it],
                               "index": range(len(eig)), "eigenvalue": eig.numpy()})
                 for it, eig in sorted(self.spectra.items())]
        if not parts:
            return pd.DataFrame(columns=["iteration", "density", "index", "eigenvalue"])
        return pd.concat(parts, ignore_index=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`summary` as CSV to ``path`` and, in spectrum mode, the long
        :meth:`frame` to ``<path stem>_spectra.csv`` beside it (atomically)."""
        path = Path(path)
        atomic_write_text(self.summary().to_csv(index=False), path)
        if self.mode == "spectrum":
            atomic_write_text(self.frame().to_csv(index=False), path.with_name(f"{path.stem}_spectra.csv"))


def spectra_frame(spectra: Mapping[str, object]) -> pd.DataFrame:
    """Long table (label, index, eigenvalue) from {label: eigenvalues}, where a
    value is a 1-D tensor/array or an :func:`ntk_spectrum` dict; each spectrum is
    sorted descending (index 0 = largest)."""
    if not isinstance(spectra, Mapping) or not spectra:
        raise ValueError("spectra must be a non-empty dict label -> eigenvalues")
    parts = []
    for label, eig in spectra.items():
        if isinstance(eig, Mapping):
            eig = eig.get("eigenvalues")
        eig = torch.as_tensor(eig, dtype=torch.float64).detach().cpu()
        if eig.dim() != 1:
            raise ValueError(f"spectra[{label!r}] must be 1-D eigenvalues, got shape {tuple(eig.shape)}")
        eig = eig.sort(descending=True).values
        parts.append(pd.DataFrame({"label": label, "index": range(len(eig)), "eigenvalue": eig.numpy()}))
    return pd.concat(parts, ignore_index=True)
