"""Tests of ntksap.ntk against an explicit loop of one autograd backward pass
per output unit (written here, independent of the module) on tiny networks."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from ntksap import ntk
from ntksap.masks import Masks, prunable_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny networks ------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyConvBN(nn.Module):
    """Conv-BN-ReLU(inplace), a strided conv with bias, a 1x1 conv + BN shortcut
    (ResNet style), global average pool, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(4)
        self.short = nn.Sequential(nn.Conv2d(2, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + self.short(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class OddNet(nn.Module):
    """Layers the fast rules do not cover: grouped conv, Conv1d, LayerNorm (generic
    per-module vjp), a Linear called twice, a module registered under two names,
    a weight tied between two modules and a parameter of the root module
    (whole-network vmap(jacrev)), a Linear on a 3-D input, BatchNorm1d, and a
    frozen parameter."""

    def __init__(self):
        super().__init__()
        self.gconv = nn.Conv2d(2, 4, 3, groups=2)
        self.bn2d = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.bn1d = nn.BatchNorm1d(4)
        self.pos = nn.Linear(4, 4)
        self.pos2 = nn.Linear(4, 4)
        self.pos2.weight = self.pos.weight  # a weight tied between two modules
        self.norm = nn.LayerNorm(8)
        self.shared = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8, 3)
        self.head.bias.requires_grad_(False)
        self.alias = self.head  # one module under two names (its weight has two owners)

    def forward(self, x):  # x: (n, 2, 6, 6)
        h = torch.tanh(self.bn2d(self.gconv(x))).mean(2)       # (n, 4, 4)
        h = torch.tanh(self.bn1d(self.conv1d(h)))               # (n, 4, 2)
        h = self.pos2(torch.tanh(self.pos(h.transpose(1, 2)))).flatten(1)  # (n, 8)
        h = self.norm(h)
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h * self.scale)


class InPlaceNet(nn.Module):
    """With ``inplace``, a module's input is changed in place after the module has
    run (autograd cannot differentiate that with respect to the weights, the NTK
    engine must still see the input as it was); without, the same function."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 3)
        self.inplace = True

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(h)
        h = h.mul_(2.0).tanh_() if self.inplace else torch.tanh(2.0 * h)
        return y + self.fc3(h)


class DeadBranchNet(nn.Module):
    """A leaf module that runs on every input but whose output never reaches the network's."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.dead = nn.Linear(5, 4)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        self.last_dead = self.dead(x)
        return self.fc2(torch.tanh(self.fc1(x)))


def make(kind: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model, shape = {"mlp": (TinyMLP, (5,)), "conv": (TinyConvBN, (2, 6, 6)), "odd": (OddNet, (2, 6, 6)),
                    "inplace": (InPlaceNet, (5,)), "dead": (DeadBranchNet, (5,))}[kind]
    model = model().to(dtype)
    for m in model.modules():  # non-trivial BN affine parameters and running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, *shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def random_masks(model, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())  # a tied weight is masked once, under its first name
    return Masks({n: (torch.rand(p.shape, generator=g) < density).float()
                  for n, p in prunable_parameters(model).items() if n in named})


# -- the independent reference ------------------------------------------------------------------
def loop_jacobian(model, x, masks=None, bn="eval", scope="all"):
    """J ((n*k) x P, row i*k + c) by one autograd backward pass per output unit,
    on a copy of the model whose masked weights are zeroed; masked columns zero."""
    masks = masks or {}
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in masks:
                p.mul_(masks[n].to(p))
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    if bn == "eval":  # running statistics := batch statistics of x (momentum 1, unbiased variance)
        for mod in bns:
            mod.reset_running_stats()
            mod.momentum = 1.0
        m.train()
        with torch.no_grad():
            m(x)
    m.eval()
    if bn == "train":
        for mod in bns:
            mod.train()
    prunable = set(prunable_parameters(model))
    names = [n for n, p in m.named_parameters() if p.requires_grad and (scope == "all" or n in prunable)]
    params = dict(m.named_parameters())
    rows = []

    def row(out_scalar, retain):
        grads = torch.autograd.grad(out_scalar, [params[n] for n in names], retain_graph=retain, allow_unused=True)
        parts = []
        for n, g in zip(names, grads):
            g = torch.zeros_like(params[n]) if g is None else g
            parts.append((g * masks[n].to(g) if n in masks else g).reshape(-1))
        return torch.cat(parts)

    if bn == "train":  # the batched function: every output depends on every input
        out = m(x).reshape(x.shape[0], -1)
        for i in range(out.shape[0]):
            for c in range(out.shape[1]):
                rows.append(row(out[i, c], True))
    else:
        for i in range(x.shape[0]):
            out = m(x[i:i + 1]).reshape(-1)
            for c in range(out.numel()):
                rows.append(row(out[c], c < out.numel() - 1))
    return torch.stack(rows)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- the matrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv", "odd"])
@pytest.mark.parametrize("bn", ["eval", "running", "train"])
def test_matches_backward_loop(kind, bn):
    model, x = make(kind)
    J = loop_jacobian(model, x, bn=bn)
    theta = ntk.empirical_ntk(model, x, bn=bn)
    assert theta.dtype == torch.float64 and theta.shape == (J.shape[0], J.shape[0])
    assert rel(theta, J @ J.T) < 1e-5
    assert float((theta - J @ J.T).abs().max()) < 1e-5 * float(theta.abs().max())


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_module_whose_output_is_unused(bn):
    """Its tap gets no gradient (autograd returns none): its Jacobian columns are zero, as the loop's."""
    model, x = make("dead")
    J = loop_jacobian(model, x, bn=bn)
    assert rel(ntk.empirical_ntk(model, x, bn=bn), J @ J.T) < 1e-10


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_callers_grad_mode_does_not_matter(bn):
    """The batched backward enables grad itself: under the caller's no_grad the matrix is the same."""
    model, x = make("conv")
    ref = ntk.empirical_ntk(model, x, bn=bn)
    with torch.no_grad():
        assert torch.equal(ntk.empirical_ntk(model, x, bn=bn), ref)


def test_ntk_does_not_import_dynamo():
    """The per-sample backward is autograd's batched grad, not torch.func.vjp (whose pullback
    imports torch._dynamo: 1.4 s of every prune stage's process that records an NTK)."""
    code = ("import sys, torch, ntksap; from ntksap import ntk; torch.manual_seed(0); "
            "x = torch.randn(4, 1, 8, 8); ntk.empirical_ntk(ntksap.build_model('digits_cnn', 10), x); "
            "ntk.empirical_ntk(ntksap.build_model('digits_cnn', 10), x, bn='train'); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False"]


def test_input_changed_in_place_after_the_module():
    model, x = make("inplace")
    twin = copy.deepcopy(model)
    twin.inplace = False
    J = loop_jacobian(twin, x)
    assert rel(ntk.empirical_ntk(model, x, chunk_size=2), J @ J.T) < 1e-12


def test_float32_matches_float32_loop():
    model, x = make("conv", torch.float32)
    J = loop_jacobian(model, x)
    assert rel(ntk.empirical_ntk(model, x), J @ J.T) < 1e-5


def test_resnet20_matches_loop():
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20", 10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    masks = random_masks(model, 0.3, seed=3)
    J = loop_jacobian(model, x, masks)
    theta = ntk.empirical_ntk(model, x, masks)
    assert theta.shape == (20, 20)
    assert rel(theta, J @ J.T) < 1e-10


@pytest.mark.parametrize("kind", ["conv", "odd"])
def test_symmetric_psd_and_trace_is_frobenius(kind):
    model, x = make(kind)
    theta = ntk.empirical_ntk(model, x)
    assert torch.equal(theta, theta.T)
    eig = torch.linalg.eigvalsh(theta)
    assert float(eig.min()) > -1e-10 * float(eig.max())
    J = loop_jacobian(model, x)
    assert math.isclose(float(theta.trace()), float(J.pow(2).sum()), rel_tol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "conv", "odd"])
def test_masked_weights_contribute_nothing(kind):
    model, x = make(kind)
    masks = random_masks(model, 0.5, seed=1)
    theta = ntk.empirical_ntk(model, x, masks)
    J = loop_jacobian(model, x, masks)
    assert rel(theta, J @ J.T) < 1e-10
    assert rel(theta, ntk.empirical_ntk(model, x)) > 1e-3  # the masks do matter
    # whatever values the masked weights hold, the NTK does not see them
    scrambled = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in scrambled.named_parameters():
            if n in masks:
                p.copy_(torch.where(masks[n].bool(), p, 100 * torch.randn_like(p)))
    assert rel(ntk.empirical_ntk(scrambled, x, masks), theta) < 1e-12
    # a plain dict of 0/1 tensors works as well
    assert rel(ntk.empirical_ntk(model, x, dict(masks)), theta) == 0


def test_all_masked_gives_no_weight_contribution():
    model, x = make("mlp")
    masks = {n: torch.zeros_like(p) for n, p in prunable_parameters(model).items()}
    theta = ntk.empirical_ntk(model, x, masks, params="prunable")
    assert float(theta.abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["conv", "odd"])
def test_prunable_scope(kind):
    model, x = make(kind)
    masks = random_masks(model, 0.6, seed=2)
    J = loop_jacobian(model, x, masks, scope="prunable")
    theta_p = ntk.empirical_ntk(model, x, masks, params="prunable")
    assert rel(theta_p, J @ J.T) < 1e-10
    rest = ntk.empirical_ntk(model, x, masks, params="all") - theta_p  # the other parameters' share
    assert float(torch.linalg.eigvalsh(rest).min()) > -1e-10 * float(theta_p.abs().max())
    assert float(rest.trace()) > 0


def test_chunk_sizes_agree():
    model, x = make("odd")
    ref = ntk.empirical_ntk(model, x)
    for chunk in (1, 2, 4, 100):
        assert rel(ntk.empirical_ntk(model, x, chunk_size=chunk), ref) < 1e-13
    ref_t = ntk.empirical_ntk(model, x, bn="train")
    assert rel(ntk.empirical_ntk(model, x, bn="train", chunk_size=3), ref_t) < 1e-13


def test_bn_modes_differ_and_eval_is_per_sample():
    model, x = make("conv")
    eval_ = ntk.empirical_ntk(model, x, bn="eval")
    assert rel(ntk.empirical_ntk(model, x, bn="train"), eval_) > 1e-3  # train mode couples the samples
    assert rel(ntk.empirical_ntk(model, x, bn="running"), eval_) > 1e-3
    # with fixed statistics, a sample's rows do not depend on the other samples
    full = ntk.empirical_ntk(model, x, bn="running")
    part = ntk.empirical_ntk(model, x[:3], bn="running")
    assert rel(full[:9, :9], part) < 1e-13


def _state(model):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "bn": [(m.momentum, m.track_running_stats) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


@pytest.mark.parametrize("train_mode", [True, False])
def test_model_is_not_modified(train_mode):
    model, x = make("odd")
    model.train(train_mode)
    before = _state(model)
    masks = random_masks(model, 0.5)
    for bn in ntk.BN_MODES:
        ntk.empirical_ntk(model, x, masks, bn=bn)
        ntk.ntk_trace_estimate(model, x, masks, draws=2, bn=bn)
    after = _state(model)
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    for key in ("training", "bn", "hooks", "requires_grad"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grads"])


# -- per-module Jacobian rules against the generic torch.func rule -----------------------------------
@pytest.mark.parametrize("mod, shape", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=True), (3, 9, 9)),
    (nn.Conv2d(3, 4, (1, 3), bias=False), (3, 4, 5)),
    (nn.Linear(4, 6), (4,)),
    (nn.Linear(4, 6), (3, 2, 4)),
    (nn.BatchNorm2d(3), (3, 4, 4)),
    (nn.BatchNorm1d(3), (3,)),
    (nn.BatchNorm1d(3), (3, 5)),
])
def test_fast_rules_match_generic(mod, shape):
    torch.manual_seed(0)
    mod = mod.double().eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
    rule = ntk._module_jacobian_fn(mod)
    assert rule is not ntk._jac_generic
    a = torch.randn(4, *shape, dtype=torch.float64)
    out_shape = mod(a).shape[1:]
    g = torch.randn(4, 3, *out_shape, dtype=torch.float64)
    local = {**dict(mod.named_parameters()), **dict(mod.named_buffers())}
    local = {k: v.detach() for k, v in local.items()}
    attrs = [n for n, _ in mod.named_parameters()]
    fast = rule(mod, attrs, a, g, local)
    slow = ntk._jac_generic(mod, attrs, a, g, local)
    for n in attrs:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-12, atol=1e-12)


# -- spectrum -----------------------------------------------------------------------------------
def test_spectrum():
    model, x = make("conv")
    spec = ntk.ntk_spectrum(model, x)
    J = loop_jacobian(model, x)
    ref = torch.linalg.eigvalsh(J @ J.T).flip(0)
    eig = spec["eigenvalues"]
    assert eig.dtype == torch.float64 and eig.shape == (15,)
    assert torch.all(eig[:-1] >= eig[1:])
    torch.testing.assert_close(eig, ref, rtol=1e-8, atol=1e-10 * float(ref[0]))
    assert math.isclose(spec["trace"], float(eig.sum()), rel_tol=1e-10)
    assert spec["max"] == float(eig[0]) and spec["min"] == float(eig[-1])
    assert math.isclose(spec["condition"], spec["max"] / spec["min"], rel_tol=1e-12)
    singular = ntk.spectrum_summary(torch.diag(torch.tensor([2.0, 0.0])))
    assert singular["condition"] == math.inf


# -- the finite-difference trace estimate -----------------------------------------------------------
def _draws(model, scope, draws, seed):
    """The documented draw sequence: CPU generator, one randn per parameter in
    scope (named_parameters order) per draw."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        out.append(torch.cat([torch.randn(p.shape, generator=g, dtype=p.dtype).reshape(-1)
                              for n, p in model.named_parameters() if n in scope]))
    return out


def test_trace_estimate_is_the_documented_quadratic_form():
    model, x = make("conv")
    masks = random_masks(model, 0.5, seed=4)
    J = loop_jacobian(model, x, masks)  # masked columns are zero, so J u = J (u * m)
    scope = [n for n, p in model.named_parameters() if p.requires_grad]
    q = sum(float((J @ u).pow(2).sum()) for u in _draws(model, scope, 6, seed=7)) / 6
    est = ntk.ntk_trace_estimate(model, x, masks, epsilon=1e-6, draws=6, seed=7)
    assert math.isclose(est, q, rel_tol=1e-5)


def test_trace_estimate_converges_to_exact_trace():
    model, x = make("mlp")
    J = loop_jacobian(model, x)
    exact = float(J.pow(2).sum())
    theta_fro = float((J @ J.T).norm())
    # epsilon: for a fixed set of draws the finite-difference error is O(epsilon) (the odd
    # third-order term cancels only in expectation): ~10x smaller per decade
    limit = ntk.ntk_trace_estimate(model, x, epsilon=1e-7, draws=32, seed=1)
    bias = [abs(ntk.ntk_trace_estimate(model, x, epsilon=e, draws=32, seed=1) - limit) for e in (1e-2, 1e-3, 1e-4)]
    assert bias[0] > 5 * bias[1] > 25 * bias[2] > 0
    # draws: the error falls like sqrt(2/draws) ||Theta||_F
    few = [abs(ntk.ntk_trace_estimate(model, x, epsilon=1e-4, draws=8, seed=s) - exact) for s in range(4)]
    many = ntk.ntk_trace_estimate(model, x, epsilon=1e-4, draws=4096, seed=0)
    sigma = math.sqrt(2 / 4096) * theta_fro
    assert sigma < 0.1 * exact
    assert abs(many - exact) < 4 * sigma
    assert abs(many - exact) < sum(few) / len(few)


def test_trace_estimate_bn_train_and_prunable():
    model, x = make("conv")
    J = loop_jacobian(model, x, bn="train", scope="prunable")
    exact = float(J.pow(2).sum())
    est = ntk.ntk_trace_estimate(model, x, epsilon=1e-5, draws=1024, seed=0, bn="train", params="prunable")
    assert abs(est - exact) < 4 * math.sqrt(2 / 1024) * float((J @ J.T).norm())
    assert math.isclose(ntk.ntk_trace_estimate(model, x, draws=4, batch_size=2),
                        ntk.ntk_trace_estimate(model, x, draws=4), rel_tol=1e-9)


# -- recording while pruning -------------------------------------------------------------------
def test_recorder_with_prune():
    model, x = make("conv", torch.float32)
    dense = copy.deepcopy(model)
    rec = ntk.SpectrumRecorder(model, x, every=2)
    rec.record(0)
    masks = ntksap.prune(model, "synflow", 0.6, input_shape=(2, 6, 6), iterations=4, callback=rec, progress=False)
    summary = rec.summary()
    assert list(summary.columns) == ["iteration", "density", "trace", "max", "min", "condition"]
    assert summary["iteration"].tolist() == [0, 2, 4]
    assert summary["density"].iloc[0] == 1.0
    assert summary["density"].is_monotonic_decreasing
    assert math.isclose(summary["density"].iloc[-1], masks.density)
    # the recorded spectrum is the NTK of the original weights times the masks
    final = ntk.ntk_spectrum(dense, x, masks)["eigenvalues"]
    torch.testing.assert_close(rec.spectra[4], final, rtol=1e-4, atol=1e-6 * float(final[0]))
    torch.testing.assert_close(rec.spectra[0], ntk.ntk_spectrum(dense, x)["eigenvalues"])
    frame = rec.frame()
    assert list(frame.columns) == ["iteration", "density", "index", "eigenvalue"]
    assert len(frame) == 3 * 15 and frame.groupby("iteration")["index"].max().tolist() == [14] * 3


def test_recorder_callback_and_rng_isolation():
    model, x = make("conv", torch.float32)
    rec = ntk.SpectrumRecorder(model, x, every=2, mode="trace", draws=3)
    state = torch.random.get_rng_state()
    masks = random_masks(model, 0.5)
    rec(3, masks, {})
    assert rec.records == []
    rec(4, masks, {})
    assert torch.equal(torch.random.get_rng_state(), state)
    row = rec.summary().iloc[0]
    assert row["iteration"] == 4 and math.isclose(row["density"], masks.density)
    assert math.isclose(row["trace"], ntk.ntk_trace_estimate(model, x, masks, draws=3), rel_tol=1e-12)
    assert math.isnan(row["max"])
    with pytest.raises(ValueError, match="mode='spectrum'"):
        rec.frame()


def test_recorder_does_not_change_pruning():
    def run(callback):
        model, _ = make("conv", torch.float32)
        return ntksap.prune(model, "ntksap", 0.5, input_shape=(2, 6, 6), iterations=2, rounds=1,
                            num_samples=8, callback=callback, progress=False, apply=False)

    model, x = make("conv", torch.float32)
    rec = ntk.SpectrumRecorder(model, x, mode="trace", draws=2)
    plain, recorded = run(None), run(rec)
    assert len(rec.records) == 2
    assert all(torch.equal(plain[n], recorded[n]) for n in plain)


def test_recorder_save(tmp_path):
    model, x = make("mlp", torch.float32)
    rec = ntk.SpectrumRecorder(model, x)
    rec.record(0)
    rec.record(1, random_masks(model, 0.5))
    rec.save(tmp_path / "ntk.csv")
    summary = pd.read_csv(tmp_path / "ntk.csv")
    spectra = pd.read_csv(tmp_path / "ntk_spectra.csv")
    assert summary["iteration"].tolist() == [0, 1]
    assert len(spectra) == 2 * 15
    pd.testing.assert_frame_equal(spectra, rec.frame(), check_dtype=False)


# -- frames and plots ---------------------------------------------------------------------------------
def test_spectra_frame_and_plot():
    from ntksap.figures.spectra import plot_spectra

    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("seaborn")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, x = make("conv")
    dense = ntk.ntk_spectrum(model, x)
    pruned = ntk.ntk_spectrum(model, x, random_masks(model, 0.3))["eigenvalues"]
    frame = ntk.spectra_frame({"dense": dense, "random": pruned.flip(0)})
    assert list(frame.columns) == ["label", "index", "eigenvalue"]
    assert len(frame) == 30
    r = frame[frame["label"] == "random"]["eigenvalue"].to_numpy()
    assert (r[:-1] >= r[1:]).all()  # re-sorted descending
    ax = plot_spectra(frame)
    assert ax.get_yscale() == "log"
    assert len(ax.get_lines()) >= 2
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="hue"):
        plot_spectra(frame, hue="method")


def test_import_does_not_load_plotting():
    code = "import sys, ntksap.ntk; print('matplotlib' in sys.modules, 'seaborn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- bad input --------------------------------------------------------------------------------------
def test_bad_arguments():
    model, x = make("conv")
    cases = [
        (lambda: ntk.empirical_ntk(model, x, params="weights"), "params"),
        (lambda: ntk.empirical_ntk(model, x, bn="batch"), "bn"),
        (lambda: ntk.empirical_ntk(model, x, chunk_size=0), "chunk_size"),
        (lambda: ntk.empirical_ntk(model, x.numpy()), "inputs"),
        (lambda: ntk.empirical_ntk(model, x[:0]), "inputs"),
        (lambda: ntk.empirical_ntk(model, x[:1], bn="train"), "bn='train'"),
        (lambda: ntk.empirical_ntk("resnet20", x), "model"),
        (lambda: ntk.empirical_ntk(model, x, {"nope.weight": torch.ones(1)}), "nope.weight"),
        (lambda: ntk.empirical_ntk(model, x, {"fc.weight": torch.ones(2, 2)}), "shape"),
        (lambda: ntk.empirical_ntk(model, x, {"fc.weight": torch.full((3, 4), 0.5)}), "0 and 1"),
        (lambda: ntk.empirical_ntk(model, x, {"fc.weight": [1, 0]}), "masks"),
        (lambda: ntk.ntk_trace_estimate(model, x, epsilon=0), "epsilon"),
        (lambda: ntk.ntk_trace_estimate(model, x, draws=0), "draws"),
        (lambda: ntk.ntk_trace_estimate(model, x, seed=-1), "seed"),
        (lambda: ntk.SpectrumRecorder(model, x, every=0), "every"),
        (lambda: ntk.SpectrumRecorder(model, x, mode="eigen"), "mode"),
        (lambda: ntk.SpectrumRecorder(model, x, epsilon=0.1), "epsilon"),
        (lambda: ntk.SpectrumRecorder(model, x, mode="trace", draws=0), "draws"),
        (lambda: ntk.spectra_frame({}), "spectra"),
        (lambda: ntk.spectrum_summary(torch.ones(2, 3)), "square"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word):
            call()
    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x), x

    for bn in ntk.BN_MODES:
        with pytest.raises(ValueError, match="output"):
            ntk.empirical_ntk(TupleNet(), torch.randn(4, 5), bn=bn)
        with pytest.raises(ValueError, match="output"):
            ntk.ntk_trace_estimate(TupleNet(), torch.randn(4, 5), bn=bn)
    untracked = copy.deepcopy(model)
    untracked.bn1 = nn.BatchNorm2d(4, track_running_stats=False).double()
    with pytest.raises(ValueError, match="track_running_stats"):
        ntk.empirical_ntk(untracked, x)
    ntk.empirical_ntk(untracked, x, bn="train")  # fine in train mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, x = make("odd", torch.float32)
    masks = random_masks(model, 0.5)
    cpu = ntk.empirical_ntk(model, x, masks)
    gpu = ntk.empirical_ntk(model.cuda(), x.cuda(), masks)
    assert gpu.device.type == "cuda"
    assert rel(gpu.cpu(), cpu) < 1e-4
