"""PX against an explicit enumeration of paths and a deep-copy reference; its
ReLU gates; the models and arguments it refuses."""

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from ntksap.masks import Masks
from ntksap.paths import check_relu_network, relu_gates
from ntksap.scores import METHODS, ScoreContext

CPU = torch.device("cpu")


def random_masks(model, seed=0, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: (torch.rand(p.shape, generator=g) < keep).float()
                  for n, p in ntksap.prunable_parameters(model).items()})


class MLP(nn.Module):
    """d -> h1 -> BN -> ReLU -> h2 -> BN -> ReLU -> k, with biases."""

    def __init__(self, d=3, h1=4, h2=3, k=2):
        super().__init__()
        self.l1, self.b1 = nn.Linear(d, h1), nn.BatchNorm1d(h1)
        self.l2, self.b2 = nn.Linear(h1, h2), nn.BatchNorm1d(h2)
        self.l3 = nn.Linear(h2, k)

    def forward(self, x):
        x = F.relu(self.b1(self.l1(x)))
        x = torch.relu(self.b2(self.l2(x)))
        return self.l3(x)


def nontrivial_bn(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def px_by_paths(model: MLP, masks, xs):
    """Score of every weight of the MLP from an explicit sum over its paths
    i0 -> i1 -> i2 -> k: z1[n, k] = sum_p a_p(x_n) m_p x_n[i0]^2 (gates of the
    real masked net in eval mode, weights 1 times the mask), the path kernel
    z2[k] = sum_p v_p^2 (v_p = product of masked weights and BN scales on the
    path) and score(theta_j) = theta_j^2 dR/d(theta_j^2) = sum_{n,k} z1[n, k]
    sum_{p through j, ending at k} v_p^2."""
    net = copy.deepcopy(model).double().eval()
    W = [(getattr(net, f"l{i}").weight.detach() * masks[f"l{i}.weight"].double()) for i in (1, 2, 3)]
    M = [masks[f"l{i}.weight"].double() for i in (1, 2, 3)]
    scale = [(bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach() for bn in (net.b1, net.b2)]
    with torch.no_grad():  # the real network's gates, by hand
        pre1 = net.b1(xs @ W[0].T + net.l1.bias)
        a1 = (pre1 > 0).double()
        pre2 = net.b2(F.relu(pre1) @ W[1].T + net.l2.bias)
        a2 = (pre2 > 0).double()
    d, h1, h2, k = W[0].shape[1], W[0].shape[0], W[1].shape[0], W[2].shape[0]
    z1 = torch.zeros(len(xs), k, dtype=torch.float64)
    z2 = torch.zeros(k, dtype=torch.float64)
    paths = list(itertools.product(range(d), range(h1), range(h2), range(k)))
    for i0, i1, i2, o in paths:
        mp = M[0][i1, i0] * M[1][i2, i1] * M[2][o, i2]
        z1[:, o] += a1[:, i1] * a2[:, i2] * mp * xs[:, i0] ** 2
        z2[o] += (W[0][i1, i0] * scale[0][i1] * W[1][i2, i1] * scale[1][i2] * W[2][o, i2]) ** 2
    weight = z1.sum(0)
    scores = {f"l{i}.weight": torch.zeros_like(W[i - 1]) for i in (1, 2, 3)}
    for i0, i1, i2, o in paths:
        vp2 = (W[0][i1, i0] * scale[0][i1] * W[1][i2, i1] * scale[1][i2] * W[2][o, i2]) ** 2
        scores["l1.weight"][i1, i0] += weight[o] * vp2
        scores["l2.weight"][i2, i1] += weight[o] * vp2
        scores["l3.weight"][o, i2] += weight[o] * vp2
    return scores


def test_px_matches_an_explicit_sum_over_paths():
    torch.manual_seed(0)
    model = nontrivial_bn(MLP())
    masks = random_masks(model, seed=1)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(7, 3, generator=g, dtype=torch.float64)
    data = [(xs[:4].float(), torch.zeros(4, dtype=torch.long)), (xs[4:].float(), torch.zeros(3, dtype=torch.long))]
    got = METHODS["px"](model, masks, ScoreContext(device=CPU, input_shape=(3,), data=data))
    expected = px_by_paths(model, masks, xs.float().double())
    for n in expected:
        alive = masks[n] != 0
        assert (expected[n][alive] > 0).any()
        torch.testing.assert_close(got[n][alive], expected[n][alive], rtol=1e-6, atol=0)


class ConvRes(nn.Module):
    """Conv-BN-ReLU (in-place module), a residual block, max-pool, a classifier."""

    def __init__(self, k=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.c1, self.n1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        x = self.stem(x)
        y = self.n2(self.c2(F.relu(self.n1(self.c1(x)))))
        x = self.pool(torch.relu(x + y))
        return self.fc(x.mean((2, 3)))


def px_by_deep_copies(model, masks, data):
    """PX with three deep copies of a ConvRes in eval mode and the reference's
    own interception of ReLU."""
    real = copy.deepcopy(model).double().eval()
    jvf = copy.deepcopy(model).double().eval()
    pk = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for (name, r), j, p in zip(real.named_modules(), jvf.modules(), pk.modules()):
            if isinstance(r, (nn.Conv2d, nn.Linear)):
                m = masks[f"{name}.weight"].double()
                r.weight.mul_(m)
                j.weight.copy_(m)
                p.weight.copy_(r.weight ** 2)
                if r.bias is not None:
                    j.bias.zero_()
                    p.bias.zero_()
            elif isinstance(r, nn.BatchNorm2d):
                s = r.weight / torch.sqrt(r.running_var + r.eps)
                for c, scale in ((j, torch.ones_like(s)), (p, s ** 2)):
                    c.running_mean.zero_()
                    c.running_var.fill_(1.0)
                    c.eps = 0.0
                    c.weight.copy_(scale)
                    c.bias.zero_()
    gates = []

    class Record(torch.overrides.TorchFunctionMode):   # the reference's own ReLU interception
        def __init__(self, action):
            super().__init__()
            self.action, self.i = action, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (F.relu, torch.relu):
                if self.action == "record":
                    gates.append(args[0] > 0)
                    return func(*args, **kwargs)
                if self.action == "linear":
                    return args[0]
                self.i += 1
                return args[0] * gates[self.i - 1]
            return func(*args, **kwargs)

    weight = 0
    with torch.no_grad():
        for x, _ in data:
            gates.clear()
            with Record("record"):
                real(x.double())
            with Record("replay"):
                weight = weight + jvf(x.double() ** 2).sum(0)
    with Record("linear"):
        z2 = pk(torch.ones(1, *data[0][0].shape[1:], dtype=torch.float64))
    (z2[0] * weight).sum().backward()
    return {f"{n}.weight": (m.weight.grad * m.weight).abs() for n, m in pk.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("channels_last", [False, True])
def test_px_matches_deep_copies_on_a_residual_conv_net(channels_last):
    torch.manual_seed(0)
    model = nontrivial_bn(ConvRes())
    masks = random_masks(model, seed=4)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(5, 2, 6, 6, generator=g), torch.zeros(5, dtype=torch.long)) for _ in range(2)]
    got = METHODS["px"](model, masks, ScoreContext(device=CPU, input_shape=(2, 6, 6), data=data,
                                                  channels_last=channels_last))
    expected = px_by_deep_copies(model, masks, data)
    for n in expected:
        alive = masks[n] != 0
        torch.testing.assert_close(got[n][alive], expected[n][alive], rtol=1e-6, atol=0)


def test_px_prunes_resnet20_deterministically_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 10, (20,), generator=g))]
    a = ntksap.prune(model, "px", 0.9, data=data, iterations=3, progress=False, apply=False)
    b = ntksap.prune(copy.deepcopy(model).train(), "px", 0.9, data=data, iterations=3, progress=False, apply=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert a.kept == round(0.1 * a.numel)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(a[n].sum() > 0 for n in a)


def test_the_gates_are_replayed_in_order_and_only_relu_is_gated():
    x = torch.tensor([[-1.0, 2.0, 0.0, 3.0]])
    with relu_gates("record", []) as gates:
        F.relu(x)
        torch.relu(-x)
    assert [g.tolist() for g in gates] == [[[False, True, False, True]], [[True, False, False, False]]]
    with relu_gates("replay", gates):
        assert torch.relu(torch.full((1, 4), 5.0)).tolist() == [[0.0, 5.0, 0.0, 5.0]]
        y = torch.full((1, 4), 7.0)
        assert F.relu(y, inplace=True) is y and y.tolist() == [[7.0, 0.0, 0.0, 0.0]]
        with pytest.raises(RuntimeError, match="more often"):
            F.relu(x)
    with relu_gates("linear", []):
        assert torch.equal(F.relu(x), x)
    with pytest.raises(ValueError, match="action='x'"):
        with relu_gates("x", []):
            pass


class TanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), "'1' is a GELU"),
    (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2)), "'1' is a LayerNorm"),
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)),
     "no running statistics"),
])
def test_px_refuses_models_outside_the_path_decomposition_before_any_work(model, match, monkeypatch):
    called = []
    monkeypatch.setitem(METHODS, "px", dataclasses.replace(METHODS["px"], score=lambda *a: called.append(1)))
    data = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match=match):
        ntksap.prune(model, "px", 0.5, data=data, progress=False)
    assert not called


def test_px_refuses_a_nonlinearity_called_as_a_function():
    data = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))]
    check_relu_network(TanhNet())   # nothing to see in the modules
    with pytest.raises(ValueError, match="px: the model calls tanh"):
        ntksap.prune(TanhNet(), "px", 0.5, data=data, progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(), "data=None is not allowed for method='px'"),
    (dict(data=[(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))], bn_mode="train"), "bn_mode='train'"),
])
def test_px_refuses_bad_arguments(kw, match):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=match):
        ntksap.prune(model, "px", 0.5, input_shape=(3,), progress=False, **kw)


def test_why_px_copies_use_eval_batchnorm_train_mode_makes_the_path_kernel_vanish():
    """PX's public code runs its path copies in train mode. On the all-ones
    input, every BatchNorm then makes each channel zero-mean over its positions,
    the ReLU-free residual stream stays zero-mean, and global average pooling
    gives 0: z2 is rounding noise. In eval mode (ours) it is the path kernel."""
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20").double()
    x = torch.ones(1, 3, 32, 32, dtype=torch.float64)
    with relu_gates("linear", []), torch.no_grad():
        train = model.train()(x)
        ev = model.eval()(x)
    bias = model.fc.bias.detach()
    assert (train - bias).abs().max() < 1e-12 * (ev - bias).abs().max()


def test_px_leaves_resnet20s_last_residual_branches_empty_at_high_sparsity_as_synflow_l2():
    """The exact path decomposition on ResNet-20 at 98.2 %: the last stage keeps
    its 1x1 shortcut and loses its residual branches (squared Kaiming weights of
    a 3x3 convolution sum to about 2 per unit, so a branch carries little more
    path flow than the identity beside it); every layer on the main path keeps
    weights, so the network stays connected."""
    torch.manual_seed(0)
    model = ntksap.build_model("resnet20")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(20, 3, 32, 32, generator=g), torch.arange(10).repeat(2))]
    masks = ntksap.prune(model, "px", 0.982, data=data, iterations=10, progress=False, apply=False)
    l2 = ntksap.prune(model, "synflow_l2", 0.982, input_shape=(3, 32, 32), iterations=10, progress=False,
                      apply=False)
    for m in (masks, l2):
        assert all(m[n].sum() == 0 for n in m if n.startswith(("blocks.7.", "blocks.8.")))
        assert all(m[n].sum() > 0 for n in ("conv.weight", "blocks.6.shortcut.0.weight", "fc.weight"))


@pytest.mark.parametrize("affine", [True, False])
def test_path_tensors_make_batchnorm_the_identity_or_its_scale_squared(affine):
    from ntksap.functional import call, model_tensors
    from ntksap.paths import path_tensors

    bn = nn.BatchNorm1d(3, affine=affine).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.5]))
        if affine:
            bn.weight.copy_(torch.tensor([2.0, -0.5, 1.0]))
            bn.bias.copy_(torch.tensor([1.0, 1.0, -3.0]))
    x = torch.randn(4, 3, dtype=torch.float64)
    gamma = bn.weight.detach() if affine else torch.ones(3, dtype=torch.float64)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    params, buffers = model_tensors(bn)
    for weight, expected in (("one", x), ("square", x * scale ** 2)):
        p, b = path_tensors(bn, params, buffers, weight)
        torch.testing.assert_close(call(bn, p, b, x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="weight='cube'"):
        path_tensors(bn, params, buffers, "cube")
