"""BatchNorm while scoring belongs to the method: masks do not depend on the
caller's train()/eval() state, the model comes back exactly as it was, and
each method's mode matches an independent deep-copy computation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
from ntksap.functional import scoring_mode
from ntksap.masks import Masks
from ntksap.scores import METHODS, ScoreContext
from conftest import TinyConvBN

SHAPE = (2, 6, 6)
CPU = torch.device("cpu")


def fake_data(seed=0, n=2, b=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *SHAPE, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def cheap(method):
    return dict(iterations=3, rounds=2, num_samples=10, batch_size=4) if method == "ntksap" else \
        dict(iterations=3) if METHODS[method].iterations > 1 else {}


def prune(model, method, **kw):
    if METHODS[method].needs_data:
        kw.setdefault("data", fake_data())
    return ntksap.prune(model, method, 0.8, input_shape=SHAPE, progress=False, apply=False, **{**cheap(method), **kw})


def snapshot(model):
    """Everything about the model's state that pruning must leave alone."""
    return ({n: m.training for n, m in model.named_modules()},
            {n: getattr(m, "momentum", None) for n, m in model.named_modules()},
            {n: t.detach().clone() for n, t in model.state_dict().items()})


def assert_same_state(a, b):
    assert a[0] == b[0], "module modes changed"
    assert a[1] == b[1], "BatchNorm momenta changed"
    assert a[2].keys() == b[2].keys()
    for n in a[2]:
        assert a[2][n].dtype == b[2][n].dtype and torch.equal(a[2][n], b[2][n]), f"{n} changed"


def with_running_stats(model, seed=5):
    """Non-trivial running statistics, so eval and train modes really differ."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
            m.momentum = 0.3
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_masks_do_not_depend_on_the_callers_mode_and_the_model_is_left_as_it_was(method):
    torch.manual_seed(0)
    base = with_running_stats(TinyConvBN())
    results = []
    for mode in ("train", "eval", "mixed"):
        model = copy.deepcopy(base)
        model.train(mode == "train")
        if mode == "mixed":  # a state no whole-model train()/eval() can restore
            model.train()
            model.bn1.eval()
        before = snapshot(model)
        results.append(prune(model, method))
        assert_same_state(snapshot(model), before)
    for other in results[1:]:
        for n in results[0]:
            assert torch.equal(results[0][n], other[n]), f"{method}: {n} depends on the caller's mode"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resnet20_masks_identical_after_train_and_eval(method):
    torch.manual_seed(1)
    base = ntksap.build_model("resnet20")
    kw = dict(input_shape=(3, 32, 32), progress=False, apply=False, seed=3)
    kw.update(dict(iterations=2, rounds=1, num_samples=8) if method == "ntksap" else
              dict(iterations=2) if METHODS[method].iterations > 1 else {})
    if METHODS[method].needs_data:
        g = torch.Generator().manual_seed(0)
        kw["data"] = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]
    a = ntksap.prune(copy.deepcopy(base).train(), method, 0.9, **kw)
    b = ntksap.prune(copy.deepcopy(base).eval(), method, 0.9, **kw)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_synflow_scores_in_eval_mode_as_a_deep_copy_reference():
    """SynFlow = |w * dR/dw| of the copy whose whole state_dict is made absolute,
    run in eval mode (running statistics), in float64, on an all-ones input."""
    torch.manual_seed(0)
    model = with_running_stats(TinyConvBN()).train()
    masks = Masks.ones_like(model)
    got = METHODS["synflow"](model, masks, ScoreContext(device=CPU, input_shape=SHAPE))
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    ref(torch.ones(1, *SHAPE, dtype=torch.float64)).sum().backward()
    for n, p in ref.named_parameters():
        if n in masks:
            torch.testing.assert_close(got[n], (p.grad * p).abs().detach(), rtol=1e-12, atol=1e-300)
    assert model.training  # left as it was


def test_synflow_in_train_mode_would_differ():
    torch.manual_seed(0)
    model = with_running_stats(TinyConvBN())
    masks = Masks.ones_like(model)
    ev = METHODS["synflow"](model, masks, ScoreContext(device=CPU, input_shape=SHAPE))
    tr = METHODS["synflow"](model, masks, ScoreContext(device=CPU, input_shape=SHAPE, bn_mode="train"))
    assert any(not torch.allclose(ev[n], tr[n]) for n in masks)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_snip_scores_follow_the_bn_mode_as_a_deep_copy_reference(bn_mode):
    """SNIP = |w * dL/dw| (mean cross-entropy per batch, summed) of a deep copy
    in that mode; the default is train mode (batch statistics)."""
    torch.manual_seed(0)
    model = with_running_stats(TinyConvBN()).double()
    data = [(x.double(), y) for x, y in fake_data()]
    masks = Masks.ones_like(model)
    ctx = ScoreContext(device=CPU, input_shape=SHAPE, data=data, bn_mode=None if bn_mode == "train" else bn_mode)
    model.train(bn_mode != "train")  # the caller's mode is the opposite: it must not matter
    got = METHODS["snip"](model, masks, ctx)
    ref = copy.deepcopy(model).train(bn_mode == "train")
    sum(F.cross_entropy(ref(x), y) for x, y in data).backward()
    for n, p in ref.named_parameters():
        if n in masks:
            torch.testing.assert_close(got[n], (p.grad * p).abs().detach(), rtol=1e-10, atol=1e-14)


def test_grasp_default_uses_batch_statistics():
    torch.manual_seed(0)
    model = with_running_stats(TinyConvBN()).double().eval()
    data = [(x.double(), y) for x, y in fake_data()]
    masks = Masks.ones_like(model)
    default = METHODS["grasp"](model, masks, ScoreContext(device=CPU, input_shape=SHAPE, data=data))
    train = METHODS["grasp"](model, masks, ScoreContext(device=CPU, input_shape=SHAPE, data=data, bn_mode="train"))
    ev = METHODS["grasp"](model, masks, ScoreContext(device=CPU, input_shape=SHAPE, data=data, bn_mode="eval"))
    for n in masks:
        assert torch.equal(default[n], train[n])
    assert any(not torch.allclose(default[n], ev[n]) for n in masks)


def test_scoring_mode_puts_dropout_off_and_restores_every_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Sequential(nn.Dropout(0.1)))
    model.train()
    model[3].eval()
    before = {n: m.training for n, m in model.named_modules()}
    with scoring_mode(model, "train"):
        assert not model[1].training and model[2].training and not model.training
    with scoring_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == before


def test_bn_mode_override_and_its_errors():
    torch.manual_seed(0)
    model = with_running_stats(TinyConvBN())
    default = prune(copy.deepcopy(model), "snip")
    ev = prune(copy.deepcopy(model), "snip", bn_mode="eval")
    assert any(not torch.equal(default[n], ev[n]) for n in default)
    for mode in ("train", "eval"):  # NTK-SAP's own alternatives run too
        prune(copy.deepcopy(model), "ntksap", bn_mode=mode)
    with pytest.raises(ValueError, match=r"bn_mode='unperturbed' is not allowed for method='snip'.*'train', 'eval'"):
        prune(model, "snip", bn_mode="unperturbed")
    with pytest.raises(ValueError, match=r"bn_mode='batch' is not allowed for method='ntksap'"):
        prune(model, "ntksap", bn_mode="batch")


def test_pipeline_refuses_a_bn_mode_the_method_does_not_have():
    from ntksap.config import compose
    from ntksap.params import ParamsError, parse_params

    data = compose("micro")
    data["runs"]["probe"] = {"method": "snip", "bn_mode": "unperturbed"}
    with pytest.raises(ParamsError, match=r"runs.probe.bn_mode='unperturbed' is not allowed for method 'snip'"):
        parse_params(data)
    data["runs"]["probe"] = {"method": "ntksap", "bn_mode": "sideways"}
    with pytest.raises(ParamsError, match=r"runs.probe.bn_mode='sideways'"):
        parse_params(data)
    data["runs"]["probe"] = {"method": "snip", "bn_mode": "eval"}
    assert parse_params(data).runs["probe"].bn_mode == "eval"


def test_pipeline_count_rule_is_validated_and_reaches_prune():
    from ntksap.config import compose
    from ntksap.params import ParamsError, parse_params
    from ntksap.experiment import prune_kwargs

    data = compose("micro")
    data["prune"]["count_rule"] = "nearest"
    with pytest.raises(ParamsError, match=r"prune.count_rule='nearest' is not allowed.*round, authors"):
        parse_params(data)
    data["prune"]["count_rule"] = "authors"
    data["runs"]["ntksap"]["bn_mode"] = "train"
    cfg = parse_params(data)
    kw = prune_kwargs(cfg, "ntksap", 0, (1, 8, 8))
    assert kw["count_rule"] == "authors" and kw["bn_mode"] == "train"
