"""DeviceLoader: prefetched (background thread) batches equal the plain ones
bit for bit, and both equal the original formula (augment as float32, then
``* scale + shift``)."""

import pytest
import torch

from ntksap import augment, data


def _bundle(name="cifar10", c=3, hw=32, n=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return data.from_tensors(name, x, y, x[:23], y[:23])


def _reference_epoch(loader: data.DeviceLoader, epoch: int):
    """The batches as DeviceLoader made them before the uint8 path: float32 0-255, then scale and shift."""
    images, labels = loader.bundle.on_device(loader.split, loader.device)
    g = loader._generator(epoch, loader.device)
    order = torch.randperm(len(labels), generator=g) if loader.shuffle else None
    fmt = torch.channels_last if loader.channels_last else torch.contiguous_format
    out, b = [], loader.batch_size
    for i in range(len(loader)):
        if order is None:
            x, y = images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b]
        else:
            idx = order[i * b:(i + 1) * b]
            x, y = images.index_select(0, idx), labels.index_select(0, idx)
        x = augment.augment_batch(x, loader.augment, g)
        out.append((x.contiguous(memory_format=fmt).mul_(loader._scale).add_(loader._shift), y))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape
        assert torch.equal(xa.view(torch.int32), xb.view(torch.int32))      # bit for bit
        assert xa.stride() == xb.stride()
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("augment", ["crop_flip", "rrc_flip", "none"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_prefetched_batches_equal_plain_and_reference(augment, channels_last):
    b = _bundle()
    kw = dict(batch_size=16, seed=5, device="cpu", augment=augment, channels_last=channels_last)
    plain = data.DeviceLoader(b, "train", prefetch=0, **kw)
    ahead = data.DeviceLoader(b, "train", prefetch=2, **kw)
    assert plain.prefetch == 0 and ahead.prefetch == 2
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        ahead.set_epoch(epoch)
        p, a = list(plain), list(ahead)
        _same(p, a)
        _same(p, _reference_epoch(plain, epoch))
        if channels_last:
            assert a[0][0].is_contiguous(memory_format=torch.channels_last)


def test_prefetched_test_split_and_one_channel():
    b = _bundle("digits", c=1, hw=8, n=40)
    for split in ("train", "test"):
        kw = dict(batch_size=7, seed=1, device="cpu", channels_last=True, augment=False)
        p = list(data.DeviceLoader(b, split, prefetch=0, **kw))
        _same(p, list(data.DeviceLoader(b, split, prefetch=1, **kw)))
        _same(p, _reference_epoch(data.DeviceLoader(b, split, **kw), 0))


def test_prefetch_stops_early_and_reports_errors(monkeypatch):
    b = _bundle(n=200)
    loader = data.DeviceLoader(b, "train", batch_size=8, seed=0, device="cpu", prefetch=2)
    it = iter(loader)
    first = next(it)
    it.close()                                   # stops the thread; the next pass is epoch 1
    again = data.DeviceLoader(b, "train", batch_size=8, seed=0, device="cpu", prefetch=0)
    _same([first], [next(iter(again))])
    assert data.DeviceLoader(b, "train", device="cpu").prefetch == 0     # default on a CPU
    with pytest.raises(ValueError, match="prefetch=-1"):
        data.DeviceLoader(b, "train", prefetch=-1)

    def boom(*a, **k):
        raise RuntimeError("augmentation failed")

    monkeypatch.setattr(data, "augment_pixels", boom)
    with pytest.raises(RuntimeError, match="augmentation failed"):
        list(data.DeviceLoader(b, "train", batch_size=8, device="cpu", prefetch=1))
