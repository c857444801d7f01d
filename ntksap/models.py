"""The paper's networks (PAPER.md section 4) and a small net for the quick
``digits`` experiment, behind one registry: ``build_model(name, num_classes)``.

All are initialised as in the paper (:func:`kaiming_init`): Kaiming-normal
conv/linear weights (fan-in, gain sqrt 2), BatchNorm weight 1 and bias 0,
conv/linear biases left at PyTorch's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from .masks import PRUNABLE_TYPES


def kaiming_init(module: nn.Module) -> None:
    """The paper's initialisation, for ``model.apply``: Kaiming-normal weights
    (fan_in, gain sqrt 2) for Conv/Linear, weight 1 / bias 0 for BatchNorm.

    NTK-SAP re-draws weights with this function for every noise mini-batch.
    """
    if isinstance(module, nn.Linear) and module.weight.dim() == 3:  # K linear layers (ntksap.stacked.BatchedLinear)
        for weight in module.weight:                                   # each from its own fan-in
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
    elif isinstance(module, PRUNABLE_TYPES):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    elif isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- CIFAR ResNet-20 (the "lottery ticket" variant) --------------------------------
class BasicBlock(nn.Module):
    def __init__(self, f_in: int, f_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        if stride != 1 or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(f_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6D+2) for 32x32 inputs: 3x3 stem, 3 stages of D basic blocks with
    widths W, 2W, 4W, global average pool, linear classifier."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not 6D+2")
        blocks_per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, f_in = [], width
        for stage, f_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(f_in, f_out, stride=2 if stage > 0 and b == 0 else 1))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(f_in, num_classes)

    def forward(self, x):
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# -- CIFAR VGG-16 with BatchNorm --------------------------------------------------
VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    """VGG with BN for 32x32 inputs: 3x3 conv (with bias) + BN + ReLU per plan
    entry, 2x2 max-pool at each "M", 2x2 average pool, linear 512 -> classes."""

    def __init__(self, plan=VGG16_PLAN, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


# -- the quick experiment's small net (8x8, one channel) ------------------------------
class DigitsNet(nn.Module):
    """Small conv net with BatchNorm for 8x8 one-channel images (the ``digits``
    dataset): 3 conv-BN-ReLU layers (16, 32, 64 channels; one 2x2 max-pool),
    global average pool, linear classifier. 24k prunable weights."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# -- torchvision ResNets -------------------------------------------------------------
def _resnet18_tiny(num_classes: int) -> nn.Module:
    """torchvision ResNet-18 for 64x64 Tiny-ImageNet with a 3x3 stride-1 stem and
    no max-pool (PAPER.md section 4; the authors' unused ``tinyimagenet_resnet``):
    layer1 sees 64x64 maps, layer4 8x8. Our default Tiny-ImageNet model; see
    :func:`_resnet18_imagenet_stem` for the one the authors' README runs."""
    import torchvision  # imported lazily: it costs seconds at every notebook start

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _resnet18_imagenet_stem(num_classes: int) -> nn.Module:
    """torchvision ResNet-18 unchanged, with the ImageNet stem (7x7 stride-2
    conv, 3x3 stride-2 max-pool), for 64x64 Tiny-ImageNet: what the authors'
    README builds for Tiny-ImageNet (``--model-class imagenet``; PAPER.md
    section 3, "Tiny-ImageNet model"). The stem shrinks 64x64 inputs 4x, so
    layer1 sees 16x16 maps and layer4 2x2. Differs from :func:`_resnet18_tiny`
    only in ``conv1`` (7x7x3x64 instead of 3x3x3x64 weights) and the max-pool;
    the same network as ``resnet18``, registered for 64x64 inputs.
    Theirs keeps 1000 outputs (its ``num_classes`` is not passed on), 800 of
    them never a label; ours has ``num_classes`` (200 for Tiny-ImageNet)."""
    return _torchvision("resnet18", num_classes)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    """A torchvision ImageNet architecture (imported lazily)."""
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, int, int]]] = {
    # name: (constructor(num_classes), default input shape)
    "digits_cnn": (lambda k: DigitsNet(num_classes=k), (1, 8, 8)),
    "resnet20": (lambda k: CifarResNet(20, 16, num_classes=k), (3, 32, 32)),
    "vgg16_bn": (lambda k: CifarVGG(VGG16_PLAN, num_classes=k), (3, 32, 32)),
    "resnet18_tiny": (_resnet18_tiny, (3, 64, 64)),
    "resnet18_imagenet_stem": (_resnet18_imagenet_stem, (3, 64, 64)),
    "resnet18": (lambda k: _torchvision("resnet18", k), (3, 224, 224)),
    "resnet50": (lambda k: _torchvision("resnet50", k), (3, 224, 224)),
}


def build_model(name: str, num_classes: int = 10, init: Callable[[nn.Module], None] | None = kaiming_init) -> nn.Module:
    """A freshly initialised model from the registry :data:`MODELS`.

    ``init`` is applied with ``model.apply`` (default: the paper's
    :func:`kaiming_init`; ``None`` keeps the constructor's own).
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; allowed: {sorted(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    model = MODELS[name][0](num_classes)
    if init is not None:
        model.apply(init)
    return model


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The (C, H, W) input shape a registered model is built for."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; allowed: {sorted(MODELS)}")
    return MODELS[name][1]
