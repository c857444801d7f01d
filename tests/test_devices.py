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
