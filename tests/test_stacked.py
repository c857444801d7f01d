"""ntksap.stacked: Grouped and Lockstep engines against the members run one by one."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from ntksap.masks import apply_masks, enforce_masks_after_step, prunable_parameters
from ntksap.stacked import BatchedLinear, Grouped, Lockstep, fits, member_names, stack

K = 3


def masked_members(name, k=K, seed=0, warmup_shape=None):
    """K models with different weights and random 0/1 masks multiplied in; with
    ``warmup_shape`` (B, C, H, W), a few train-mode passes each so running stats differ."""
    models, masks = [], []
    for j in range(k):
        torch.manual_seed(seed + 100 * j)
        m = ntksap.build_model(name, 10) if isinstance(name, str) else name()
        mk = {n: (torch.rand_like(p) < 0.6).float() for n, p in prunable_parameters(m).items()}
        with torch.no_grad():
            for n, p in prunable_parameters(m).items():
                p.mul_(mk[n])
        if warmup_shape is not None:
            with torch.no_grad():
                m(torch.randn(*warmup_shape))
        models.append(m)
        masks.append(mk)
    return models, masks


def close(a, b, rtol=1e-4, scale=None):
    """Equal to float tolerance: rtol relative to the largest entry (or to ``scale``)."""
    if scale is None:
        scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return torch.allclose(a, b, rtol=rtol, atol=rtol * scale)


def grad_norm(member):
    """The L2 norm of all of ``member``'s gradients together."""
    return torch.sqrt(sum((p.grad ** 2).sum() for p in member.parameters())).item()


def grad_close(a, b, total, rtol=1e-3):
    """Gradients equal in relative L2 norm, with a floor at the member's total
    gradient norm (conv biases before a train-mode BN have ~0 gradient). Not
    elementwise, and loose in float32: a float-noise sign flip of one ReLU input
    in a deep net moves one entry by its whole gradient (seen: 0.3% in L2);
    :func:`test_grouped_gradients_float64` checks the layout to 1e-10."""
    return (a - b).norm().item() <= rtol * b.norm().item() + 1e-2 * rtol * total


def loss_of(out, y):
    return sum(F.cross_entropy(out[:, k], y) for k in range(out.shape[1]))


CASES = [("digits_cnn", (1, 8, 8), 8), ("resnet20", (3, 32, 32), 4), ("vgg16_bn", (3, 32, 32), 2),
         pytest.param("resnet18_tiny", (3, 64, 64), 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,shape,batch", CASES, ids=["digits_cnn", "resnet20", "vgg16_bn", "resnet18_tiny"])
def test_grouped_matches_members(name, shape, batch):
    models, _ = masked_members(name, warmup_shape=(2, *shape))
    refs = [copy.deepcopy(m) for m in models]
    engine = stack(models, kind="grouped")
    assert isinstance(engine, Grouped) and engine.k == K
    torch.manual_seed(1)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

    # train mode: outputs, gradients, running stats
    out = engine(x)
    assert out.shape == (batch, K, 10)
    loss_of(out, y).backward()
    grads = engine.unstack_tensors({n: p.grad for n, p in engine.named_parameters()})
    states = engine.member_states()
    for k, ref in enumerate(refs):
        ref_out = ref(x)
        assert close(out[:, k].detach(), ref_out.detach()), f"member {k} output"
        F.cross_entropy(ref_out, y).backward()
        total = grad_norm(ref)
        for n, p in ref.named_parameters():
            assert grad_close(grads[k][n], p.grad, total, rtol=1e-2), f"member {k} grad {n}"
        ref_state = ref.state_dict()
        assert list(states[k]) == list(ref_state)
        for n, t in ref_state.items():
            assert states[k][n].shape == t.shape
            assert close(states[k][n].float(), t.float()), f"member {k} state {n}"

    # eval mode: the (different) running stats are used
    engine.eval()
    with torch.no_grad():
        out = engine(x)
        for k, ref in enumerate(refs):
            assert close(out[:, k], ref.eval()(x)), f"member {k} eval output"


@pytest.mark.parametrize("name,shape", [("digits_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
def test_grouped_gradients_float64(name, shape):
    models, _ = masked_members(name, warmup_shape=(2, *shape))
    models = [m.double() for m in models]
    refs = [copy.deepcopy(m) for m in models]
    engine = stack(models)
    x, y = torch.randn(4, *shape, dtype=torch.float64), torch.randint(0, 10, (4,))
    out = engine(x)
    loss_of(out, y).backward()
    grads = engine.unstack_tensors({n: p.grad for n, p in engine.named_parameters()})
    for k, ref in enumerate(refs):
        ref_out = ref(x)
        assert close(out[:, k].detach(), ref_out.detach(), rtol=1e-12)
        F.cross_entropy(ref_out, y).backward()
        total = grad_norm(ref)
        for n, p in ref.named_parameters():
            assert grad_close(grads[k][n], p.grad, total, rtol=1e-10), f"member {k} grad {n}"


@pytest.mark.slow
def test_grouped_resnet50_tiny_batch():
    models, _ = masked_members("resnet50", k=2)
    refs = [copy.deepcopy(m) for m in models]
    engine = stack(models)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = engine(x)
        for k, ref in enumerate(refs):
            assert close(out[:, k], ref(x))
    states = engine.member_states()
    for k, ref in enumerate(refs):
        for n, t in ref.state_dict().items():
            assert close(states[k][n].float(), t.float()), n


class MLPBN(nn.Module):
    """Linear - BatchNorm1d - ReLU - Linear: batched linears feeding each other."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(12, 7), nn.BatchNorm1d(7), nn.Linear(7, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x.flatten(1)))))


def test_grouped_mlp_with_batchnorm1d():
    models, _ = masked_members(MLPBN)
    refs = [copy.deepcopy(m) for m in models]
    engine = stack(models)
    x, y = torch.randn(5, 3, 2, 2), torch.randint(0, 10, (5,))
    out = engine(x)
    loss_of(out, y).backward()
    grads = engine.unstack_tensors({n: p.grad for n, p in engine.named_parameters()})
    for k, ref in enumerate(refs):
        ref_out = ref(x)
        assert close(out[:, k].detach(), ref_out.detach())
        F.cross_entropy(ref_out, y).backward()
        total = grad_norm(ref)
        for n, p in ref.named_parameters():
            assert grad_close(grads[k][n], p.grad, total), n


@pytest.mark.parametrize("name,shape", [("digits_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
def test_lockstep_bit_identical(name, shape):
    models, _ = masked_members(name, warmup_shape=(4, *shape))
    refs = [copy.deepcopy(m) for m in models]
    engine = stack(models, kind="lockstep")
    assert isinstance(engine, Lockstep) and engine.k == K and engine.members[0] is models[0]
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    out = engine(x)
    loss_of(out, y).backward()
    for k, ref in enumerate(refs):
        ref_out = ref(x)
        assert torch.equal(out[:, k], ref_out)
        F.cross_entropy(ref_out, y).backward()
        for (n, p), (rn, rp) in zip(engine.members[k].named_parameters(), ref.named_parameters()):
            assert n == rn and torch.equal(p.grad, rp.grad), n
        for (n, t), (rn, rt) in zip(engine.member_states()[k].items(), ref.state_dict().items()):
            assert n == rn and torch.equal(t, rt), n


@pytest.mark.parametrize("kind", ["grouped", "lockstep"])
def test_round_trip_and_masks(kind):
    models, masks = masked_members("digits_cnn")
    originals = [copy.deepcopy(m.state_dict()) for m in models]
    engine = stack(models, kind=kind)
    states = engine.member_states()
    for s, o in zip(states, originals):
        assert list(s) == list(o) and all(torch.equal(s[n], o[n]) for n in o)
    with torch.no_grad():  # change the engine, then load the states back
        for p in engine.parameters():
            p.add_(1.0)
    engine.load_member_states(states)
    for s, o in zip(engine.member_states(), originals):
        assert all(torch.equal(s[n], o[n]) for n in o)

    # masks: engine layout, found as prunable, usable by apply_masks / enforce_masks_after_step
    stacked = engine.stack_tensors(masks)
    params = dict(engine.named_parameters())
    assert set(stacked) == set(prunable_parameters(engine))
    assert all(stacked[n].shape == params[n].shape for n in stacked)
    assert member_names(engine) == [n for n, _ in models[0].named_parameters()]
    with torch.no_grad():
        for p in engine.parameters():
            p.add_(0.5)
    apply_masks(engine, stacked)
    opt = torch.optim.SGD(engine.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    enforce_masks_after_step(opt, engine, stacked)
    loss_of(engine(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    for n, m in stacked.items():
        assert torch.all(params[n][m == 0] == 0)
    back = engine.unstack_tensors(stacked)
    assert all(torch.equal(back[k][n], masks[k][n]) for k in range(K) for n in masks[k])


@pytest.mark.parametrize("kind", ["grouped", "lockstep"])
def test_channels_last(kind):
    models, _ = masked_members("resnet20")
    engine = stack(models, kind=kind).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = engine(x)
        engine.to(memory_format=torch.channels_last)
        out = engine(x.contiguous(memory_format=torch.channels_last))
        out2 = engine(x)
    assert close(out, ref) and close(out2, ref)
    engine.train()
    assert all(m.training for m in engine.modules())


class WithNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(1, 4, 3), norm, nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


class OwnParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


@pytest.mark.parametrize("make,culprit", [
    (lambda: WithNorm(nn.LayerNorm([4, 6, 6])), "'norm' of type LayerNorm"),
    (lambda: WithNorm(nn.GroupNorm(2, 4)), "'norm' of type GroupNorm"),
    (lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 10)), "'0' of type Conv1d"),
    (OwnParam, "type OwnParam"),
])
def test_grouped_unsupported_layers(make, culprit):
    with pytest.raises(ValueError, match=culprit) as err:
        stack([make(), make()], kind="grouped")
    assert "kind='lockstep'" in str(err.value)
    stack([make(), make()], kind="lockstep")  # works for any model


def test_errors():
    with pytest.raises(ValueError, match="K=0"):
        stack([])
    with pytest.raises(ValueError, match="architecture"):
        stack([ntksap.build_model("digits_cnn", 10), ntksap.build_model("resnet20", 10)])
    with pytest.raises(ValueError, match="architecture"):
        stack([ntksap.build_model("digits_cnn", 10), ntksap.build_model("digits_cnn", 7)], kind="lockstep")
    with pytest.raises(ValueError, match="kind='stacked'"):
        stack([ntksap.build_model("digits_cnn", 10)], kind="stacked")
    with pytest.raises(ValueError, match="models="):
        stack(ntksap.build_model("digits_cnn", 10))
    a, b = ntksap.build_model("digits_cnn", 10), ntksap.build_model("digits_cnn", 10)
    a(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        stack([a, b])
    engine = stack([a, a])
    with pytest.raises(ValueError, match="K=2"):
        engine.stack_tensors([{}])
    with pytest.raises(ValueError, match="not a parameter"):
        engine.stack_tensors([{"nope": torch.ones(1)}] * 2)


def test_batched_linear_and_k1():
    lin = [nn.Linear(4, 3) for _ in range(2)]
    bl = BatchedLinear(torch.stack([l.weight.detach() for l in lin]), torch.stack([l.bias.detach() for l in lin]))
    x = torch.randn(5, 2, 4)
    ref = torch.stack([l(x[:, k]) for k, l in enumerate(lin)], 1)
    assert close(bl(x), ref) and close(bl(x.reshape(5, 8)), ref)
    with pytest.raises(ValueError, match="input has shape"):
        bl(torch.randn(5, 7))
    m = ntksap.build_model("digits_cnn", 10).eval()
    x = torch.randn(3, 1, 8, 8)
    assert close(stack([m]).eval()(x)[:, 0], m(x))


def test_fits_cpu():
    m = ntksap.build_model("digits_cnn", 10)
    ok, msg = fits(m, 3, 16, (1, 8, 8), "cpu", "grouped")
    assert ok and "GiB" in msg
    ok, msg = fits([m, m], 10 ** 9, 16, (1, 8, 8), "cpu", "lockstep")
    assert not ok
    assert all(mod.training for mod in m.modules())
    with pytest.raises(ValueError, match="k=0"):
        fits(m, 0, 16, (1, 8, 8), "cpu", "grouped")


@pytest.mark.parametrize("kind", ["grouped", "lockstep"])
def test_layer_flops_of_an_engine_are_its_members_sums(kind):
    """masks.layer_flops counts a stacked engine's multiply-accumulates as its K
    members' together (a BatchedLinear's (K, out, in) weight is used once per
    input row of its own member, not K times), dense and under masks."""
    from ntksap.masks import layer_flops

    models, masks = masked_members("digits_cnn")
    engine = stack(models, kind=kind)
    stacked = engine.stack_tensors(masks)
    got = layer_flops(engine, (1, 8, 8), stacked)
    per_member = [layer_flops(m, (1, 8, 8), mk) for m, mk in zip(models, masks)]
    names = list(prunable_parameters(models[0]))
    engine_names = list(prunable_parameters(engine))
    if kind == "grouped":  # one engine tensor per member tensor
        assert len(engine_names) == len(names)
        for en, n in zip(engine_names, names):
            assert got[en] == tuple(sum(f[n][i] for f in per_member) for i in (0, 1)), (en, got[en])
    else:  # the members themselves, K times over
        assert sum(d for d, _ in got.values()) == sum(d for f in per_member for d, _ in f.values())
        assert sum(k for _, k in got.values()) == sum(k for f in per_member for _, k in f.values())
    assert any("fc" in n for n in engine_names)  # the BatchedLinear is among them


def test_kaiming_init_of_a_batched_linear_draws_each_member_from_its_own_fan_in():
    """models.kaiming_init on a BatchedLinear (weight (K, out, in)) as on K
    nn.Linear(in, out): std sqrt(2 / in) per member, not torch's 3-D fan-in (out x in)."""
    torch.manual_seed(0)
    layer = BatchedLinear(torch.zeros(3, 300, 400), torch.zeros(3, 300))
    ntksap.kaiming_init(layer)
    expected = (2 / 400) ** 0.5
    for w in layer.weight:
        assert abs(w.std().item() / expected - 1) < 0.03
