"""Memory accounting for autograd: how many bytes the graphs alive at once
keep for the backward pass (the "activations"), on any device.

    with SavedTensorMeter() as meter:
        ntksap.prune(model, "ntksap", 0.9, input_shape=(3, 224, 224), num_samples=512, batch_size=256)
    meter.peak_bytes      # the most saved-for-backward bytes alive at one time
    meter.total_bytes     # everything ever saved (grows with the number of mini-batches)

A tensor saved by several graph nodes (or several views of one storage) is
counted once, by its storage size, while any of them is alive.
"""

from __future__ import annotations

import torch


class _Held:
    """One saved tensor as autograd keeps it; its death releases the count."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: "SavedTensorMeter", key: tuple, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager (``torch.autograd.graph.saved_tensors_hooks``) that
    tracks the bytes of tensors saved for backward: ``live_bytes`` now,
    ``peak_bytes`` at most, ``total_bytes`` ever saved (each storage once per
    time it becomes alive)."""

    def __init__(self):
        self.live_bytes = self.peak_bytes = self.total_bytes = 0
        self._refs: dict[tuple, list[int]] = {}     # storage key -> [references, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> _Held:
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [1, storage.nbytes()]
            self.live_bytes += storage.nbytes()
            self.total_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[0] += 1
        return _Held(self, key, t)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key: tuple) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[key]
            self.live_bytes -= entry[1]

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
