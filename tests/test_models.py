import math

import pytest
import torch
from torch import nn

import ntksap


@pytest.mark.parametrize("name,classes,shape", [
    ("digits_cnn", 10, (1, 8, 8)), ("resnet20", 10, (3, 32, 32)), ("vgg16_bn", 100, (3, 32, 32)),
    ("resnet18_tiny", 200, (3, 64, 64)), ("resnet18", 1000, (3, 64, 64)), ("resnet50", 1000, (3, 64, 64)),
])
def test_models_build_and_output_the_classes(name, classes, shape):
    model = ntksap.build_model(name, num_classes=classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)


def test_architecture_facts():
    r20 = ntksap.build_model("resnet20")
    n = sum(p.numel() for p in ntksap.prunable_parameters(r20).values())
    assert 0.26e6 < n < 0.28e6  # PAPER.md: ~0.27 M prunable weights
    assert len(ntksap.prunable_parameters(r20)) == 22  # 19 convs + 2 shortcuts + fc
    vgg = ntksap.build_model("vgg16_bn", 100)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is not None for c in convs)
    assert vgg.fc.in_features == 512
    tiny = ntksap.build_model("resnet18_tiny", 200)
    assert tiny.conv1.stride == (1, 1) and tiny.conv1.kernel_size == (3, 3) and isinstance(tiny.maxpool, nn.Identity)
    assert ntksap.default_input_shape("digits_cnn") == (1, 8, 8)


def test_paper_initialisation():
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20")
    w = model.blocks[6].conv2.weight  # 64x64x3x3, fan_in 576
    assert w.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.02)
    assert torch.all(model.bn.weight == 1) and torch.all(model.bn.bias == 0)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match=r"model='resnet21' is unknown; allowed: \["):
        ntksap.build_model("resnet21")
    with pytest.raises(ValueError, match="num_classes=0"):
        ntksap.build_model("resnet20", num_classes=0)
