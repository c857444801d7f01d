import json
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import ntksap
from ntksap.masks import Masks, apply_masks, enforce_masks_after_step, from_torch_prune, layer_flops, to_torch_prune
from conftest import TinyConvBN


def half_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(p.shape, generator=g) < 0.5).float()
                  for n, p in ntksap.prunable_parameters(model).items()})


def test_prunable_set_is_conv_and_linear_weights_only(tiny_conv):
    names = set(ntksap.prunable_parameters(tiny_conv))
    assert names == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert set(ntksap.prunable_parameters(tiny_conv, exclude=["fc"])) == {"conv1.weight", "conv2.weight"}
    assert set(ntksap.prunable_parameters(tiny_conv, exclude=["conv*"])) == {"fc.weight"}
    # ResNet-20: 1x1 shortcut convs and the classifier are prunable, BN never
    names = set(ntksap.prunable_parameters(ntksap.build_model("resnet20")))
    assert "blocks.3.shortcut.0.weight" in names and "fc.weight" in names
    assert not any("bn" in n or n.endswith("bias") for n in names)


def test_masks_refuse_non_binary_and_count():
    m = Masks({"a": torch.tensor([1.0, 0.0, 1.0])})
    with pytest.raises(ValueError, match="only 0 and 1"):
        m["b"] = torch.tensor([0.5])
    with pytest.raises(TypeError):
        m["c"] = [1, 0]
    assert (m.kept, m.numel) == (2, 3)
    assert m.density == pytest.approx(2 / 3) and m.sparsity == pytest.approx(1 / 3)
    assert isinstance(m, dict)


def test_save_load_weights_only_and_summary(tmp_path, tiny_conv):
    m = half_masks(tiny_conv)
    path = tmp_path / "sub" / "mask.pt"
    m.save(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(m) and all(torch.equal(raw[n], m[n]) for n in m)
    back = Masks.load(path)
    assert isinstance(back, Masks) and all(torch.equal(back[n], m[n]) for n in m)
    summary = json.loads((tmp_path / "sub" / "mask.pt.json").read_text())
    assert summary["kept"] == m.kept
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_load_refuses_truncated_and_code_carrying_files(tmp_path, tiny_conv):
    m = half_masks(tiny_conv)
    path = tmp_path / "mask.pt"
    m.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read masks"):
        Masks.load(tmp_path / "trunc.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ValueError, match="cannot read masks"):
        Masks.load(tmp_path / "evil.pt")


def test_report_counts_and_flops_by_hand(tiny_conv):
    m = half_masks(tiny_conv)
    df = m.report(tiny_conv, (2, 6, 6))
    total = df.iloc[-1]
    assert total["name"] == "total" and total["kept"] == m.kept and total["numel"] == m.numel
    row = df.set_index("name").loc["conv2.weight"]
    # conv2: stride 2 on 6x6 with padding 1 -> 3x3 outputs; one MAC per kept weight per position
    assert row["flops_dense"] == 9 * 4 * 3 * 3 * 3
    assert row["flops"] == 9 * int(m["conv2.weight"].sum())
    fc = df.set_index("name").loc["fc.weight"]
    assert fc["flops_dense"] == 12 and fc["flops"] == int(m["fc.weight"].sum())
    assert total["flops"] == df.iloc[:-1]["flops"].sum()
    assert df.set_index("name").loc["conv1.weight", "density"] == pytest.approx(m["conv1.weight"].mean().item())


def test_apply_masks_zeroes_and_checks_shapes(tiny_conv):
    m = half_masks(tiny_conv)
    apply_masks(tiny_conv, m)
    for n, p in ntksap.prunable_parameters(tiny_conv).items():
        assert torch.all(p[m[n] == 0] == 0)
    with pytest.raises(ValueError, match="not a parameter"):
        apply_masks(tiny_conv, {"nope.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(tiny_conv, {"fc.weight": torch.ones(2, 2)})


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd_momentum_wd", "sgd_nesterov", "adam", "adamw"])
def test_pruned_weights_stay_exactly_zero_for_50_steps(make_opt):
    torch.manual_seed(1)
    model = TinyConvBN()
    m = half_masks(model, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_masks(model, m)
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in ntksap.prunable_parameters(model).items():
        assert torch.all(p[m[n] == 0] == 0), n
        assert not torch.equal(p[m[n] == 1], before[n][m[n] == 1]), f"{n} did not train"


def test_enforce_after_step_handles_any_optimizer(tiny_conv):
    m = half_masks(tiny_conv)
    apply_masks(tiny_conv, m, hooks=False)
    opt = torch.optim.SGD(tiny_conv.parameters(), lr=0.1)
    enforce_masks_after_step(opt, tiny_conv, m)
    tiny_conv(torch.randn(4, 2, 6, 6)).sum().backward()  # unmasked gradients
    opt.step()
    for n, p in ntksap.prunable_parameters(tiny_conv).items():
        assert torch.all(p[m[n] == 0] == 0)


def test_torch_prune_round_trip(tiny_conv):
    m = half_masks(tiny_conv)
    x = torch.randn(3, 2, 6, 6)
    tiny_conv.eval()
    ref = tiny_conv(x)
    to_torch_prune(tiny_conv, m)
    assert "conv1.weight_orig" in dict(tiny_conv.named_parameters())
    assert torch.equal(dict(tiny_conv.named_buffers())["conv1.weight_mask"], m["conv1.weight"])
    masked_out = tiny_conv(x)
    assert not torch.allclose(masked_out, ref)
    back = from_torch_prune(tiny_conv)
    assert set(back) == set(m) and all(torch.equal(back[n], m[n]) for n in m)
    assert "conv1.weight" in dict(tiny_conv.named_parameters())
    torch.testing.assert_close(tiny_conv(x), masked_out)
    # masks built by torch's own pruning are read too
    fresh = TinyConvBN()
    tprune.l1_unstructured(fresh.fc, "weight", amount=0.5)
    got = from_torch_prune(fresh, remove=False)
    assert list(got) == ["fc.weight"] and got.kept == 6


def test_layer_flops_dense_resnet20():
    model = ntksap.build_model("resnet20")
    fl = layer_flops(model, (3, 32, 32))
    assert fl["conv.weight"][0] == 32 * 32 * 16 * 3 * 9
    assert fl["blocks.3.shortcut.0.weight"][0] == 16 * 16 * 32 * 16
    total = sum(d for d, _ in fl.values())
    assert 40e6 < total < 42e6  # ResNet-20 is ~41 M MACs


def test_shared_weight_is_listed_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert list(ntksap.prunable_parameters(model)) == ["0.weight"]
    apply_masks(model, Masks.ones_like(model))
