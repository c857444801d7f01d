"""Score functions: one per pruning method, and the registry :data:`METHODS`.

A score function has the signature ``score(model, masks, ctx) -> dict`` and
returns, for every masked parameter name, a tensor of scores with that
parameter's shape; the pruning loop (:mod:`ntksap.pruning`) multiplies them by
the live mask and keeps the largest. Scoring never modifies the model: it runs
the network with ``torch.func.functional_call`` on copies of its tensors.

To add a method: write ``def my_scores(model, masks, ctx)`` here and add one
line to :data:`METHODS`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Tensor = torch.Tensor
Scores = dict[str, Tensor]


@dataclass
class ScoreContext:
    """Everything a score function may need besides the model and masks.

    ``data`` holds (inputs, targets) batches already on ``device``; ``input_shape``
    is one input's (C, H, W); ``num_samples``/``batch_size`` size the noise set
    of NTK-SAP; ``init_fn(module)`` re-draws a model's weights in place.
    """

    device: torch.device
    input_shape: tuple[int, ...]
    data: list[tuple[Tensor, Tensor]] | None = None
    num_samples: int = 100
    batch_size: int = 256
    rounds: int = 1
    epsilon: float = 0.01
    init_fn: Callable[[nn.Module], None] | None = None
    channels_last: bool = False
    grasp_temperature: float = 200.0
    redraw: bool = True
    noise_inputs: bool = True
    extra: dict = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------
def _to_format(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def model_tensors(model: nn.Module, device, dtype=None, channels_last: bool = False) -> tuple[dict, dict]:
    """Detached copies of the model's parameters and buffers on ``device``:
    (params, buffers), each name -> tensor, as ``functional_call`` takes them."""
    def conv(t: Tensor) -> Tensor:
        t = t.detach().to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else None, copy=True)
        return _to_format(t, channels_last)

    return ({n: conv(p) for n, p in model.named_parameters()},
            {n: conv(b) for n, b in model.named_buffers()})


def masked_params(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` with every masked weight replaced by ``weight * mask``."""
    out = dict(params)
    for n, m in masks.items():
        out[n] = params[n] * m
    return out


def call(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """The model's forward with the given parameter and buffer tensors."""
    return functional_call(model, (dict(params), dict(buffers)), (x,), strict=True)


def _leaf_masks(masks: Mapping[str, Tensor], device, dtype=torch.float32, channels_last=False) -> dict[str, Tensor]:
    return {n: _to_format(m.to(device=device, dtype=dtype), channels_last).clone().requires_grad_(True)
            for n, m in masks.items()}


def _grad_or_zero(t: Tensor) -> Tensor:
    return t.grad.detach().contiguous() if t.grad is not None else torch.zeros_like(t).contiguous()


# -- data-free baselines --------------------------------------------------------------
def random_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """Random: i.i.d. uniform numbers (keeps a uniformly random subset)."""
    return {n: torch.rand(m.shape, device=ctx.device) for n, m in masks.items()}


def magnitude_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """Magnitude: ``|theta|`` at initialisation."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs().to(ctx.device) for n in masks}


# -- data-dependent baselines ----------------------------------------------------------
def _require_data(ctx: ScoreContext, method: str) -> list:
    if not ctx.data:
        raise ValueError(f"data=None: method {method!r} needs real (inputs, targets) batches")
    return ctx.data


def snip_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """SNIP: ``|dL/dm|`` at the current mask, L = cross-entropy summed over the
    prune batches (each batch's mean), BN in eval mode (running statistics), as
    the authors' code prunes. At m = 1 this is ``|theta * dL/dtheta|``.
    Iterative SNIP is this score re-computed on the current masked network."""
    data = _require_data(ctx, "snip")
    params, buffers = model_tensors(model, ctx.device, channels_last=ctx.channels_last)
    m = _leaf_masks(masks, ctx.device, channels_last=ctx.channels_last)
    for x, y in data:
        out = call(model, masked_params(params, m), buffers, _to_format(x, ctx.channels_last))
        F.cross_entropy(out, y).backward()
    return {n: _grad_or_zero(m[n]).abs() for n in masks}


def grasp_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """GraSP: ``theta * (H g)`` with g the gradient of the loss (logits divided by
    the temperature, 200) w.r.t. the prunable weights summed over the prune
    batches, H the Hessian of the loss; the *largest* values are kept.
    BN in eval mode as in the authors' code."""
    data = _require_data(ctx, "grasp")
    T = ctx.grasp_temperature
    params, buffers = model_tensors(model, ctx.device, channels_last=ctx.channels_last)
    names = list(masks)
    theta = {n: params[n] for n in names}
    w = {n: (params[n] * masks[n].to(params[n])).detach().requires_grad_(True) for n in names}

    def loss(x, y):
        return F.cross_entropy(call(model, {**params, **w}, buffers, _to_format(x, ctx.channels_last)) / T, y)

    g = [torch.zeros_like(w[n]) for n in names]
    for x, y in data:  # first gradient, no graph
        for acc, gi in zip(g, torch.autograd.grad(loss(x, y), [w[n] for n in names])):
            acc += gi
    hg = [torch.zeros_like(w[n]) for n in names]
    for x, y in data:  # Hessian-gradient product: d/dw (g . dL/dw)
        grads = torch.autograd.grad(loss(x, y), [w[n] for n in names], create_graph=True)
        z = sum((gi * si).sum() for gi, si in zip(grads, g))
        for acc, h in zip(hg, torch.autograd.grad(z, [w[n] for n in names])):
            acc += h
    return {n: (theta[n] * h).contiguous() for n, h in zip(names, hg)}


# -- SynFlow -------------------------------------------------------------------------
def synflow_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """SynFlow: ``|theta * dR/dtheta|`` = ``|dR/dm|`` with R = sum of the output of
    the network whose parameters and buffers are replaced by their absolute
    values, on an all-ones input, BN in eval mode. Computed in float64 so deep
    nets (VGG-16, ResNet-50) do not overflow."""
    params, buffers = model_tensors(model, ctx.device, dtype=torch.float64)
    params = {n: p.abs() for n, p in params.items()}
    buffers = {n: (b.abs() if b.is_floating_point() else b) for n, b in buffers.items()}
    m = _leaf_masks(masks, ctx.device, dtype=torch.float64)
    x = torch.ones((1, *ctx.input_shape), dtype=torch.float64, device=ctx.device)
    call(model, masked_params(params, m), buffers, x).sum().backward()
    return {n: _grad_or_zero(m[n]).abs() for n in masks}


# -- NTK-SAP ------------------------------------------------------------------------
def bn_batch_statistics(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                        x: Tensor) -> dict[str, Tensor]:
    """Buffers whose BatchNorm running statistics are the batch statistics of
    the network ``params`` on ``x`` (mean and unbiased variance), as one no-grad
    train-mode pass with momentum 1 after a reset sets them (PAPER.md section 2).
    Other buffers are returned unchanged. The model's own modules are untouched
    apart from a temporary momentum of 1."""
    bns = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
           and mod.track_running_stats}
    fresh = dict(buffers)
    for name in bns:
        pre = f"{name}." if name else ""
        fresh[pre + "running_mean"] = torch.zeros_like(buffers[pre + "running_mean"])
        fresh[pre + "running_var"] = torch.ones_like(buffers[pre + "running_var"])
        fresh[pre + "num_batches_tracked"] = torch.zeros_like(buffers[pre + "num_batches_tracked"])
    saved = {name: (mod.momentum, mod.training) for name, mod in bns.items()}
    was_training = model.training
    try:
        model.train()
        for mod in bns.values():
            mod.momentum = 1.0
        with torch.no_grad():
            call(model, params, fresh, x)
    finally:
        model.train(was_training)
        for name, mod in bns.items():
            mod.momentum, training = saved[name]
            mod.train(training)
    return fresh


def ntksap_batch_mask_grad(model: nn.Module, theta: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                           masks: Mapping[str, Tensor], z: Tensor, delta: Mapping[str, Tensor]) -> Scores:
    """Gradient w.r.t. the mask of one noise mini-batch's term of equation 10:

        d/dm  sum_i || f(z_i; theta*m) - f(z_i; (theta + delta)*m) ||^2

    ``theta``: all parameters (re-drawn weights); ``delta``: the perturbation of
    each masked weight (std epsilon); ``z``: (B, C, H, W) noise. BatchNorm uses
    the unperturbed network's batch statistics on ``z`` in both passes (shared,
    no gradient), the networks run in eval mode. Returns name -> gradient.
    """
    m = {n: v.detach().clone().requires_grad_(True) for n, v in masks.items()}
    stats = bn_batch_statistics(model, masked_params(theta, masks), buffers, z)
    perturbed = dict(theta)
    for n, d in delta.items():
        perturbed[n] = theta[n] + d
    was_training = model.training
    model.eval()
    try:
        out_u = call(model, masked_params(theta, m), stats, z)
        out_p = call(model, masked_params(perturbed, m), stats, z)
        (out_u - out_p).pow(2).sum().backward()
    finally:
        model.train(was_training)
    return {n: _grad_or_zero(m[n]) for n in masks}


def redraw_weights(scratch: nn.Module, init_fn: Callable[[nn.Module], None], device,
                   channels_last: bool = False) -> dict[str, Tensor]:
    """Re-draw ``scratch``'s weights in place with ``scratch.apply(init_fn)`` and
    return copies of all its parameters (name -> tensor on ``device``)."""
    with torch.no_grad():
        scratch.apply(init_fn)
    return {n: _to_format(p.detach().to(device, copy=True), channels_last) for n, p in scratch.named_parameters()}


def noise_batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of the noise mini-batches: ``num_samples`` split into chunks of ``batch_size``."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def ntksap_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """NTK-SAP (equation 10, Algorithm 1):

        S(m_j) = | d/dm_j  (1/|D|) sum_i || f(z_i; theta_i*m) - f(z_i; (theta_i + dtheta_i)*m) ||^2 |

    For each of ``rounds`` rounds and each noise mini-batch of the
    ``num_samples`` inputs: re-draw theta with ``init_fn``, draw z ~ N(0, I) and
    dtheta ~ N(0, epsilon^2) on the masked weights, accumulate the mask
    gradient (:func:`ntksap_batch_mask_grad`). Random draws happen in that
    order (weights, noise, perturbations in mask order) from the global torch
    RNG of the scoring device (on a GPU they cost no host time; ResNet-50 needs
    ~90 M normal draws per mini-batch), which :func:`ntksap.prune` seeds. The
    1/|D| factor does not change the ranking and is left out.

    Ablations (PAPER.md section 6): ``ctx.redraw=False`` keeps the model's own
    weights for every batch ("fixed weights"); ``ctx.noise_inputs=False`` uses
    the inputs of ``ctx.data`` instead of noise ("real inputs").
    """
    from .models import kaiming_init

    init_fn = ctx.init_fn or kaiming_init
    scratch = ctx.extra.get("scratch")
    if scratch is None:  # one copy per prune call on the scoring device, re-initialised in place per batch
        scratch = ctx.extra["scratch"] = copy.deepcopy(model).to(ctx.device)
    cl = ctx.channels_last
    _, buffers = model_tensors(model, ctx.device, channels_last=cl)
    live = {n: _to_format(m.to(ctx.device), cl) for n, m in masks.items()}
    total = {n: torch.zeros_like(m) for n, m in live.items()}
    if ctx.noise_inputs:
        sizes = noise_batch_sizes(ctx.num_samples, ctx.batch_size)
    else:
        sizes = [x.shape[0] for x, _ in _require_data(ctx, "ntksap with noise_inputs=False")]
    fixed = None if ctx.redraw else model_tensors(model, ctx.device, channels_last=cl)[0]
    for _ in range(ctx.rounds):
        for i, b in enumerate(sizes):
            theta = redraw_weights(scratch, init_fn, ctx.device, cl) if ctx.redraw else fixed
            if ctx.noise_inputs:
                z = _to_format(torch.randn((b, *ctx.input_shape), device=ctx.device), cl)
            else:
                z = _to_format(ctx.data[i][0], cl)
            delta = {n: ctx.epsilon * torch.randn(theta[n].shape, device=ctx.device) for n in live}
            delta = {n: _to_format(d, cl) for n, d in delta.items()}
            for n, g in ntksap_batch_mask_grad(model, theta, buffers, live, z, delta).items():
                total[n] += g
    return {n: t.abs().contiguous() for n, t in total.items()}


# -- the registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A pruning method: its score function and the paper's defaults."""

    score: Callable[[nn.Module, Mapping[str, Tensor], ScoreContext], Scores]
    iterations: int = 1
    needs_data: bool = False
    description: str = ""
    defaults: dict = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "random": Method(random_scores, 1, False, "uniformly random connections"),
    "magnitude": Method(magnitude_scores, 1, False, "|theta| at initialisation"),
    "snip": Method(snip_scores, 1, True, "|theta * dL/dtheta| on real data (Lee et al. 2019)"),
    "iterative_snip": Method(snip_scores, 100, True, "SNIP re-scored on the masked net, exponential schedule"),
    "grasp": Method(grasp_scores, 1, True, "theta * Hg, largest kept (Wang et al. 2020)"),
    "synflow": Method(synflow_scores, 100, False, "synaptic flow on |theta|, all-ones input (Tanaka et al. 2020)"),
    "ntksap": Method(ntksap_scores, 20, False, "NTK-SAP, eq. 10 (Wang et al. 2023)",
                     {"rounds": 5, "epsilon": 0.01}),
}
