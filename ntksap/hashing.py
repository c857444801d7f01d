"""Tensor hashing: one SHA-256 digest of named tensors, for caches, fingerprints and checks.

:func:`tensor_digest` is what the dataset caches store as their checksum
(:mod:`ntksap.data`), what a training run's fingerprint is built from
(:mod:`ntksap.train`) and what the ranks of a distributed run compare to agree
on their masks (:mod:`ntksap.distributed`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (64 hex digits) of ``tensors`` (name -> tensor), in sorted name
    order: for each, ``repr((name, shape, dtype))`` and then its bytes (on the
    CPU, contiguous). Equal names, shapes, dtypes and values give equal digests
    on every device and process; a change to any of them changes the digest."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping name -> tensor, got {type(tensors).__name__}")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        h.update(repr((str(name), tuple(t.shape), str(t.dtype))).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
    return h.hexdigest()
