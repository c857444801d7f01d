"""Score functions: one per pruning method, and the registry :data:`METHODS`.

A score function has the signature ``score(model, masks, ctx) -> dict`` and
returns, for every masked parameter name, a tensor of scores with that
parameter's shape; the pruning loop (:mod:`ntksap.pruning`) multiplies them by
the live mask and keeps the largest. Scoring never modifies the model: it runs
the network on copies of its tensors (:mod:`ntksap.functional`), with
BatchNorm in the mode its :class:`Method` entry declares (``bn_mode``), whatever
mode the caller's model is in, and restores every module's mode afterwards.

To add a method: write ``def my_scores(model, masks, ctx)`` here and add one
line to :data:`METHODS` (its ``bn_mode``: ``train`` or ``eval``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .functional import (affine_batchnorm, bn_batch_statistics, call, masked_params, model_tensors, scoring_mode,
                         statistics_of_next_call, to_format)
from .paths import check_relu_network, path_tensors, relu_gates

Tensor = torch.Tensor
Scores = dict[str, Tensor]


BN_MODES = ("train", "eval", "unperturbed", "unperturbed_two_pass")
"""How BatchNorm normalises while a method scores (``Method.bn_mode``,
``prune(bn_mode=...)``): ``train`` with each forward pass's own batch statistics;
``eval`` with the model's running statistics; ``unperturbed`` (NTK-SAP only) with
the unperturbed network's batch statistics, shared by both passes of eq. 10,
taken in the unperturbed pass itself; ``unperturbed_two_pass`` the same
statistics from a separate no-grad train-mode pass first, as the authors' code
(their masks bit for bit; one forward more per mini-batch)."""

GRASP_HESSIAN = ("auto", "autograd", "finite_difference")
"""How GraSP computes its Hessian-gradient product: ``autograd`` (double
backward), ``finite_difference`` (a central difference of gradients), or
``auto`` (autograd; the finite difference, with a warning, where an operation of
the model has no double backward)."""


class UnusedWeightWarning(UserWarning):
    """A masked weight that no gradient reaches: its module is never used by the forward."""


@dataclass
class ScoreContext:
    """Everything a score function may need besides the model and masks.

    ``data`` is the prune set: a re-iterable of (inputs, targets) batches, kept
    where the caller has it (usually the CPU); iterate it with :meth:`batches`,
    which moves one batch at a time to ``device``, one new pass per call (a
    shuffling, augmenting loader re-draws). ``input_shape`` is one input's shape;
    ``num_samples``/``batch_size`` size the noise set of NTK-SAP;
    ``init_fn(module)`` re-draws a model's weights in place; ``bn_mode`` is one
    of :data:`BN_MODES` (``None``: the method's own).
    """

    device: torch.device
    input_shape: tuple[int, ...]
    data: Iterable | None = None
    num_samples: int = 100
    batch_size: int = 256
    rounds: int = 1
    epsilon: float = 0.01
    init_fn: Callable[[nn.Module], None] | None = None
    channels_last: bool = False
    grasp_temperature: float = 200.0
    grasp_hessian: str = "auto"
    synflow_dtype: torch.dtype = torch.float64
    redraw: bool = True
    noise_inputs: bool = True
    bn_mode: str | None = None
    extra: dict = field(default_factory=dict)

    def batches(self, source: Iterable | None = None, method: str = "this method") -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over ``source`` (default: :attr:`data`), each (inputs, targets)
        batch checked (:func:`check_batch`) and moved to :attr:`device` on its own."""
        source = self.data if source is None else source
        if source is None:
            raise ValueError(f"data=None: method {method!r} needs real (inputs, targets) batches")
        for i, batch in enumerate(source):
            x, y = check_batch(i, batch, self.input_shape)
            yield to_format(x.to(self.device), self.channels_last), y.to(self.device)


def check_batch(i: int, batch, input_shape: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """``batch`` (the ``i``-th of ``data``) as an (inputs, targets) pair of tensors
    whose inputs have shape (B, *input_shape); ``ValueError`` otherwise."""
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
            and isinstance(batch[1], torch.Tensor)):
        raise ValueError(f"data: batch {i} is not an (inputs, targets) pair of tensors")
    x, y = batch[0], batch[1]
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"data: batch {i} has inputs of shape {tuple(x.shape[1:])}, expected {tuple(input_shape)}")
    return x, y


# -- helpers -------------------------------------------------------------------------
def _leaf_masks(masks: Mapping[str, Tensor], like: Mapping[str, Tensor], channels_last=False) -> dict[str, Tensor]:
    """Copies of ``masks`` as leaves that take a gradient, with the device and
    dtype of the weights ``like`` they multiply."""
    return {n: to_format(m.to(like[n]), channels_last).clone().requires_grad_(True) for n, m in masks.items()}


def warn_unused(names: Iterable[str], method: str) -> None:
    """Warn (:class:`UnusedWeightWarning`) that no gradient reaches the masked
    weights ``names``: they would silently score 0 and be pruned first."""
    names = list(names)
    if names:
        warnings.warn(f"{method}: no gradient reaches the masked weight(s) {', '.join(map(repr, names))}: the "
                      "forward pass never uses their module, so they score 0 and are pruned before any used "
                      "weight. Leave them out with exclude=[<module name>] or check the model's forward.",
                      UnusedWeightWarning, stacklevel=3)


def mask_grads(leaves: Mapping[str, Tensor], method: str) -> Scores:
    """The ``.grad`` of each leaf (zeros where none arrived, with a warning)."""
    warn_unused([n for n, t in leaves.items() if t.grad is None], method)
    return {n: t.grad.detach().contiguous() if t.grad is not None else torch.zeros_like(t).contiguous()
            for n, t in leaves.items()}


# -- data-free baselines --------------------------------------------------------------
def random_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """Random: i.i.d. uniform numbers (keeps a uniformly random subset)."""
    return {n: torch.rand(m.shape, device=ctx.device) for n, m in masks.items()}


def magnitude_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """Magnitude: ``|theta|`` at initialisation."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs().to(ctx.device) for n in masks}


def erk_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """Random with Erdos-Renyi-Kernel layer-wise densities (Evci et al. 2020,
    RigL; Mocanu et al. 2018 without the kernel): layer l keeps
    ``min(1, eps * s_l)`` of its weights, ``s_l = sum(shape) / prod(shape)``
    of its weight (``(c_out + c_in + k_h + k_w) / (c_out c_in k_h k_w)`` for a
    convolution), eps set by the total density, layers that would exceed 1
    dense. Score of weight i of layer l: ``s_l n_l / (r_i + u_i)``, ``r`` a
    random permutation of 0..n_l-1 and ``u ~ U(0, 1)``: a global threshold t
    keeps the weights with ``r_i + u_i < n_l s_l / t``, within one weight of
    ``n_l min(1, s_l / t)`` per layer, a uniformly random subset of each layer,
    at any density."""
    out = {}
    for n, m in masks.items():
        numel = m.numel()
        s = sum(m.shape) / numel
        rank = torch.randperm(numel, device=ctx.device, dtype=torch.float64).reshape(m.shape)
        out[n] = s * numel / (rank + torch.rand(m.shape, device=ctx.device, dtype=torch.float64))
    return out


# -- data-dependent baselines ----------------------------------------------------------
def snip_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """SNIP: ``|dL/dm|`` at the current mask, L = cross-entropy summed over one
    pass of the prune batches (each batch's mean). At m = 1 this is
    ``|theta * dL/dtheta|``; iterative SNIP is this score re-computed on the
    current masked network, one new pass of ``ctx.data`` per iteration.
    BatchNorm as the model's modules are set (:data:`METHODS` runs it in train
    mode, batch statistics, as the authors' code prunes)."""
    params, buffers = model_tensors(model, ctx.device, channels_last=ctx.channels_last)
    m = _leaf_masks(masks, params, ctx.channels_last)
    for x, y in ctx.batches(method="snip"):
        F.cross_entropy(call(model, masked_params(params, m), buffers, x), y).backward()
    return {n: g.abs() for n, g in mask_grads(m, "snip").items()}


def _is_missing_double_backward(exc: RuntimeError) -> bool:
    text = str(exc)
    return "derivative for" in text or "double backward" in text or "not implemented" in text


def grasp_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """GraSP: ``theta * (H g)`` with g the gradient of the loss (logits divided by
    the temperature, 200) w.r.t. the prunable weights summed over one pass of
    the prune batches, H the Hessian of the loss on the same batches; the
    *largest* values are kept. BatchNorm as the model's modules are set
    (:data:`METHODS`: train mode, as the authors' code prunes).

    ``ctx.grasp_hessian`` (:data:`GRASP_HESSIAN`) picks how ``H g`` is formed:
    double backward (attention runs its math kernel, which has one), or the
    central difference ``(grad L(w + h g) - grad L(w - h g)) / 2h`` in float64
    with ``h ||g|| = eps^(1/3) ||w||`` (relative error ~1e-8 against autograd).
    """
    T = ctx.grasp_temperature
    params, buffers = model_tensors(model, ctx.device, channels_last=ctx.channels_last)
    names = list(masks)
    theta = {n: params[n] for n in names}
    w0 = {n: (params[n] * masks[n].to(params[n])).detach() for n in names}

    def loss(w, x, y, p=params, b=buffers):
        return F.cross_entropy(call(model, {**p, **w}, b, x) / T, y)

    def gradient(w, batches, p=params, b=buffers):
        """Sum over ``batches`` of dL/dw at ``w`` (no graph kept, inputs in ``w``'s
        dtype); which weights got none."""
        w = {n: v.detach().requires_grad_(True) for n, v in w.items()}
        dtype = next(iter(w.values())).dtype
        total, unused = [torch.zeros_like(w[n]) for n in names], set()
        for x, y in batches:
            gs = torch.autograd.grad(loss(w, x.to(dtype), y, p, b), [w[n] for n in names], allow_unused=True)
            for n, acc, gi in zip(names, total, gs):
                if gi is None:
                    unused.add(n)
                else:
                    acc += gi
        return total, unused

    reuse = isinstance(ctx.data, (list, tuple))  # a loader would re-draw: keep this pass's batches (host)
    held: list = []

    def first_pass():
        for x, y in ctx.batches(method="grasp"):
            if not reuse:
                held.append((x.cpu(), y.cpu()))
            yield x, y

    g, unused = gradient(w0, first_pass())  # first gradient, no graph
    warn_unused([n for n in names if n in unused], "grasp")

    def second_pass():
        return ctx.batches(None if reuse else held, method="grasp")

    def hg_autograd():  # d/dw (g . dL/dw), double backward
        w = {n: v.clone().requires_grad_(True) for n, v in w0.items()}
        hg = [torch.zeros_like(w[n]) for n in names]
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU/GPU attention kernels lack double backward
            for x, y in second_pass():
                grads = torch.autograd.grad(loss(w, x, y), [w[n] for n in names], create_graph=True,
                                            allow_unused=True)
                z = sum((gi * si).sum() for gi, si in zip(grads, g) if gi is not None)
                for acc, h in zip(hg, torch.autograd.grad(z, [w[n] for n in names], allow_unused=True)):
                    if h is not None:
                        acc += h
        return hg

    def hg_central_difference():  # in float64: grad of L / 200 moves ~1e-5 relative, below float32's noise
        p64, b64 = model_tensors(model, ctx.device, dtype=torch.float64, channels_last=ctx.channels_last)
        w64 = {n: v.double() for n, v in w0.items()}
        g64 = [v.double() for v in g]
        g_norm = torch.sqrt(sum((v ** 2).sum() for v in g64))
        if g_norm == 0:
            return [torch.zeros_like(v) for v in g]
        w_norm = torch.sqrt(sum((v ** 2).sum() for v in w64.values()))
        h = float(torch.finfo(torch.float64).eps ** (1 / 3) * w_norm / g_norm)
        plus, _ = gradient({n: w64[n] + h * gi for n, gi in zip(names, g64)}, second_pass(), p64, b64)
        minus, _ = gradient({n: w64[n] - h * gi for n, gi in zip(names, g64)}, second_pass(), p64, b64)
        return [((a - b) / (2 * h)).to(gi.dtype) for a, b, gi in zip(plus, minus, g)]

    if ctx.grasp_hessian == "finite_difference":
        hg = hg_central_difference()
    else:
        try:
            hg = hg_autograd()
        except RuntimeError as exc:
            if not _is_missing_double_backward(exc):
                raise
            if ctx.grasp_hessian == "autograd":
                raise ValueError(f"grasp_hessian='autograd': an operation of the model has no double backward "
                                 f"({exc}); use grasp_hessian='finite_difference' (or 'auto') to form the "
                                 "Hessian-gradient product from a central difference of gradients") from exc
            warnings.warn(f"grasp: an operation of the model has no double backward ({str(exc).splitlines()[0]}); "
                          "using a central difference of gradients for H g (grasp_hessian='finite_difference')",
                          RuntimeWarning, stacklevel=3)
            hg = hg_central_difference()
    return {n: (theta[n] * h).contiguous() for n, h in zip(names, hg)}


# -- SynFlow and SynFlow-L2 ---------------------------------------------------------------
def _synaptic_flow(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext, power: int,
                   method: str) -> Scores:
    """``|dR/dm|``, R = sum of the output, on an all-ones input, of the network
    whose parameters and floating buffers are replaced by ``|t|**power``
    (masked weights ``|theta|**power * m``), in ``ctx.synflow_dtype``."""
    dtype = ctx.synflow_dtype
    params, buffers = model_tensors(model, ctx.device, dtype=dtype)
    params = {n: p.abs() ** power for n, p in params.items()}
    buffers = {n: (b.abs() ** power if b.is_floating_point() else b) for n, b in buffers.items()}
    m = _leaf_masks(masks, params)
    x = torch.ones((1, *ctx.input_shape), dtype=dtype, device=ctx.device)
    call(model, masked_params(params, m), buffers, x).sum().backward()
    return {n: g.abs() for n, g in mask_grads(m, method).items()}


def synflow_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """SynFlow: ``|theta * dR/dtheta|`` = ``|dR/dm|`` with R = sum of the output of
    the network whose parameters and buffers are replaced by their absolute
    values, on an all-ones input. :data:`METHODS` runs it with BatchNorm in eval
    mode (the running statistics, made absolute: 0 and 1 at initialisation), as
    the authors do; in train mode its single input would be normalised by its
    own statistics. Computed in ``ctx.synflow_dtype``: float64 by default, so
    deep nets (VGG-16, ResNet-50) do not overflow; float32 is the authors'
    (with their count rule, their ResNet-20 masks come out bit for bit)."""
    return _synaptic_flow(model, masks, ctx, 1, "synflow")


def synflow_l2_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """SynFlow-L2 (Gebhart et al. 2021, "A unified paths perspective for pruning
    at initialization"): R = sum of the output of the network whose parameters
    and buffers are *squared*, on an all-ones input, i.e. the sum over paths of
    ``v_p^2`` (the trace of the path kernel); score ``|theta^2 * dR/d(theta^2)|``
    = ``|dR/dm|`` with masked weights ``theta^2 * m``, half of ``|theta *
    dR/dtheta|`` (the same ranking). BatchNorm in eval mode, as SynFlow;
    ``ctx.synflow_dtype`` (float64). PX's public code scores its SynFlow-L2
    as ``|theta| * |dR/d(theta^2)|`` instead (another ranking); this follows
    the papers."""
    return _synaptic_flow(model, masks, ctx, 2, "synflow_l2")


# -- PX ----------------------------------------------------------------------------------
def px_scores(model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
    """PX, Path eXclusion (Iurada, Ciccone, Tommasi, CVPR 2024): preserve the
    upper bound ``R = sum_n z1(x_n) . z2`` of the NTK trace and score

        S(theta_j) = | dR / d(theta_j^2) | theta_j^2  = | dR/dm_j |

    ``z1(x)`` (data-dependent, no gradient): the network with every weight 1
    (times the mask), every bias 0, every BatchNorm the identity, each ReLU
    replaced by the gate ``1[pre-activation > 0]`` of the real masked network
    on ``x`` (BatchNorm in eval mode, as PX's code), fed ``x^2``; ``z2``
    (data-independent, the path kernel): the network with every ReLU removed,
    every weight squared (masked weights ``theta^2 * m``), each BatchNorm
    scaling by its eval-mode scale squared, biases 0, fed ones, as in SynFlow
    (one input: the same for every example). Outputs are flattened per
    example; ``x`` runs over one pass of ``ctx.data`` (the paper: 10 examples
    per class, class-balanced, fixed). The copies run in ``ctx.synflow_dtype``
    (float64: an all-ones VGG-16 overflows float32). See :mod:`ntksap.paths`
    for the decomposition and what PX refuses.

    Where the paper and PX's public code (iurada/px-ntk-pruning) differ, this
    follows the paper: ``z1`` is fed ``x^2`` with every weight 1 (their code
    fed ``x`` with the real weights until February 2025, their issue #6); the
    prune set is class-balanced (their launch script draws 2 random batches,
    issue #7; the pipeline gives PX :func:`ntksap.data.prune_batches`). Where
    the paper is silent: BatchNorm in both copies is the linear map of its
    running statistics (eval mode), the exact path decomposition; their code
    runs the copies in train mode, where a BatchNorm makes each channel of the
    all-ones input's activations zero-mean, so global average pooling gives
    exactly 0 and ``z2`` is rounding noise. Biases are 0 in both copies (paths
    start at the input); every layer, classifier included, is squared / set to
    one (their latest code skips parameters whose names contain ``bn`` or
    ``fc``); max-pooling runs as it is in the copies (as their code), not
    gated by the real network's argmax.
    """
    cl, dtype = ctx.channels_last, ctx.synflow_dtype
    params, buffers = model_tensors(model, ctx.device, channels_last=cl)
    live = {n: to_format(m.to(params[n]), cl) for n, m in masks.items()}
    real = masked_params(params, live)
    wide = {n: t.to(dtype) for n, t in params.items()}     # the copies' precision, same layout
    wide_buffers = {n: t.to(dtype) if t.is_floating_point() else t for n, t in buffers.items()}
    ones, ones_buffers = path_tensors(model, wide, wide_buffers, "one")
    ones = masked_params(ones, {n: m.to(dtype) for n, m in live.items()})
    squares, squares_buffers = path_tensors(model, wide, wide_buffers, "square")

    weight = None   # sum over the prune set of z1, per output unit
    with torch.no_grad():
        for x, _ in ctx.batches(method="px"):
            with relu_gates("record", [], "px") as gates:
                call(model, real, buffers, x)
            with relu_gates("replay", gates, "px"):
                z1 = call(model, ones, ones_buffers, x.to(dtype) ** 2)
            z1 = z1.reshape(z1.shape[0], -1).sum(0)
            weight = z1 if weight is None else weight + z1
    m = _leaf_masks(masks, squares, cl)
    with relu_gates("linear", [], "px"):
        z2 = call(model, masked_params(squares, m), squares_buffers,
                  to_format(torch.ones((1, *ctx.input_shape), dtype=dtype, device=ctx.device), cl))
    (z2.reshape(-1) * weight).sum().backward()
    return {n: g.abs() for n, g in mask_grads(m, "px").items()}


# -- NTK-SAP ------------------------------------------------------------------------
def ntksap_batch_mask_grad(model: nn.Module, theta: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                           masks: Mapping[str, Tensor], z: Tensor, delta: Mapping[str, Tensor],
                           bn_mode: str = "unperturbed") -> Scores:
    """Gradient w.r.t. the mask of one noise mini-batch's term of equation 10:

        d/dm  sum_i || f(z_i; theta*m) - f(z_i; (theta + delta)*m) ||^2

    ``theta``: all parameters (re-drawn weights); ``delta``: the perturbation of
    each masked weight (std epsilon); ``z``: (B, C, H, W) noise. BatchNorm
    (``bn_mode``, :data:`BN_MODES`): ``unperturbed`` (the paper) normalises both
    passes with the unperturbed network's batch statistics on ``z`` (no
    gradient, the networks in eval mode), taken by each layer from its own
    input during the unperturbed pass (:func:`~ntksap.functional.statistics_of_next_call`);
    ``unperturbed_two_pass`` takes them in a separate no-grad train-mode pass
    first (:func:`~ntksap.functional.bn_batch_statistics`), as the authors;
    ``train`` gives each pass its own batch statistics; ``eval`` uses
    ``buffers`` (running statistics) as they are. Returns name -> gradient.
    """
    m = _leaf_masks(masks, masks)
    perturbed = dict(theta)
    for n, d in delta.items():
        perturbed[n] = theta[n] + d

    def difference(stats: Mapping[str, Tensor], mode: str) -> Tensor:
        def own(b):  # train mode updates the running statistics it is given: each pass gets a copy
            return {k: v.clone() for k, v in b.items()} if mode == "train" else b

        with scoring_mode(model, mode), affine_batchnorm(model):
            out_u = call(model, masked_params(theta, m), own(stats), z)
            out_p = call(model, masked_params(perturbed, m), own(stats), z)
        return (out_u - out_p).pow(2).sum()

    objective = None
    if bn_mode == "unperturbed":
        with scoring_mode(model, "eval"), affine_batchnorm(model), \
                statistics_of_next_call(model, buffers) as (stats, calls):
            out_u = call(model, masked_params(theta, m), stats, z)
            if all(c == 1 for c in calls.values()):   # else a BatchNorm layer ran twice: the two-pass form below
                objective = (out_u - call(model, masked_params(perturbed, m), stats, z)).pow(2).sum()
    if objective is None and bn_mode in ("unperturbed", "unperturbed_two_pass"):
        objective = difference(bn_batch_statistics(model, masked_params(theta, masks), buffers, z), "eval")
    elif objective is None:
        objective = difference(dict(buffers), bn_mode)
    objective.backward()
    return mask_grads(m, "ntksap")


def redraw_weights(scratch: nn.Module, init_fn: Callable[[nn.Module], None], device,
                   channels_last: bool = False) -> dict[str, Tensor]:
    """Re-draw ``scratch``'s weights in place with ``scratch.apply(init_fn)`` and
    return copies of all its parameters (name -> tensor on ``device``)."""
    with torch.no_grad():
        scratch.apply(init_fn)
    return model_tensors(scratch, device, channels_last=channels_last)[0]


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
    live = {n: to_format(m.to(ctx.device), cl) for n, m in masks.items()}
    total = {n: torch.zeros_like(m) for n, m in live.items()}
    fixed = None if ctx.redraw else model_tensors(model, ctx.device, channels_last=cl)[0]
    bn_mode = ctx.bn_mode or "unperturbed"

    def inputs():  # one round's mini-batches: noise of the noise-batch sizes, or one pass of the prune set
        if ctx.noise_inputs:
            yield from noise_batch_sizes(ctx.num_samples, ctx.batch_size)
        else:
            yield from (x for x, _ in ctx.batches(method="ntksap with noise_inputs=False"))

    for _ in range(ctx.rounds):
        for b in inputs():
            theta = redraw_weights(scratch, init_fn, ctx.device, cl) if ctx.redraw else fixed
            if ctx.noise_inputs:
                z = to_format(torch.randn((b, *ctx.input_shape), device=ctx.device), cl)
            else:
                z = b
            delta = {n: ctx.epsilon * torch.randn(theta[n].shape, device=ctx.device) for n in live}
            delta = {n: to_format(d, cl) for n, d in delta.items()}
            for n, g in ntksap_batch_mask_grad(model, theta, buffers, live, z, delta, bn_mode).items():
                total[n] += g
    return {n: t.abs().contiguous() for n, t in total.items()}


# -- the registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A pruning method: its score function, the paper's defaults, and how
    BatchNorm behaves while it scores (``bn_mode``, one of ``bn_modes``, which
    are the :data:`BN_MODES` a user may choose instead). ``check(model)``, if
    given, refuses a model the method cannot score (a ``ValueError``), before
    any work; ``prune_set``, if given, is the prune set of the method's paper
    (``balanced`` or ``random``, ``prune.prune_set`` of ``params.yaml``), which
    the pipeline uses unless a run says otherwise.

    Calling it scores in that mode (:func:`scoring_mode`) and leaves the
    model's modules as it found them: ``METHODS["snip"](model, masks, ctx)``.
    """

    score: Callable[[nn.Module, Mapping[str, Tensor], ScoreContext], Scores]
    iterations: int = 1
    needs_data: bool = False
    description: str = ""
    defaults: dict = field(default_factory=dict)
    bn_mode: str = "train"
    bn_modes: tuple[str, ...] = ("train", "eval")
    check: Callable[[nn.Module], None] | None = None
    prune_set: str | None = None

    def __call__(self, model: nn.Module, masks: Mapping[str, Tensor], ctx: ScoreContext) -> Scores:
        mode = ctx.bn_mode or self.bn_mode
        if mode not in self.bn_modes:
            raise ValueError(f"bn_mode={mode!r} is not allowed for this method; allowed: {list(self.bn_modes)}")
        if ctx.bn_mode != mode:
            ctx = replace(ctx, bn_mode=mode)
        with scoring_mode(model, "train" if mode == "train" else "eval"):
            return self.score(model, masks, ctx)


METHODS: dict[str, Method] = {
    "random": Method(random_scores, 1, False, "uniformly random connections"),
    "magnitude": Method(magnitude_scores, 1, False, "|theta| at initialisation"),
    "snip": Method(snip_scores, 1, True, "|theta * dL/dtheta| on real data (Lee et al. 2019)"),
    "iterative_snip": Method(snip_scores, 100, True, "SNIP re-scored on the masked net, exponential schedule"),
    "grasp": Method(grasp_scores, 1, True, "theta * Hg, largest kept (Wang et al. 2020)"),
    "synflow": Method(synflow_scores, 100, False, "synaptic flow on |theta|, all-ones input (Tanaka et al. 2020)",
                      bn_mode="eval"),
    "ntksap": Method(ntksap_scores, 20, False, "NTK-SAP, eq. 10 (Wang et al. 2023)",
                     {"rounds": 5, "epsilon": 0.01}, bn_mode="unperturbed", bn_modes=BN_MODES),
    # beyond the paper
    "random_erk": Method(erk_scores, 1, False, "random, ERK layer-wise densities (Evci et al. 2020)"),
    "synflow_l2": Method(synflow_l2_scores, 100, False, "synaptic flow on theta^2 (Gebhart et al. 2021)",
                         bn_mode="eval"),
    "px": Method(px_scores, 100, True, "PX, NTK-trace bound over ReLU paths (Iurada et al. 2024)",
                 bn_mode="eval", bn_modes=("eval",), check=check_relu_network, prune_set="balanced"),
}
"""The methods by name. BatchNorm while scoring, as the authors' code runs
them (PAPER.md section 3): random, magnitude, SNIP, iterative SNIP and GraSP in
train mode (batch statistics; ``--prune-train-mode True`` of their script),
SynFlow in eval mode, NTK-SAP with the unperturbed network's statistics.
Beyond the paper: random with ERK densities, SynFlow-L2 (eval mode, as
SynFlow) and PX (eval mode: its ReLU gates as PX's code, its path copies as
the exact decomposition)."""
