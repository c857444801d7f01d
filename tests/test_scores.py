"""Every score function against an independent naive computation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from ntksap.masks import Masks
from ntksap.models import kaiming_init
from ntksap.scores import (ScoreContext, grasp_scores, magnitude_scores, ntksap_batch_mask_grad, snip_scores,
                           synflow_l2_scores, synflow_scores)
from conftest import TinyConvBN, TinyMLP
from reference import ntksap_batch_grad_reference

CPU = torch.device("cpu")


def ones(model):
    return Masks.ones_like(model)


def some_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(p.shape, generator=g) < 0.7).float()
                  for n, p in ntksap.prunable_parameters(model).items()})


def loss_at(model, masks, data):
    """Sum over batches of the mean cross-entropy of the masked model (eval mode)."""
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in masks:
                p.mul_(masks[n])
        return sum(F.cross_entropy(net(x), y) for x, y in data)


def test_snip_matches_finite_difference_in_the_mask():
    torch.manual_seed(0)
    model = TinyConvBN().double().eval()
    data = [(torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(2)]
    masks = some_masks(model)
    ctx = ScoreContext(device=CPU, input_shape=(2, 6, 6), data=data)
    s = snip_scores(model, masks, ctx)
    h = 1e-6
    g = torch.Generator().manual_seed(1)
    for n in masks:
        for j in torch.randint(0, masks[n].numel(), (4,), generator=g).tolist():
            mp = {k: v.clone().double() for k, v in masks.items()}
            mm = {k: v.clone().double() for k, v in masks.items()}
            mp[n].view(-1)[j] += h
            mm[n].view(-1)[j] -= h
            fd = (loss_at(model, mp, data) - loss_at(model, mm, data)) / (2 * h)
            assert s[n].view(-1)[j].item() == pytest.approx(abs(fd.item()), rel=1e-5, abs=1e-9)


def test_grasp_matches_explicit_hessian_vector_product():
    torch.manual_seed(0)
    model = TinyMLP(d=4, h=5, k=3).double()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(2)]
    masks = ones(model)
    s = grasp_scores(model, masks, ScoreContext(device=CPU, input_shape=(4,), data=data))
    names = list(masks)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def total_loss(flat):
        ws = dict(zip(names, [c.reshape(sh) for c, sh in zip(flat.split(sizes), shapes)]))
        out = 0
        for x, y in data:
            hid = torch.tanh(x @ ws["fc1.weight"].T + params["fc1.bias"].detach())
            logits = hid @ ws["fc2.weight"].T + params["fc2.bias"].detach()
            out = out + F.cross_entropy(logits / 200.0, y)
        return out

    # explicit Hessian of the summed loss, explicit gradient
    H = torch.autograd.functional.hessian(total_loss, flat0)
    g = torch.autograd.functional.jacobian(total_loss, flat0)
    expected = flat0 * (H @ g)
    got = torch.cat([s[n].reshape(-1) for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-14)


def test_synflow_matches_closed_form_on_a_linear_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False))
    masks = some_masks(model, seed=2)
    s = synflow_scores(model, masks, ScoreContext(device=CPU, input_shape=(4,)))
    W = [np.abs(model[i].weight.detach().double().numpy()) * masks[f"{i}.weight"].double().numpy() for i in range(3)]
    for layer in range(3):
        left = np.ones(3)  # 1^T |W_L| ... |W_{l+1}|
        for k in range(2, layer, -1):
            left = left @ W[k]
        right = np.ones(4)  # |W_{l-1}| ... |W_1| 1
        for k in range(layer):
            right = W[k] @ right
        expected = W[layer] * np.outer(left, right)
        np.testing.assert_allclose(s[f"{layer}.weight"].numpy() * masks[f"{layer}.weight"].numpy(), expected,
                                   rtol=1e-12)


@pytest.mark.parametrize("name,shape", [("vgg16_bn", (3, 32, 32)), ("resnet50", (3, 224, 224))])
def test_synflow_does_not_overflow_on_deep_nets(name, shape):
    torch.manual_seed(0)
    model = ntksap.build_model(name, num_classes=100 if name == "vgg16_bn" else 1000)
    s = synflow_scores(model, ones(model), ScoreContext(device=CPU, input_shape=shape))
    flat = torch.cat([v.reshape(-1) for v in s.values()])
    assert torch.isfinite(flat).all() and flat.max() > 0


def test_magnitude_is_abs_theta(tiny_conv):
    s = magnitude_scores(tiny_conv, ones(tiny_conv), ScoreContext(device=CPU, input_shape=(2, 6, 6)))
    for n, p in ntksap.prunable_parameters(tiny_conv).items():
        assert torch.equal(s[n], p.detach().abs())


@pytest.mark.parametrize("bn_mode,statistics", [("unperturbed", "one_pass"), ("unperturbed_two_pass", "two_pass")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ntksap_batch_gradient_matches_two_model_reference(channels_last, bn_mode, statistics):
    torch.manual_seed(0)
    model = TinyConvBN()
    scratch = copy.deepcopy(model)
    scratch.apply(kaiming_init)
    theta = {n: p.detach().clone() for n, p in scratch.named_parameters()}
    masks = some_masks(model, seed=4)
    z = torch.randn(7, 2, 6, 6)
    delta = {n: 0.01 * torch.randn(masks[n].shape) for n in masks}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    fmt = (lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t) if channels_last \
        else (lambda t: t)
    got = ntksap_batch_mask_grad(model, {n: fmt(t) for n, t in theta.items()}, buffers,
                                 {n: fmt(t) for n, t in masks.items()}, fmt(z), {n: fmt(t) for n, t in delta.items()},
                                 bn_mode)
    ref = ntksap_batch_grad_reference(model, theta, masks, z, delta, statistics)
    for n in masks:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5 * ref[n].abs().max().item())
    # the model itself is untouched: same weights, buffers, BN momentum and mode
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert model.bn1.momentum == 0.1 and model.training


def test_ntksap_gradient_is_derivative_of_squared_output_difference():
    """Finite difference of the eq. 10 objective in one mask entry (float64, BN statistics held fixed)."""
    torch.manual_seed(0)
    model = TinyMLP(d=4, h=6, k=3).double()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: torch.ones_like(p) for n, p in ntksap.prunable_parameters(model).items()}
    z = torch.randn(5, 4, dtype=torch.float64)
    delta = {n: 0.01 * torch.randn_like(masks[n]) for n in masks}
    g = ntksap_batch_mask_grad(model, theta, {}, masks, z, delta)

    def objective(m):
        def f(w):
            return torch.tanh(z @ w["fc1.weight"].T + theta["fc1.bias"]) @ w["fc2.weight"].T + theta["fc2.bias"]
        wu = {n: theta[n] * m[n] for n in m}
        wp = {n: (theta[n] + delta[n]) * m[n] for n in m}
        return ((f(wu) - f(wp)) ** 2).sum().item()

    h = 1e-5
    for n in masks:
        for j in (0, 3, masks[n].numel() - 1):
            mp = {k: v.clone() for k, v in masks.items()}
            mm = {k: v.clone() for k, v in masks.items()}
            mp[n].view(-1)[j] += h
            mm[n].view(-1)[j] -= h
            fd = (objective(mp) - objective(mm)) / (2 * h)
            assert g[n].view(-1)[j].item() == pytest.approx(fd, rel=1e-4, abs=1e-12)


class TwoNames(nn.Module):
    """One Linear registered under two names (``a`` and ``b``), called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = self.a
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.b(self.bn(torch.relu(self.a(x))))))


@pytest.mark.parametrize("method", ["iterative_snip", "grasp", "ntksap", "synflow"])
def test_scoring_leaves_a_module_under_two_names_as_it_was(method):
    """Every score function runs the network through ntksap.functional.call, which
    swaps each parameter slot once: the model keeps its own parameter objects and
    values (functional_call's tie_weights=True used to leave a scored copy behind)."""
    torch.manual_seed(0)
    model = TwoNames()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    ntksap.prune(model, method, 0.5, input_shape=(5,), data=data, iterations=3, rounds=1, num_samples=8,
                 batch_size=4, apply=False, progress=False)
    assert model.b is model.a
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p.detach(), before[n][1]), n


def test_synflow_l2_matches_closed_form_on_a_linear_network_with_biases():
    """R = 1^T (W3^2 (W2^2 (W1^2 1 + b1^2) + b2^2) + b3^2): the score of W_l is
    W_l^2 * dR/d(W_l^2) = W_l^2 * outer(1^T W_L^2 ... W_{l+1}^2, h_{l-1}), h the
    squared network's activations on the all-ones input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    masks = some_masks(model, seed=3)
    s = synflow_l2_scores(model, masks, ScoreContext(device=CPU, input_shape=(4,)))
    layers = [model[0], model[2], model[4]]
    W = [(m.weight.detach().double() * masks[f"{i}.weight"].double()).numpy() ** 2 for m, i in zip(layers, (0, 2, 4))]
    b = [m.bias.detach().double().numpy() ** 2 for m in layers]
    h = [np.ones(4)]
    for k in range(3):
        h.append(W[k] @ h[-1] + b[k])
    for layer, i in zip(range(3), (0, 2, 4)):
        left = np.ones(3)
        for k in range(2, layer, -1):
            left = left @ W[k]
        expected = W[layer] * np.outer(left, h[layer])
        got = s[f"{i}.weight"].numpy() * masks[f"{i}.weight"].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def erk_closed_form(shapes, density):
    """Kept weights per layer under ERK (RigL's sparse_utils): densities
    eps * sum(shape) / prod(shape), eps solving the total, layers whose density
    would exceed 1 made dense and eps solved again over the rest."""
    n = {k: int(np.prod(s)) for k, s in shapes.items()}
    raw = {k: sum(s) / n[k] for k, s in shapes.items()}
    total, dense = density * sum(n.values()), set()
    while True:
        free = [k for k in shapes if k not in dense]
        eps = (total - sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in free)
        over = [k for k in free if eps * raw[k] > 1]
        if not over:
            return {k: n[k] if k in dense else eps * raw[k] * n[k] for k in shapes}
        dense.update(over)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_random_erk_keeps_the_erk_layer_densities(sparsity):
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20")
    masks = ntksap.prune(model, "random_erk", sparsity, input_shape=(3, 32, 32), progress=False, apply=False)
    expected = erk_closed_form({n: tuple(m.shape) for n, m in masks.items()}, 1 - sparsity)
    assert sparsity > 0.6 or any(expected[n] == masks[n].numel() for n in masks)  # a dense layer at 50 %
    for n, m in masks.items():
        assert abs(m.sum().item() - expected[n]) <= 1.0 + 1e-6, n


def test_random_erk_is_seeded_and_uniform_within_a_layer():
    model = ntksap.build_model("resnet20")
    kw = dict(input_shape=(3, 32, 32), progress=False, apply=False)
    a = ntksap.prune(model, "random_erk", 0.9, seed=1, **kw)
    b = ntksap.prune(model, "random_erk", 0.9, seed=1, **kw)
    c = ntksap.prune(model, "random_erk", 0.9, seed=2, **kw)
    assert all(torch.equal(a[n], b[n]) for n in a)
    w = "blocks.8.conv1.weight"
    assert not torch.equal(a[w], c[w]) and a[w].sum() == c[w].sum()
    # kept positions spread over the layer: each quarter holds about a quarter of them
    quarters = a[w].reshape(4, -1).sum(1)
    assert (quarters - quarters.mean()).abs().max() < 4 * quarters.mean().sqrt() + 1
