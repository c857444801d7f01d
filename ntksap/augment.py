"""Batch-vectorised data augmentation on the device (PAPER.md section 5).

Every function works on a whole batch at once: ``x`` is a ``uint8`` (or float)
tensor of shape (B, C, H, W) on any device, and the random parameters are drawn
from an explicit ``torch.Generator`` on that device, so a run is reproducible.

* CIFAR: :func:`random_crop_flip` -- random crop back to H x W from the image
  zero-padded by ``padding`` pixels on every side (torchvision
  ``RandomCrop(32, padding=4)``), then a horizontal flip with probability 1/2.
* Tiny-ImageNet: :func:`random_resized_crop_flip` -- torchvision's
  ``RandomResizedCrop(64, scale=(0.1, 1), ratio=(0.8, 1.25))`` (bilinear) then a
  flip with probability 1/2.

The samplers (``sample_*``) and the appliers (:func:`crop_flip`,
:func:`resized_crop_flip`) are separate so tests can check each against a naive
per-image reference.
"""

from __future__ import annotations

import math

import torch

AUGMENTATIONS = ("none", "crop_flip", "rrc_flip")


# -- random crop with zero padding + flip (CIFAR) ----------------------------------
def sample_crop_flip(batch: int, padding: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random offsets into the padded image and flip flags for ``batch`` images.

    Returns ``(top, left, flip)``: int64 offsets uniform in ``[0, 2*padding]``
    (shape (B,)) and a bool flip flag per image (probability 1/2).
    """
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return top, left, flip


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) at ``(top, left)`` of its copy
    zero-padded by ``padding`` pixels, keeping size H x W, and mirror it
    left-right where ``flip`` is true -- one gather for the whole batch.

    The result has the dtype of ``x`` and channels-last strides (a permuted
    view of a (B, H, W, C) tensor); call ``.contiguous()`` for NCHW strides.
    """
    b, c, h, w = x.shape
    p = int(padding)
    if p < 0:
        raise ValueError(f"padding={padding} must be >= 0")
    dev = x.device
    hp, wp = h + 2 * p, w + 2 * p
    # padded copy in (B, H+2p, W+2p, C) order, so the gather yields channels-last
    xp = torch.zeros((b, hp, wp, c), dtype=x.dtype, device=dev)
    xp[:, p:p + h, p:p + w, :] = x.permute(0, 2, 3, 1)
    rows = top.to(dev).view(b, 1) + torch.arange(h, device=dev).view(1, h)          # (B, H)
    ar = torch.arange(w, device=dev).view(1, w)
    cols = left.to(dev).view(b, 1) + torch.where(flip.to(dev).view(b, 1), (w - 1) - ar, ar)  # (B, W)
    # one index_select of whole pixels (C values each) over the flattened padded batch
    lin = (torch.arange(b, device=dev).view(b, 1, 1) * (hp * wp) + rows.view(b, h, 1) * wp + cols.view(b, 1, w))
    out = xp.view(b * hp * wp, c).index_select(0, lin.view(-1)).view(b, h, w, c)  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """``RandomCrop(H, padding)`` + ``RandomHorizontalFlip()`` for a batch (see :func:`crop_flip`)."""
    top, left, flip = sample_crop_flip(x.shape[0], padding, generator, x.device)
    return crop_flip(x, top, left, flip, padding)


# -- random resized crop + flip (Tiny-ImageNet) ----------------------------------------
def sample_resized_crop(batch: int, height: int, width: int, scale: tuple[float, float] = (0.1, 1.0),
                        ratio: tuple[float, float] = (0.8, 1.25), generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu", attempts: int = 10) -> torch.Tensor:
    """Crop boxes as torchvision's ``RandomResizedCrop.get_params``, vectorised.

    For each image: up to ``attempts`` tries of an area fraction ~ U(scale) and a
    log-uniform aspect ratio in ``ratio``; the first box that fits is used, else
    the central crop with the aspect ratio clamped into ``ratio``.
    Returns int64 (B, 4): ``top, left, h, w`` in pixels.
    """
    area = height * width
    frac = torch.empty(batch, attempts, device=device).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(batch, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                generator=generator)
    target = area * frac
    aspect = torch.exp(logr)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(dim=1, keepdim=True)               # first valid attempt (0 if none)
    any_ok = ok.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    # fallback: central crop, aspect ratio clamped into the allowed range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    u = torch.rand(batch, 2, generator=generator, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1)).long()
    left = torch.floor(u[:, 1] * (width - w + 1)).long()
    top = torch.where(any_ok, top, (height - h) // 2)
    left = torch.where(any_ok, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _interp_matrix(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """Bilinear resampling matrices (B, size_out, size_in) that resize the
    window ``[start, start+length)`` of a length-``size_in`` axis to
    ``size_out`` samples, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does on the cropped window (edge-clamped)."""
    b = start.shape[0]
    dev = start.device
    length_f = length.to(torch.float32).view(b, 1)
    u = torch.arange(size_out, device=dev, dtype=torch.float32).view(1, size_out)
    src = ((u + 0.5) * (length_f / size_out) - 0.5).clamp(min=0.0)           # in crop coordinates
    i0 = torch.floor(src).long()
    i0 = torch.minimum(i0, length.view(b, 1) - 1)
    i1 = torch.minimum(i0 + 1, length.view(b, 1) - 1)
    frac = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    m = torch.zeros(b, size_out, size_in, device=dev, dtype=torch.float32)
    off = start.view(b, 1)
    m.scatter_add_(2, (i0 + off).unsqueeze(2), (1.0 - frac).unsqueeze(2))
    m.scatter_add_(2, (i1 + off).unsqueeze(2), frac.unsqueeze(2))
    return m


def resized_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                      size: tuple[int, int]) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) to its box (``top, left, h, w``,
    int64 (B, 4)), resize it bilinearly to ``size`` and mirror it where ``flip``
    is true. Separable: ``out[b, c] = Ry[b] @ x[b, c] @ Rx[b]^T``.

    Returns float32 (B, C, *size) on the pixel scale of ``x`` (no rounding).
    """
    b, c, h, w = x.shape
    oh, ow = size
    boxes = boxes.to(x.device)
    ry = _interp_matrix(boxes[:, 0], boxes[:, 2], h, oh)                 # (B, oh, H)
    rx = _interp_matrix(boxes[:, 1], boxes[:, 3], w, ow)                 # (B, ow, W)
    rx = torch.where(flip.to(x.device).view(b, 1, 1), rx.flip(1), rx)
    xf = x.to(torch.float32)
    out = torch.matmul(ry.unsqueeze(1), xf)                               # (B, C, oh, W)
    return torch.matmul(out, rx.transpose(1, 2).unsqueeze(1))             # (B, C, oh, ow)


def random_resized_crop_flip(x: torch.Tensor, size: tuple[int, int] | None = None,
                             scale: tuple[float, float] = (0.1, 1.0), ratio: tuple[float, float] = (0.8, 1.25),
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip()`` for a batch."""
    b, _, h, w = x.shape
    size = size or (h, w)
    boxes = sample_resized_crop(b, h, w, scale, ratio, generator, x.device)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return resized_crop_flip(x, boxes, flip, size)


def augment_pixels(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the named augmentation (one of :data:`AUGMENTATIONS`) to a uint8
    batch (B, C, H, W), keeping the pixels' dtype where the augmentation only
    moves pixels: uint8 for ``none`` (``x`` itself) and ``crop_flip`` (with
    channels-last strides), float32 on the 0-255 scale for ``rrc_flip``.
    Draws from ``generator`` exactly as :func:`augment_batch` does, so a loader
    can convert and normalise afterwards in one pass."""
    if kind == "none":
        return x
    if kind == "crop_flip":
        return random_crop_flip(x, 4, generator)
    if kind == "rrc_flip":
        return random_resized_crop_flip(x, None, (0.1, 1.0), (0.8, 1.25), generator)
    raise ValueError(f"augment={kind!r} is unknown; allowed: {AUGMENTATIONS}")


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the named augmentation (one of :data:`AUGMENTATIONS`) to a uint8
    batch (B, C, H, W); returns float32 on the 0-255 scale."""
    return augment_pixels(x, kind, generator).to(torch.float32)
