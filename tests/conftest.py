import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # for `import reference`

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class TinyConvBN(nn.Module):
    """Conv-BN-ReLU x2 with a stride, a residual-free head: input (2, 6, 6), 3 outputs."""

    def __init__(self, k=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TinyMLP(nn.Module):
    def __init__(self, d=5, h=7, k=3, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias)
        self.fc2 = nn.Linear(h, k, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def image_folders(root: Path, counts: dict[str, int], size=(40, 300), ext: str = ".JPEG", seed: int = 0) -> Path:
    """Random RGB images of random sizes as ``root/<split>/<class>/<j><ext>``
    for the ImageNet layout tests; ``counts``: split -> images per class
    (classes n01, n02, n03)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in ("n01", "n02", "n03"):
            for j in range(n):
                h, w = rng.integers(*size, size=2)
                path = root / split / c / f"{j}{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return root


@pytest.fixture
def one_thread():
    """The nets of the training tests are tiny: one thread is fastest, and it does
    not collapse when the two shared cores are busy (OpenMP threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_conv():
    torch.manual_seed(0)
    return TinyConvBN()


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


def sigkill_after_epochs(cmd: list[str], env: dict, history: Path, epochs: int = 2, timeout: float = 240) -> None:
    """Start ``cmd`` and SIGKILL it once ``history`` (a trainer's history.csv)
    holds ``epochs`` rows; asserts it was still running and was killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if history.exists() and len(history.read_text().strip().splitlines()) >= epochs + 1:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
