"""The pruning loop (PAPER.md Algorithm 1 for every method) and its one-call
entry point :func:`prune`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .masks import Masks, apply_masks, prunable_parameters
from .scores import METHODS, ScoreContext

SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "local")


def scheduled_density(density: float, t: int, iterations: int, schedule: str = "exponential") -> float:
    """Density after iteration ``t`` (1..T) on the way to ``density``:
    ``d^(t/T)`` (exponential) or ``1 - (1 - d) t/T`` (linear)."""
    if schedule == "exponential":
        return density ** (t / iterations)
    if schedule == "linear":
        return 1.0 - (1.0 - density) * t / iterations
    raise ValueError(f"schedule={schedule!r} is unknown; allowed: {list(SCHEDULES)}")


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


def select_masks(scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], density: float,
                 scope: str = "global") -> Masks:
    """New masks keeping the highest scores among the live weights:
    ``round(density * N)`` over all layers (``global``) or per layer (``local``)."""
    names = list(masks)
    if scope == "global":
        flat_s = torch.cat([scores[n].detach().reshape(-1).cpu() for n in names])
        alive = torch.cat([masks[n].reshape(-1).cpu() for n in names]) != 0
        keep = _top_k_mask(flat_s, alive, kept_count(density, flat_s.numel()))
        out, i = Masks(), 0
        for n in names:
            out[n] = keep[i:i + masks[n].numel()].reshape(masks[n].shape)
            i += masks[n].numel()
        return out
    if scope == "local":
        return Masks({n: _top_k_mask(scores[n].detach().reshape(-1).cpu(), masks[n].reshape(-1).cpu() != 0,
                                     kept_count(density, masks[n].numel())).reshape(masks[n].shape)
                      for n in names})
    raise ValueError(f"scope={scope!r} is unknown; allowed: {list(SCOPES)}")


# -- validation ----------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}")
    return int(value)


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


def _materialise_data(data, method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if data is None:
        raise ValueError(f"data=None is not allowed for method={method!r}: it needs real data, an iterable of "
                         "(inputs, targets) batches")
    batches = []
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                and isinstance(batch[1], torch.Tensor)):
            raise ValueError(f"data: batch {i} is not an (inputs, targets) pair of tensors")
        batches.append((batch[0], batch[1]))
    if not batches:
        raise ValueError(f"data is empty; method={method!r} needs at least one (inputs, targets) batch")
    return batches


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a valid torch device") from exc


def _num_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Output units of ``model`` for one input (also checks ``input_shape``)."""
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), device=p.device, dtype=p.dtype))
    except Exception as exc:
        raise ValueError(f"input_shape={input_shape} does not fit the model: {exc}") from exc
    finally:
        model.train(was_training)
    return int(out[0].numel())


def prune(model: nn.Module, method: str, sparsity: float, *, input_shape: Iterable[int] | None = None,
          data: Iterable | None = None, iterations: int | None = None, rounds: int | None = None,
          epsilon: float | None = None, num_samples: int | None = None, batch_size: int = 256,
          seed: int = 0, scope: str = "global", schedule: str = "exponential",
          callback: Callable[[int, Masks, dict], None] | None = None, device=None,
          exclude: Iterable[str] = (), init_fn: Callable[[nn.Module], None] | None = None,
          redraw: bool = True, noise_inputs: bool = True, channels_last: bool | None = None,
          apply: bool = True, progress: bool = True) -> Masks:
    """Prune ``model`` before training; returns the masks (:class:`Masks`).

    Runs Algorithm 1 of PAPER.md for ``method`` (a key of :data:`METHODS`): for
    t = 1..T, score the live weights, multiply by the mask, keep the top
    ``round(d^(t/T) N)`` (d = 1 - ``sparsity``, N prunable weights; ``scope``
    global or per layer; ``schedule`` exponential or linear). Pruned weights
    never come back; ties go to the earlier weight.

    ``None`` options take the method's defaults from the paper: ``iterations``
    (T: 20 for NTK-SAP, 100 for SynFlow and iterative SNIP, 1 otherwise),
    ``rounds`` (R = 5) and ``epsilon`` (0.01) for NTK-SAP, ``num_samples`` = 10 x
    the number of outputs. ``data`` (an iterable of (inputs, targets)) is
    required by snip, iterative_snip and grasp; ``input_shape`` (one input's
    shape) by the others, or taken from ``data``. ``init_fn(module)`` re-draws
    weights for NTK-SAP (default: the paper's Kaiming-normal init, BN 1/0).
    ``callback(iteration, masks, scores)`` runs after each iteration.
    NTK-SAP ablations: ``redraw=False`` scores with the model's own weights
    for every batch; ``noise_inputs=False`` uses the inputs of ``data``
    instead of Gaussian noise. ``channels_last`` (default: on for image
    inputs) only changes the memory layout while scoring.

    The random draws come from ``seed`` (the caller's RNG state is restored);
    the same seed gives bit-identical masks on the CPU. Afterwards the model
    holds its original weights with the pruned ones set to zero and, with
    ``apply=True``, gradient hooks that keep them zero in training
    (:func:`ntksap.masks.apply_masks`).
    """
    # -- cheap checks, before any work ------------------------------------------------
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed: {sorted(METHODS)}")
    spec = METHODS[method]
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity={sparsity!r} is not allowed; it must be a number in [0, 1) "
                         "(the fraction of prunable weights removed)")
    iterations = _check_int("iterations", spec.iterations if iterations is None else iterations, 1)
    rounds = _check_int("rounds", spec.defaults.get("rounds", 1) if rounds is None else rounds, 1)
    epsilon = spec.defaults.get("epsilon", 0.01) if epsilon is None else epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (0 < epsilon < math.inf):
        raise ValueError(f"epsilon={epsilon!r} is not allowed; it must be a finite number > 0")
    batch_size = _check_int("batch_size", batch_size, 1)
    if num_samples is not None:
        num_samples = _check_int("num_samples", num_samples, 1)
    seed = _check_int("seed", seed, 0)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is unknown; allowed: {list(SCOPES)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; allowed: {list(SCHEDULES)}")
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
    device = _resolve_device(device)
    needs_data = spec.needs_data or not noise_inputs  # noise_inputs=False: NTK-SAP on real inputs
    batches = _materialise_data(data, method) if (needs_data or data is not None) else None
    if input_shape is None:
        if batches is not None:
            input_shape = tuple(batches[0][0].shape[1:])
        else:
            raise ValueError(f"input_shape=None is not allowed for method={method!r} without data: "
                             "pass the shape of one input, e.g. input_shape=(3, 32, 32)")
    input_shape = _check_input_shape(input_shape)
    if batches is not None:
        for i, (x, _) in enumerate(batches):
            if tuple(x.shape[1:]) != input_shape:
                raise ValueError(f"data: batch {i} has inputs of shape {tuple(x.shape[1:])}, expected {input_shape}")
    k_outputs = _num_outputs(model, input_shape)
    if channels_last is None:
        channels_last = len(input_shape) == 3
    ctx = ScoreContext(
        device=device, input_shape=input_shape,
        data=[(x.to(device), y.to(device)) for x, y in batches] if batches else None,
        num_samples=num_samples if num_samples is not None else 10 * k_outputs,
        batch_size=batch_size, rounds=rounds, epsilon=float(epsilon), init_fn=init_fn,
        channels_last=bool(channels_last), redraw=bool(redraw), noise_inputs=bool(noise_inputs),
    )

    # -- Algorithm 1 ----------------------------------------------------------------
    handle = getattr(model, "_ntksap_mask_handle", None)
    if handle is not None:  # re-pruning: drop the hooks of an earlier prune
        handle.remove()
    density = 1.0 - float(sparsity)
    masks = Masks({n: torch.ones_like(p, dtype=torch.float32, device="cpu") for n, p in params.items()})
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        bar = tqdm(range(1, iterations + 1), desc=f"prune[{method}]", disable=not progress or iterations == 1,
                   leave=False)
        for t in bar:
            raw = spec.score(model, masks, ctx)
            scores = {}
            for n in masks:
                s = raw[n].detach().to("cpu", torch.float32 if raw[n].dtype != torch.float64 else torch.float64)
                if not torch.isfinite(s).all():
                    raise ValueError(f"scores of method={method!r} are not finite (NaN or inf) for '{n}' at "
                                     f"iteration {t}; allowed: finite scores (try float64 or a smaller model)")
                scores[n] = s.reshape(masks[n].shape) * masks[n].to(s.dtype)
            masks = select_masks(scores, masks, scheduled_density(density, t, iterations, schedule), scope)
            if callback is not None:
                callback(t, masks, scores)
            bar.set_postfix(density=f"{masks.density:.4f}")
    if apply:
        model._ntksap_mask_handle = apply_masks(model, masks)
    return masks
