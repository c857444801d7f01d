"""Device resolution: a ``device=`` argument as a ``torch.device`` this machine has.

Every function of the package that takes ``device=`` resolves it here, so
``None`` means the same everywhere (CUDA when available) and a device the
machine lacks fails at once, naming ``device``."""

from __future__ import annotations

import torch

from .checks import not_allowed

ALLOWED = "None (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:<index>' or a torch.device"


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``: ``None`` picks CUDA when available, else
    the CPU; a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``), a CUDA index or a
    ``torch.device`` is taken as it is. ``ValueError`` naming ``device`` for
    anything else, and for a CUDA (or MPS) device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool):
        raise not_allowed("device", device, ALLOWED)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise not_allowed("device", device, ALLOWED, ("cpu", "cuda")) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} is not allowed here: CUDA is not available on this machine; "
                             "allowed: None or 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={device!r} is not allowed here: this machine has {count} CUDA device(s); "
                             f"allowed: 'cuda:0' to 'cuda:{count - 1}', 'cuda', 'cpu' or None")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} is not allowed here: MPS is not available on this machine; "
                         "allowed: None or 'cpu'")
    return resolved


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA with bf16 support, or
    a CPU with AVX-512 BF16 or AMX (oneDNN's bf16 kernels). Elsewhere bf16
    autocast is emulated: ResNet-20 trained 11x slower in bf16 than in float32
    (26 against 301 img/s) on a 2-core AVX2-only AMD EPYC
    (``python benchmarks/epoch_time.py --variants masked --amp on``)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def channels_last_is_safe(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the default channels-last memory format may be used for
    ``model`` on ``device``. Not on a CPU without AVX-512 for a model with a
    1x1 convolution of stride > 1 (ResNet shortcuts): there, torch 2.14.1's
    channels-last weight gradient of such a convolution corrupts the heap on
    one thread (glibc aborts with "corrupted double-linked list"; reproduced
    with a single ``aten.convolution_backward`` on (8, 2, 6, 6) inputs on an
    AVX2-only AMD EPYC; NCHW is unaffected). Such models run in NCHW there."""
    if device.type != "cpu" or "AVX512" in torch.backends.cpu.get_cpu_capability():
        return True
    return not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
                   for m in model.modules())
