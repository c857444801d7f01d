import math

import pytest
import torch
from torch import nn

import ntksap


@pytest.mark.parametrize("name,classes,shape", [
    ("digits_cnn", 10, (1, 8, 8)), ("resnet20", 10, (3, 32, 32)), ("vgg16_bn", 100, (3, 32, 32)),
    ("resnet18_tiny", 200, (3, 64, 64)), ("resnet18_imagenet_stem", 200, (3, 64, 64)), ("resnet18", 1000, (3, 64, 64)),
    ("resnet50", 1000, (3, 64, 64)),
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


def test_the_imagenet_stem_resnet18_differs_from_resnet18_tiny_only_in_the_stem():
    """``resnet18_imagenet_stem``: the ResNet-18 the authors' README builds for
    Tiny-ImageNet (7x7 stride-2 conv, max-pool), with our 200 outputs."""
    stem = ntksap.build_model("resnet18_imagenet_stem", 200)
    tiny = ntksap.build_model("resnet18_tiny", 200)
    assert stem.conv1.kernel_size == (7, 7) and stem.conv1.stride == (2, 2) and stem.conv1.padding == (3, 3)
    assert isinstance(stem.maxpool, nn.MaxPool2d) and stem.maxpool.kernel_size == 3 and stem.maxpool.stride == 2
    assert ntksap.default_input_shape("resnet18_imagenet_stem") == (3, 64, 64) and stem.fc.out_features == 200
    a, b = stem.state_dict(), tiny.state_dict()
    assert list(a) == list(b)
    assert [k for k in a if a[k].shape != b[k].shape] == ["conv1.weight"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(stem) - count(tiny) == 64 * 3 * (7 * 7 - 3 * 3)  # the stem's weights, nothing else
    prunable = lambda m: sum(p.numel() for p in ntksap.prunable_parameters(m).values())  # noqa: E731
    assert prunable(stem) - prunable(tiny) == 64 * 3 * (7 * 7 - 3 * 3)
    trunk = lambda m: nn.Sequential(*list(m.children())[:-2]).eval()  # noqa: E731 (all but avgpool and fc)
    with torch.no_grad():  # the stem shrinks 64x64 inputs 4x: layer4 works on 2x2 maps instead of 8x8
        x = torch.randn(1, 3, 64, 64)
        assert trunk(stem)(x).shape == (1, 512, 2, 2) and trunk(tiny)(x).shape == (1, 512, 8, 8)


def test_the_imagenet_stem_named_set_composes_and_validates(tmp_path, capsys):
    from ntksap import config, params

    name = "tiny_imagenet_resnet18_imagenet_stem"
    assert name in config.experiment_sets()
    out = tmp_path / "params.yaml"
    assert config.main(["compose", name, "-o", str(out)]) == 0
    assert config.main(["check", str(out)]) == 0
    assert f"experiment '{name}': tiny_imagenet/resnet18_imagenet_stem" in capsys.readouterr().out
    p = params.load_params(out)
    assert p.experiment == name and p.model == "resnet18_imagenet_stem" and p.dataset == "tiny_imagenet"
    ours, default = config.compose(name), config.compose("tiny_imagenet_resnet18")
    assert default["model"] == "resnet18_tiny"  # the default Tiny-ImageNet model stays PAPER.md section 4's
    assert {k: v for k, v in ours.items() if k not in ("experiment", "model")} == \
        {k: v for k, v in default.items() if k not in ("experiment", "model")}  # the same protocol otherwise


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
