"""Models nobody here wrote: tied weights, depthwise and grouped convolutions,
Conv1d + BatchNorm1d, GroupNorm and LayerNorm, attention, torchvision's
MobileNet; every method on each. Also GraSP's finite-difference Hessian and the
warning for weights the forward never uses."""

import copy

import pytest
import torch
from torch import nn

import ntksap
from ntksap.masks import Masks
from ntksap.scores import METHODS, ScoreContext, UnusedWeightWarning, grasp_scores

CPU = torch.device("cpu")


class TiedNet(nn.Module):
    """A Linear output layer sharing its weight with an Embedding (as language
    models tie their input and output embeddings); inputs are vectors."""

    def __init__(self, d=6, vocab=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        return self.out(torch.relu(self.inp(x) + self.emb(self.pos)))


class GroupedConvNet(nn.Module):
    """Depthwise and grouped convolutions, GroupNorm, BatchNorm2d."""

    def __init__(self, k=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.dw(x)))
        x = torch.relu(self.gn(self.grouped(x)))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """Conv1d + BatchNorm1d + LayerNorm on (C, L) sequences."""

    def __init__(self, k=3):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, k)

    def forward(self, x):
        x = self.c2(torch.relu(self.bn(self.c1(x)))).mean(-1)
        return self.fc(torch.relu(self.ln(x)))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention over a (L, D) sequence, then a classifier."""

    def __init__(self, d=8, k=3):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(torch.tanh(a + h).mean(1))


class EncoderNet(nn.Module):
    """nn.TransformerEncoder (scaled-dot-product attention, LayerNorm, dropout)."""

    def __init__(self, d=8, k=3):
        super().__init__()
        self.proj = nn.Linear(4, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(self.enc(self.proj(x)).mean(1))


def mobilenet():
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=4)


ZOO = {
    "tied": (TiedNet, (6,), 5),
    "grouped_conv": (GroupedConvNet, (3, 8, 8), 3),
    "conv1d": (Conv1dNet, (2, 10), 3),
    "attention": (AttentionNet, (5, 4), 3),
    "transformer_encoder": (EncoderNet, (5, 4), 3),
    "mobilenet_v3_small": (mobilenet, (3, 32, 32), 4),
}


PX_REFUSES = {  # PX needs a ReLU network (ntksap.paths): what it names in each model it refuses
    "grouped_conv": "module 'gn' is a GroupNorm",
    "conv1d": "module 'ln' is a LayerNorm",
    "attention": "module 'attn' is a MultiheadAttention",
    "transformer_encoder": "is a MultiheadAttention",
    "mobilenet_v3_small": "is a Hardswish",
}


def data_for(shape, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, *shape, generator=g), torch.randint(0, k, (6,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_method_prunes_foreign_models(name, method):
    make, shape, k = ZOO[name]
    torch.manual_seed(0)
    model = make()
    kw = dict(iterations=2, rounds=1, num_samples=6, batch_size=4) if method == "ntksap" else \
        dict(iterations=2) if METHODS[method].iterations > 1 else {}
    if METHODS[method].needs_data:
        kw["data"] = data_for(shape, k)
    if method == "px" and name in PX_REFUSES:  # not a ReLU network: refused by name, before any scoring
        with pytest.raises(ValueError, match=PX_REFUSES[name]):
            ntksap.prune(model, method, 0.7, input_shape=shape, progress=False, **kw)
        return
    masks = ntksap.prune(model, method, 0.7, input_shape=shape, progress=False, **kw)
    assert masks.kept == round(0.3 * masks.numel)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n].detach()[m == 0] == 0), f"{n}: a pruned weight is not zero"
    model.eval()
    with torch.no_grad():
        out = model(data_for(shape, k, seed=1)[0][0])
    assert torch.isfinite(out).all()


def test_tied_weight_is_pruned_once_under_one_name_with_one_mask():
    torch.manual_seed(0)
    model = TiedNet()
    masks = ntksap.prune(model, "synflow", 0.6, input_shape=(6,), iterations=3, progress=False)
    assert set(masks) == {"emb.weight", "inp.weight"}  # the named_parameters name of the shared weight
    assert model.out.weight is model.emb.weight
    assert torch.all(model.out.weight.detach()[masks["emb.weight"] == 0] == 0)
    # training keeps the pruned entries at zero for both users of the weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
    assert torch.all(model.emb.weight.detach()[masks["emb.weight"] == 0] == 0)
    rep = masks.report(model, (6,))
    assert rep.loc[rep.name == "emb.weight", "flops_dense"].item() > 0  # FLOPs are found for the tied name


def test_grasp_finite_difference_matches_autograd():
    torch.manual_seed(0)
    model = GroupedConvNet().double()
    data = [(x.double(), y) for x, y in data_for((3, 8, 8), 3)]
    masks = Masks.ones_like(model)
    ctx = dict(device=CPU, input_shape=(3, 8, 8), data=data)
    exact = METHODS["grasp"](model, masks, ScoreContext(**ctx, grasp_hessian="autograd"))
    fd = METHODS["grasp"](model, masks, ScoreContext(**ctx, grasp_hessian="finite_difference"))
    flat_e = torch.cat([exact[n].reshape(-1) for n in masks])
    flat_f = torch.cat([fd[n].reshape(-1) for n in masks])
    assert (flat_f - flat_e).norm() / flat_e.norm() < 1e-6
    # a float32 model too: the difference is taken in float64
    model32 = copy.deepcopy(model).float()
    data32 = [(x.float(), y) for x, y in data]
    e32 = METHODS["grasp"](model32, masks, ScoreContext(device=CPU, input_shape=(3, 8, 8), data=data32,
                                                       grasp_hessian="finite_difference"))
    flat32 = torch.cat([e32[n].reshape(-1).double() for n in masks])
    assert (flat32 - flat_e).norm() / flat_e.norm() < 1e-4


def test_grasp_falls_back_to_finite_differences_where_double_backward_is_missing():
    torch.manual_seed(0)
    model = mobilenet()  # hardsigmoid has no double backward
    data = data_for((3, 32, 32), 4)
    with pytest.warns(RuntimeWarning, match="no double backward.*finite_difference"):
        auto = ntksap.prune(copy.deepcopy(model), "grasp", 0.5, data=data, progress=False)
    fd = ntksap.prune(copy.deepcopy(model), "grasp", 0.5, data=data, progress=False,
                      grasp_hessian="finite_difference")
    assert all(torch.equal(auto[n], fd[n]) for n in auto)
    with pytest.raises(ValueError, match=r"grasp_hessian='autograd'.*hardsigmoid.*grasp_hessian='finite_difference'"):
        ntksap.prune(copy.deepcopy(model), "grasp", 0.5, data=data, progress=False, grasp_hessian="autograd")
    with pytest.raises(ValueError, match=r"grasp_hessian='newton' is not allowed.*; allowed: one of 'auto'"):
        ntksap.prune(model, "grasp", 0.5, data=data, progress=False, grasp_hessian="newton")


def test_transformer_encoder_grasp_uses_exact_double_backward():
    torch.manual_seed(0)
    model = EncoderNet()
    data = data_for((5, 4), 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback needed: the math attention kernel
        s = grasp_scores(model, Masks.ones_like(model), ScoreContext(device=CPU, input_shape=(5, 4), data=data,
                                                                      grasp_hessian="autograd"))
    assert all(torch.isfinite(v).all() for v in s.values())


class UnusedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)  # never called in forward

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "ntksap", "iterative_snip"])
def test_weights_the_forward_never_uses_are_named_in_a_warning(method):
    torch.manual_seed(0)
    kw = dict(rounds=1, num_samples=4, iterations=2) if method == "ntksap" else \
        dict(iterations=2) if METHODS[method].iterations > 1 else {}
    if METHODS[method].needs_data:
        kw["data"] = data_for((4,), 3)
    with pytest.warns(UnusedWeightWarning, match=r"'spare.weight'"):
        ntksap.prune(UnusedBranch(), method, 0.5, input_shape=(4,), progress=False, **kw)


def test_tied_weight_round_trips_through_torch_prune():
    torch.manual_seed(0)
    model = TiedNet()
    masks = ntksap.prune(model, "magnitude", 0.5, input_shape=(6,), progress=False, apply=False)
    ntksap.to_torch_prune(model, masks)
    assert model.out.weight_orig is model.emb.weight_orig  # still one parameter
    assert torch.all(model.out.weight[masks["emb.weight"] == 0] == 0)  # both users see the mask
    back = ntksap.from_torch_prune(model)
    assert set(back) == set(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    assert model.out.weight is model.emb.weight and "emb.weight" in dict(model.named_parameters())
