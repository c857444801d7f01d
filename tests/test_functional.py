"""The shared masked functional forward (ntksap.functional) against naive computations."""

import copy

import pytest
import torch
from torch import nn

from ntksap.functional import (borrowed, bn_batch_statistics, call, channel_statistics, masked_params, model_tensors,
                               scoring_mode, set_modes)
from conftest import TinyConvBN


class Mixed(nn.Module):
    """BatchNorm1d on (N, C) and (N, C, L), BatchNorm2d, dropout and an untracked BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(3, momentum=None)          # cumulative average: momentum 1 must still win
        self.conv1d = nn.Conv1d(3, 4, 3)
        self.bn1d_seq = nn.BatchNorm1d(4)
        self.untracked = nn.BatchNorm1d(4, track_running_stats=False)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 5)
        self.bn1d = nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        h = torch.relu(self.bn2d(self.conv(x)))                 # (N, 3, 6, 6)
        h = self.untracked(self.bn1d_seq(self.conv1d(h.flatten(2))))  # (N, 4, 34)
        return self.bn1d(self.fc(self.drop(h.mean(2))))


def naive_statistics(model, masks, x):
    """Per-channel batch mean and unbiased variance of every tracked BatchNorm's
    input, read by forward pre-hooks on a copy with masked weights and BatchNorm
    in train mode (batch statistics), everything else in eval mode."""
    net = copy.deepcopy(model).double()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in masks:
                p.mul_(masks[n].double())
    net.eval()
    seen, handles = {}, []
    for name, mod in net.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()

            def hook(m, args, name=name):
                a = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)  # (C, everything else)
                seen[name] = (a.mean(1), a.var(1, unbiased=True))
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        net(x.double())
    for h in handles:
        h.remove()
    return seen


def untracked_later():
    """TinyConvBN whose bn1 keeps its buffers but stops tracking (set after construction)."""
    model = TinyConvBN()
    model.bn1.track_running_stats = False
    return model


@pytest.mark.parametrize("make,shape", [(TinyConvBN, (2, 6, 6)), (Mixed, (2, 6, 6)), (untracked_later, (2, 6, 6))])
def test_bn_batch_statistics_are_the_batch_mean_and_unbiased_variance(make, shape):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # running statistics far from 0/1, so a reset that did not happen shows
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-3, 3)
                m.running_var.uniform_(4, 9)
    model.train()
    x = torch.randn(9, *shape)
    masks = {"conv.weight" if make is Mixed else "conv1.weight":
             (torch.rand(model.conv.weight.shape if make is Mixed else model.conv1.weight.shape) < 0.6).float()}
    params, buffers = model_tensors(model, dtype=torch.float64)
    before = {n: b.clone() for n, b in buffers.items()}
    state = copy.deepcopy(model.state_dict())
    momenta = {n: m.momentum for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    stats = bn_batch_statistics(model, masked_params(params, {n: m.double() for n, m in masks.items()}),
                                buffers, x.double())

    ref = naive_statistics(model, masks, x)
    tracked = [n for n, m in model.named_modules()  # every BatchNorm with running-statistic buffers
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    assert tracked and set(tracked) <= set(ref)
    for name in tracked:
        torch.testing.assert_close(stats[f"{name}.running_mean"], ref[name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats[f"{name}.running_var"], ref[name][1], rtol=1e-10, atol=1e-12)
    assert set(stats) == set(buffers)
    # the given buffers, the model's tensors, modes and momenta are as they were
    assert all(torch.equal(buffers[n], before[n]) for n in buffers)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(m.training for m in model.modules())
    assert [m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        == [m.track_running_stats for m in make().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert momenta == {n: m.momentum for n, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class TwoNames(nn.Module):
    """One Linear registered under two names, and a weight tied into a second module."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4, bias=False)
        self.d = nn.Linear(4, 3, bias=False)
        self.d.weight = nn.Parameter(torch.randn(3, 4))
        self.e = nn.Linear(4, 3, bias=False)
        self.e.weight = self.d.weight

    def forward(self, x):
        h = torch.tanh(self.b(torch.relu(self.a(x))))
        return self.d(self.c(h)) + self.e(h)


def test_call_uses_the_given_tensors_once_per_slot_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = TwoNames()
    originals = {n: p for n, p in model.named_parameters()}
    assert set(originals) == {"a.weight", "a.bias", "c.weight", "d.weight"}
    params, buffers = model_tensors(model)
    masks = {"a.weight": (torch.rand(4, 4) < 0.5).float(), "d.weight": (torch.rand(3, 4) < 0.5).float()}
    x = torch.randn(5, 4)
    got = call(model, masked_params(params, masks), buffers, x)

    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.a.weight.mul_(masks["a.weight"])
        ref.d.weight.mul_(masks["d.weight"])
    assert torch.equal(got, ref(x))
    # every slot holds its own parameter again, untouched (the swap of a module
    # under two names and of a tied weight is undone exactly once)
    assert all(p is originals[n] for n, p in model.named_parameters())
    assert model.b.weight is model.a.weight and model.e.weight is model.d.weight
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with pytest.raises(KeyError, match="nope"):
        call(model, {**params, "nope": torch.ones(1)}, buffers, x)


def test_model_tensors_are_detached_copies_in_the_asked_dtype():
    model = TinyConvBN()
    params, buffers = model_tensors(model, dtype=torch.float64, channels_last=True)
    assert params.keys() == dict(model.named_parameters()).keys()
    assert buffers.keys() == dict(model.named_buffers()).keys()
    assert all(t.dtype == torch.float64 and not t.requires_grad for t in params.values())
    assert buffers["bn1.num_batches_tracked"].dtype == torch.int64  # integers keep their dtype
    assert params["conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    params["fc.weight"].zero_()
    assert model.fc.weight.abs().sum() > 0


def test_borrowed_and_set_modes_restore_modes_momenta_tracking_and_hooks():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.2))
    model.train()
    model[2].eval()
    with borrowed(model) as handles:
        set_modes(model, "train", update_running_stats=False)
        assert [m.training for m in model] == [False, True, False] and not model[1].track_running_stats
        model[1].momentum = 1.0
        handles.append(model[0].register_forward_hook(lambda *a: None))
    assert [m.training for m in model] == [True, True, False]
    assert model[1].momentum == 0.1 and model[1].track_running_stats
    assert not model[0]._forward_hooks
    with scoring_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model] == [True, True, False]


@pytest.mark.parametrize("make,shape", [(lambda: nn.BatchNorm2d(4), (5, 4, 3, 3)),
                                        (lambda: nn.BatchNorm2d(4, affine=False), (5, 4, 3, 3)),
                                        (lambda: nn.BatchNorm1d(4), (5, 4)), (lambda: nn.BatchNorm1d(4), (5, 4, 6))])
def test_affine_batchnorm_is_eval_batchnorm_and_is_undone(make, shape):
    from ntksap.functional import affine_batchnorm

    torch.manual_seed(0)
    bn = make()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if bn.affine:
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    bn.eval()
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    ref = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    with affine_batchnorm(bn):
        assert "forward" in vars(bn)
        out = bn(x)
        (gx,) = torch.autograd.grad(out, x, g)
        bn.train()
        train_out = bn(x)               # train mode: the module's own forward (batch statistics)
        bn.eval()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(train_out.mean(0 if len(shape) == 2 else [0, *range(2, len(shape))]),
                          bn.bias.detach() if bn.affine else torch.zeros(4), atol=1e-5)
    assert "forward" not in vars(bn)


@pytest.mark.parametrize("shape, channels_last", [((7, 3), False), ((5, 4, 6), False), ((6, 5, 4, 3), False),
                                                  ((6, 5, 4, 3), True), ((1, 3, 2, 2), False)])
def test_channel_statistics_are_each_channels_mean_and_unbiased_variance(shape, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    mean, var = channel_statistics(x)
    assert mean.shape == var.shape == (shape[1],) and mean.dtype == var.dtype == x.dtype
    for c in range(shape[1]):  # explicit, in float64: all values of channel c
        values = x.double().select(1, c).reshape(-1).tolist()
        mu = sum(values) / len(values)
        unbiased = sum((v - mu) ** 2 for v in values) / (len(values) - 1)
        assert mean[c].item() == pytest.approx(mu, rel=1e-6, abs=1e-6)
        assert var[c].item() == pytest.approx(unbiased, rel=1e-6)


def test_channel_statistics_refuse_a_single_value_per_channel():
    with pytest.raises(ValueError, match=r"shape \(1, 3, 1, 1\) has 1 value per channel"):
        channel_statistics(torch.ones(1, 3, 1, 1))
