"""Device resolution (ntksap.devices.resolve_device), the one used by every ``device=`` argument."""

import pytest
import torch

import ntksap
from ntksap import data
from ntksap.devices import resolve_device
from conftest import TinyConvBN


def test_none_picks_cuda_when_available_and_names_are_taken_as_they_are():
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu7", "", True, 2.5, object()])
def test_a_value_that_is_no_device_is_refused_naming_device(bad):
    with pytest.raises(ValueError, match=r"device=.* is not allowed; allowed: None .*'cpu', 'cuda'"):
        resolve_device(bad)


def test_a_cuda_device_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0", 0):
        with pytest.raises(ValueError, match=r"device=.* is not allowed here: CUDA is not available"):
            resolve_device(dev)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:2' is not allowed here: this machine has 2 CUDA"):
        resolve_device("cuda:2")


def test_every_device_argument_is_resolved_here():
    bundle = data.from_tensors("digits", torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 10,
                               torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.arange(10))
    for call in (lambda: data.prune_batches(bundle, per_class=1, device="gpu7"),
                 lambda: data.DeviceLoader(bundle, "train", batch_size=4, num_workers=0, device="gpu7"),
                 lambda: ntksap.prune(TinyConvBN(), "random", 0.5, input_shape=(2, 6, 6), device="gpu7",
                                      progress=False)):
        with pytest.raises(ValueError, match=r"device='gpu7' is not allowed"):
            call()


def test_native_bf16_on_this_cpu_matches_its_instruction_flags():
    from pathlib import Path

    from ntksap.devices import native_bf16
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), []))
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert native_bf16(torch.device("meta")) is False


def test_channels_last_is_refused_only_for_strided_1x1_convs_on_a_cpu_without_avx512(monkeypatch):
    from torch import nn

    from ntksap.devices import channels_last_is_safe
    shortcut = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 8, 1, stride=2))
    plain = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.Conv2d(4, 8, 1))
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not channels_last_is_safe(shortcut, cpu)
    assert channels_last_is_safe(plain, cpu)
    assert channels_last_is_safe(shortcut, torch.device("meta"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert channels_last_is_safe(shortcut, cpu)


def test_default_scoring_layout_follows_the_rule(monkeypatch):
    """On an AVX2 CPU a model with a strided 1x1 conv scores in NCHW by default
    (the layout torch corrupts the heap in is never used); an explicit
    channels_last still wins; other models keep channels-last."""
    from torch import nn

    from ntksap import params, train
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")

    from ntksap import pruning
    real = pruning.ScoreContext
    seen = []

    def spy(*a, **kw):
        seen.append(kw["channels_last"])
        return real(*a, **kw)
    monkeypatch.setattr(pruning, "ScoreContext", spy)

    def layouts(model, **kw):
        """The layout ``prune`` scored ``model`` in."""
        seen.clear()
        ntksap.prune(model, "synflow", 0.5, input_shape=(2, 6, 6), progress=False, apply=False, **kw)
        return seen

    def net(stride):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1, stride=stride),
                             nn.Flatten(), nn.Linear(36 if stride == 2 else 144, 3))
    assert layouts(net(2)) == [False]
    assert layouts(net(2), channels_last=True) == [True]
    assert layouts(net(1)) == [True]
    assert train._execution(params.protocol("digits"), torch.device("cpu"))["channels_last"]
