"""The pruning loop (PAPER.md Algorithm 1 for every method) and its one-call
entry point :func:`prune`."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_choice, check_int, check_positive
from .devices import channels_last_is_safe, resolve_device
from .functional import scoring_mode
from .masks import Masks, apply_masks, prunable_parameters
from .scores import GRASP_HESSIAN, METHODS, ScoreContext, check_batch

SCHEDULES = ("exponential", "linear")
SYNFLOW_DTYPES = {"float64": torch.float64, "float32": torch.float32}
SCOPES = ("global", "local")


def scheduled_density(density: float, t: int, iterations: int, schedule: str = "exponential") -> float:
    """Density after iteration ``t`` (1..T) on the way to ``density``:
    ``d^(t/T)`` (exponential) or ``1 - (1 - d) t/T`` (linear)."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "exponential":
        return density ** (t / iterations)
    return 1.0 - (1.0 - density) * t / iterations


COUNT_RULES = ("round", "authors")
"""How many weights an iteration keeps, and how ties at the threshold go:
``round`` (ours) keeps exactly ``round(d N)``, ties to the earlier weight;
``authors`` keeps ``N - int((1 - d) N)`` and prunes every weight tied at the
threshold (the ``kthvalue`` rule of the authors' mask step), so that their
masks come out bit for bit from the same scores."""


def kept_count(density: float, numel: int) -> int:
    """Number of weights kept at ``density`` out of ``numel``: ``round(density * numel)``."""
    return int(round(density * numel))


def _top_k_mask(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask keeping the ``k`` highest ``scores`` among ``alive`` entries (flat
    tensors). Ties go to the lower index (stable sort); dead entries never come back."""
    ranked = torch.where(alive, scores.to(torch.float64), torch.tensor(-math.inf, dtype=torch.float64))
    order = torch.sort(ranked, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.float32)
    keep[order[:k]] = 1.0
    return keep


def _authors_mask(scores: torch.Tensor, alive: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask by the authors' rule (flat tensors): with ``s`` the scores, 0 on
    dead entries, and ``k = int((1 - density) N)``, prune every entry with
    ``s <= kthvalue(s, k)`` (ties at the threshold all go), nothing when k < 1.
    Dead entries never come back (their code would revive them only for
    negative scores, which no iterative method of the paper has)."""
    s = torch.where(alive, scores, torch.zeros((), dtype=scores.dtype))
    k = int((1.0 - density) * s.numel())
    if k < 1:
        return alive.to(torch.float32)
    threshold = torch.kthvalue(s, k).values
    return ((s > threshold) & alive).to(torch.float32)


def _layer_mask(scores: torch.Tensor, alive: torch.Tensor, density: float, rule: str) -> torch.Tensor:
    if rule == "authors":
        return _authors_mask(scores, alive, density)
    return _top_k_mask(scores, alive, kept_count(density, scores.numel()))


def select_masks(scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], density: float,
                 scope: str = "global", rule: str = "round") -> Masks:
    """New masks keeping the highest scores among the live weights, over all
    layers (``global``) or per layer (``local``), counted by ``rule``
    (:data:`COUNT_RULES`): ``round(density * N)`` or the authors' rule."""
    check_choice("count_rule", rule, COUNT_RULES)
    check_choice("scope", scope, SCOPES)
    names = list(masks)
    if scope == "global":
        flat_s = torch.cat([scores[n].detach().reshape(-1).cpu() for n in names])
        alive = torch.cat([masks[n].reshape(-1).cpu() for n in names]) != 0
        keep = _layer_mask(flat_s, alive, density, rule)
        out, i = Masks(), 0
        for n in names:
            out[n] = keep[i:i + masks[n].numel()].reshape(masks[n].shape)
            i += masks[n].numel()
        return out
    return Masks({n: _layer_mask(scores[n].detach().reshape(-1).cpu(), masks[n].reshape(-1).cpu() != 0,
                                 density, rule).reshape(masks[n].shape)
                  for n in names})


# -- validation ----------------------------------------------------------------------
def _check_input_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
        ok = len(shape) >= 1 and all(s > 0 for s in shape) and all(float(s) == float(o) for s, o in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"input_shape={input_shape!r} is not allowed; it must be the shape of one input, "
                         "a tuple of positive ints such as (3, 32, 32)")
    return shape


def _prune_set(data, method: str, input_shape: tuple[int, ...] | None):
    """``data`` ready to be iterated once per pruning iteration, and its first
    batch (checked). A list or any re-iterable (a ``DataLoader``,
    :func:`ntksap.data.prune_loader`) stays as it is, where it is, so a
    shuffling, augmenting loader re-draws every pass; a one-shot iterator is
    read once into a list. Nothing is moved to the scoring device here."""
    if data is None:
        raise ValueError(f"data=None is not allowed for method={method!r}: it needs real data, an iterable of "
                         "(inputs, targets) batches")
    try:
        is_iterator = iter(data) is data
    except TypeError:
        raise ValueError(f"data={type(data).__name__} is not an iterable of (inputs, targets) batches") from None
    source = list(data) if is_iterator else data
    first = next(iter(source), None)
    if first is None:
        raise ValueError(f"data is empty; method={method!r} needs at least one (inputs, targets) batch")
    x, _ = check_batch(0, first, input_shape)
    return source, tuple(x.shape[1:])


def _num_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Output units of ``model`` for one input (also checks ``input_shape``)."""
    p = next(model.parameters())
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            out = model(torch.zeros((2, *input_shape), device=p.device, dtype=p.dtype))
    except Exception as exc:
        raise ValueError(f"input_shape={input_shape} does not fit the model: {exc}") from exc
    return int(out[0].numel())


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose generators ``torch.manual_seed`` reseeds (all of them
    once CUDA is initialised), so ``fork_rng`` must save and restore them all."""
    if device.type == "cuda" or torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


_FP32_FLAGS = ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision", "cudnn.conv.fp32_precision",
               "cudnn.rnn.fp32_precision")


def _flag_owner(path: str):
    owner = torch.backends
    for part in path.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner, path.rsplit(".", 1)[-1]


@contextlib.contextmanager
def exact_float32():
    """Float32 matrix products and convolutions in full precision (no TF32) on
    a GPU while scoring: NTK-SAP's finite difference is ~1e-3 relative at
    epsilon = 0.01, TF32's rounding. Restores the caller's settings exactly."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the fp32_precision API only
        saved = [(path, getattr(*_flag_owner(path))) for path in _FP32_FLAGS]
        try:
            for path in ("cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision", "cudnn.rnn.fp32_precision"):
                setattr(*_flag_owner(path), "ieee")
            yield
        finally:
            for path, value in saved:
                setattr(*_flag_owner(path), value)
        return
    saved_legacy = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(saved_legacy[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy[1:]


def prune(model: nn.Module, method: str, sparsity: float, *, input_shape: Iterable[int] | None = None,
          data: Iterable | None = None, iterations: int | None = None, rounds: int | None = None,
          epsilon: float | None = None, num_samples: int | None = None, batch_size: int = 256,
          seed: int = 0, scope: str = "global", schedule: str = "exponential",
          callback: Callable[[int, Masks, dict], None] | None = None, device=None,
          exclude: Iterable[str] = (), init_fn: Callable[[nn.Module], None] | None = None,
          redraw: bool = True, noise_inputs: bool = True, channels_last: bool | None = None,
          bn_mode: str | None = None, count_rule: str = "round", grasp_hessian: str = "auto",
          synflow_dtype: str = "float64", apply: bool = True, progress: bool = True) -> Masks:
    """Prune ``model`` before training; returns the masks (:class:`Masks`).

    Runs Algorithm 1 of PAPER.md for ``method`` (a key of :data:`METHODS`): for
    t = 1..T, score the live weights, multiply by the mask, keep the top
    ``round(d^(t/T) N)`` (d = 1 - ``sparsity``, N prunable weights; ``scope``
    global or per layer; ``schedule`` exponential or linear). Pruned weights
    never come back; ties go to the earlier weight. ``count_rule="authors"``
    keeps ``N - int((1 - d^(t/T)) N)`` instead and prunes every weight tied at
    the threshold, as the authors' code does (:data:`COUNT_RULES`).

    ``None`` options take the method's defaults from the paper: ``iterations``
    (T: 20 for NTK-SAP, 100 for SynFlow, SynFlow-L2, PX and iterative SNIP,
    1 otherwise),
    ``rounds`` (R = 5) and ``epsilon`` (0.01) for NTK-SAP, ``num_samples`` = 10 x
    the number of outputs, ``bn_mode`` (:data:`ntksap.scores.BN_MODES`) the
    method's own: BatchNorm in train mode (batch statistics) for random,
    magnitude, SNIP, iterative SNIP and GraSP, eval mode (running statistics)
    for SynFlow, SynFlow-L2 and PX, the unperturbed network's batch
    statistics for NTK-SAP; every
    other module scores in eval mode. A method's ``check`` (PX: a ReLU
    network) runs before any work. The caller's model is left in the modes
    (and with the buffers) it had, so masks do not depend on ``model.train()``
    or ``model.eval()`` before the call.

    ``data`` (an iterable of (inputs, targets)) is required by snip,
    iterative_snip, grasp and px (its paper: 10 per class, class-balanced,
    :func:`ntksap.data.prune_batches`); it is iterated once per pruning iteration (a
    shuffling loader, such as :func:`ntksap.data.prune_loader`, re-draws) and
    moved to the scoring device one batch at a time. ``input_shape`` (one
    input's shape) is required by the others, or taken from ``data``.
    ``init_fn(module)`` re-draws weights for NTK-SAP (default: the paper's
    Kaiming-normal init, BN 1/0). ``callback(iteration, masks, scores)`` runs
    after each iteration. NTK-SAP ablations: ``redraw=False`` scores with the
    model's own weights for every batch; ``noise_inputs=False`` uses the inputs
    of ``data`` instead of Gaussian noise. ``grasp_hessian``
    (:data:`ntksap.scores.GRASP_HESSIAN`) picks how GraSP forms its
    Hessian-gradient product; ``synflow_dtype`` ("float64", or the authors'
    "float32") the precision SynFlow scores in. ``channels_last`` (default: on for image inputs,
    except where :func:`ntksap.devices.channels_last_is_safe` says a torch bug
    forbids it) only changes the memory layout while scoring. On a GPU, scoring runs
    without TF32 (the caller's setting is restored).

    The random draws come from ``seed`` (the caller's RNG state is restored,
    on every CUDA device too); the same seed gives bit-identical masks on the
    CPU. Afterwards the model holds its original weights with the pruned ones
    set to zero and, with ``apply=True``, gradient hooks that keep them zero
    in training (:func:`ntksap.masks.apply_masks`).
    """
    # -- cheap checks, before any work ------------------------------------------------
    spec = METHODS[check_choice("method", method, sorted(METHODS))]
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity={sparsity!r} is not allowed; it must be a number in [0, 1) "
                         "(the fraction of prunable weights removed)")
    iterations = check_int("iterations", spec.iterations if iterations is None else iterations, 1)
    rounds = check_int("rounds", spec.defaults.get("rounds", 1) if rounds is None else rounds, 1)
    epsilon = check_positive("epsilon", spec.defaults.get("epsilon", 0.01) if epsilon is None else epsilon)
    batch_size = check_int("batch_size", batch_size, 1)
    num_samples = check_int("num_samples", num_samples, 1, allow_none=True)
    seed = check_int("seed", seed, 0)
    check_choice("scope", scope, SCOPES)
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("count_rule", count_rule, COUNT_RULES)
    if bn_mode is not None and bn_mode not in spec.bn_modes:
        raise ValueError(f"bn_mode={bn_mode!r} is not allowed for method={method!r}; allowed: None (the "
                         f"method's own, {spec.bn_mode!r}) or one of {list(spec.bn_modes)}")
    check_choice("grasp_hessian", grasp_hessian, GRASP_HESSIAN)
    check_choice("synflow_dtype", synflow_dtype, SYNFLOW_DTYPES)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r} is not callable; pass a function (iteration, masks, scores)")
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn={init_fn!r} is not callable; pass a function that re-initialises a module")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    params = prunable_parameters(model, exclude)
    if not params:
        raise ValueError(f"model: {type(model).__name__} has nothing prunable (no Conv/Linear weight"
                         f"{' outside exclude=' + repr(exclude) if exclude else ''})")
    if spec.check is not None:
        spec.check(model)
    device = resolve_device(device)
    rng_devices = _rng_devices(device)
    needs_data = spec.needs_data or not noise_inputs  # noise_inputs=False: NTK-SAP on real inputs
    source = None
    if input_shape is not None:
        input_shape = _check_input_shape(input_shape)
    if needs_data or data is not None:
        with torch.random.fork_rng(devices=rng_devices):  # a loader's first pass draws from the global RNG
            source, data_shape = _prune_set(data, method, input_shape)
        input_shape = input_shape or data_shape
    if input_shape is None:
        raise ValueError(f"input_shape=None is not allowed for method={method!r} without data: "
                         "pass the shape of one input, e.g. input_shape=(3, 32, 32)")
    k_outputs = _num_outputs(model, input_shape)
    if channels_last is None:
        channels_last = len(input_shape) == 3 and channels_last_is_safe(model, device)
    ctx = ScoreContext(
        device=device, input_shape=input_shape, data=source,
        num_samples=num_samples if num_samples is not None else 10 * k_outputs,
        batch_size=batch_size, rounds=rounds, epsilon=epsilon, init_fn=init_fn,
        channels_last=bool(channels_last), redraw=bool(redraw), noise_inputs=bool(noise_inputs),
        bn_mode=bn_mode or spec.bn_mode, grasp_hessian=grasp_hessian, synflow_dtype=SYNFLOW_DTYPES[synflow_dtype],
    )

    # -- Algorithm 1 ----------------------------------------------------------------
    handle = getattr(model, "_ntksap_mask_handle", None)
    if handle is not None:  # re-pruning: drop the hooks of an earlier prune
        handle.remove()
    density = 1.0 - float(sparsity)
    masks = Masks({n: torch.ones_like(p, dtype=torch.float32, device="cpu") for n, p in params.items()})
    with torch.random.fork_rng(devices=rng_devices), exact_float32():
        if rng_devices:
            torch.manual_seed(seed)  # the CPU's and every CUDA device's generator, all forked above
        else:  # the CPU's alone: a seed queued for a CUDA not yet initialised would outlive the fork
            torch.default_generator.manual_seed(seed)
        bar = tqdm(range(1, iterations + 1), desc=f"prune[{method}]", disable=not progress or iterations == 1,
                   leave=False)
        for t in bar:
            raw = spec(model, masks, ctx)
            scores = {}
            for n in masks:
                s = raw[n].detach().to("cpu", torch.float32 if raw[n].dtype != torch.float64 else torch.float64)
                if not torch.isfinite(s).all():
                    raise ValueError(f"scores of method={method!r} are not finite (NaN or inf) for '{n}' at "
                                     f"iteration {t}; allowed: finite scores (try float64 or a smaller model)")
                scores[n] = s.reshape(masks[n].shape) * masks[n].to(s.dtype)
            masks = select_masks(scores, masks, scheduled_density(density, t, iterations, schedule), scope,
                                 count_rule)
            if callback is not None:
                callback(t, masks, scores)
            bar.set_postfix(density=f"{masks.density:.4f}")
    if apply:
        model._ntksap_mask_handle = apply_masks(model, masks)
    return masks
