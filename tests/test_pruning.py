"""The pruning loop: schedule, exact counts, scope, no revival, determinism,
NTK-SAP end to end against the deep-copy reference, and every input error."""

import copy
import math

import pytest
import torch
from torch import nn

import ntksap
from ntksap.models import kaiming_init
from ntksap.pruning import kept_count, scheduled_density, select_masks
from conftest import TinyConvBN, TinyMLP
from reference import ntksap_reference, topk_reference

SHAPE = (2, 6, 6)


def fake_data(n_batches=2, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *SHAPE, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n_batches)]


def run(method, model=None, **kw):
    model = model or TinyConvBN()
    kw.setdefault("input_shape", SHAPE)
    if ntksap.METHODS[method].needs_data:
        kw.setdefault("data", fake_data())
    kw.setdefault("progress", False)
    return ntksap.prune(model, method, **kw)


def test_schedule_arithmetic():
    assert scheduled_density(0.1, 1, 2) == pytest.approx(math.sqrt(0.1))
    assert scheduled_density(0.1, 2, 2) == pytest.approx(0.1)
    assert scheduled_density(0.2, 1, 4, "linear") == pytest.approx(0.8)
    assert kept_count(0.10739, 270896) == round(0.10739 * 270896)
    with pytest.raises(ValueError, match="schedule"):
        scheduled_density(0.1, 1, 2, "cosine")


@pytest.mark.parametrize("method", sorted(ntksap.METHODS))
@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_exact_kept_counts_every_iteration_and_no_revival(method, schedule):
    torch.manual_seed(0)
    model = TinyConvBN()
    N = sum(p.numel() for p in ntksap.prunable_parameters(model).values())
    d, T = 1 - 0.85, 4
    seen = []
    kw = dict(rounds=1, num_samples=6, batch_size=4) if method == "ntksap" else {}
    masks = run(method, model, sparsity=0.85, iterations=T, schedule=schedule,
                callback=lambda t, m, s: seen.append((t, copy.deepcopy(m), s)), **kw)
    assert [t for t, _, _ in seen] == list(range(1, T + 1))
    for t, m, s in seen:
        assert m.kept == round(scheduled_density(d, t, T, schedule) * N)
        assert set(s) == set(m)
    for (_, prev, _), (_, cur, _) in zip(seen, seen[1:]):
        for n in cur:
            assert torch.all(cur[n] <= prev[n]), f"{n} revived a pruned weight"
    assert masks.kept == round(d * N)


def test_scores_passed_to_callback_are_masked():
    seen = []
    run("random", sparsity=0.9, iterations=3, callback=lambda t, m, s: seen.append((copy.deepcopy(m), s)))
    (m1, _), (_, s2) = seen[0], seen[1]
    for n in m1:
        assert torch.all(s2[n][m1[n] == 0] == 0)


def test_global_scope_keeps_the_largest_magnitudes():
    model = TinyConvBN()
    run("magnitude", model, sparsity=0.6)
    # after prune the model holds the original weights with pruned ones zeroed; compare to a fresh copy
    kept_vals, cut_vals = [], []
    torch.manual_seed(0)
    ref = TinyConvBN()
    torch.manual_seed(0)
    model2 = TinyConvBN()
    masks2 = run("magnitude", model2, sparsity=0.6)
    for n, p in ntksap.prunable_parameters(ref).items():
        kept_vals.append(p.detach().abs()[masks2[n] == 1])
        cut_vals.append(p.detach().abs()[masks2[n] == 0])
    assert torch.cat(kept_vals).min() >= torch.cat(cut_vals).max()


def test_local_scope_prunes_each_layer_to_the_density():
    model = TinyConvBN()
    masks = run("magnitude", model, sparsity=0.7, scope="local")
    for n, m in masks.items():
        assert m.sum().item() == round(0.3 * m.numel())
    glob = run("magnitude", TinyConvBN(), sparsity=0.7)
    assert glob.kept == round(0.3 * glob.numel)


def test_ties_are_broken_by_position_and_reference_topk_agrees():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0, 0.5]), "b": torch.tensor([2.0, 0.0])}
    masks = {"a": torch.ones(4), "b": torch.tensor([1.0, 1.0])}
    out = select_masks(scores, masks, 0.5)
    assert out["a"].tolist() == [0, 1, 1, 0] and out["b"].tolist() == [1, 0]
    ref = topk_reference(scores, masks, 3)
    assert all(torch.equal(out[n], ref[n]) for n in out)
    # a dead weight never comes back even if every live score is zero
    dead = select_masks({"a": torch.zeros(4)}, {"a": torch.tensor([0.0, 1.0, 1.0, 1.0])}, 0.5)
    assert dead["a"].tolist() == [0, 1, 1, 0]


def test_model_keeps_original_init_with_masks_applied():
    torch.manual_seed(3)
    model = TinyConvBN()
    before = copy.deepcopy(model.state_dict())
    masks = run("ntksap", model, sparsity=0.8, iterations=2, rounds=1, num_samples=8)
    for n, v in model.state_dict().items():
        expect = before[n] * masks[n] if n in masks else before[n]
        assert torch.equal(v, expect), n
    assert model.training  # mode restored


def test_prune_leaves_the_callers_rng_alone():
    model = TinyConvBN()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run("ntksap", model, sparsity=0.5, iterations=1, rounds=1, num_samples=4)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["random", "ntksap", "synflow", "iterative_snip", "grasp"])
def test_same_seed_bit_identical_masks(method):
    kw = dict(iterations=3, rounds=2, num_samples=10, batch_size=4) if method == "ntksap" else \
        dict(iterations=3) if method in ("synflow", "iterative_snip") else {}

    def once(seed):
        torch.manual_seed(7)  # same model every time
        return run(method, TinyConvBN(), sparsity=0.8, seed=seed, **kw)

    a, b = once(0), once(0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    if method in ("random", "ntksap"):
        c = once(1)
        assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("bn_mode,statistics", [("unperturbed", "one_pass"), ("unperturbed_two_pass", "two_pass")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ntksap_end_to_end_matches_deep_copy_reference(channels_last, bn_mode, statistics):
    torch.manual_seed(11)
    model = TinyConvBN()
    ref_model = copy.deepcopy(model)
    seen = []
    masks = ntksap.prune(model, "ntksap", 0.8, input_shape=SHAPE, iterations=3, rounds=2, epsilon=0.01,
                         num_samples=10, batch_size=4, seed=5, channels_last=channels_last, progress=False,
                         bn_mode=bn_mode, callback=lambda t, m, s: seen.append(s))
    ref_masks, ref_scores = ntksap_reference(ref_model, 0.8, SHAPE, iterations=3, rounds=2, epsilon=0.01,
                                             num_samples=10, batch_size=4, seed=5, init_fn=kaiming_init,
                                             statistics=statistics)
    for s, r in zip(seen, ref_scores):
        for n in r:
            # one pass: our statistics by batch_norm (Welford), the reference's by var(): 1e-4 of the largest score
            torch.testing.assert_close(s[n], r[n], rtol=1e-5, atol=1e-4 * r[n].abs().max().item())
    assert all(torch.equal(masks[n], ref_masks[n]) for n in masks)


def test_custom_init_fn_is_used_for_redraws():
    calls = []

    def init(module):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            calls.append(type(module).__name__)
            nn.init.normal_(module.weight, std=0.1)

    run("ntksap", sparsity=0.5, iterations=2, rounds=1, num_samples=8, batch_size=4, init_fn=init)
    assert len(calls) == 2 * 2 * 3  # iterations x batches x prunable modules


def test_ntksap_ablation_switches():
    torch.manual_seed(0)
    model = TinyConvBN()
    base = dict(sparsity=0.8, iterations=2, rounds=1, num_samples=8, batch_size=8)
    noise = run("ntksap", copy.deepcopy(model), **base)
    fixed = run("ntksap", copy.deepcopy(model), redraw=False, **base)
    real = run("ntksap", copy.deepcopy(model), noise_inputs=False, data=fake_data(), **base)
    for other in (fixed, real):
        assert other.kept == noise.kept and any(not torch.equal(other[n], noise[n]) for n in noise)
    # fixed weights: scores are those of the model's own weights, so a second model with other
    # weights gives other masks, while redrawn scoring ignores the model's weights entirely
    torch.manual_seed(1)
    other_model = TinyConvBN()
    assert all(torch.equal(run("ntksap", copy.deepcopy(other_model), **base)[n], noise[n]) for n in noise)
    assert any(not torch.equal(run("ntksap", other_model, redraw=False, **base)[n], fixed[n]) for n in noise)
    with pytest.raises(ValueError, match="data=None"):
        run("ntksap", TinyConvBN(), noise_inputs=False, **base)


def test_data_dependent_methods_use_the_data():
    torch.manual_seed(0)
    model = TinyConvBN()
    a = run("snip", copy.deepcopy(model), sparsity=0.7, data=fake_data(seed=0))
    b = run("snip", copy.deepcopy(model), sparsity=0.7, data=fake_data(seed=1))
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_paper_models_prune_to_exact_density():
    model = ntksap.build_model("resnet20")
    masks = ntksap.prune(model, "synflow", 0.8926, input_shape=(3, 32, 32), progress=False)
    assert masks.kept == round((1 - 0.8926) * masks.numel)
    # SynFlow at its T = 100 avoids layer collapse: no layer is emptied (the 1x1 shortcuts come closest,
    # as in the authors' masks), the stem and the classifier keep most of their weights
    assert min(m.sum().item() for m in masks.values()) > 0
    assert masks["conv.weight"].mean() > 0.85 and masks["fc.weight"].mean() > 0.6


# -- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="lottery"), r"method='lottery' is not allowed.*; allowed: one of 'grasp'"),
    (dict(method="snp"), r"method='snp' is not allowed \(did you mean 'snip'\?\); allowed: one of 'grasp'"),
    (dict(epsilon=float("inf")), r"epsilon=inf is not allowed; allowed: a finite number > 0"),
    (dict(num_samples=0), r"num_samples=0 is not allowed; allowed: an integer >= 1 or None"),
    (dict(sparsity=1.0), r"sparsity=1.0 .* \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity=-0.1"),
    (dict(sparsity=float("nan")), r"sparsity=nan"),
    (dict(iterations=0), r"iterations=0 .* integer >= 1"),
    (dict(iterations=2.5), r"iterations=2.5"),
    (dict(rounds=0), r"rounds=0"),
    (dict(epsilon=0.0), r"epsilon=0.0"),
    (dict(batch_size=0), r"batch_size=0"),
    (dict(scope="layer"), r"scope='layer' is not allowed.*; allowed: one of 'global', 'local'"),
    (dict(schedule="cosine"), r"schedule='cosine' is not allowed.*; allowed: one of 'exponential', 'linear'"),
    (dict(method="snip", data=None), r"data=None is not allowed for method='snip'"),
    (dict(method="grasp", data=[]), r"data is empty"),
    (dict(input_shape=None), r"input_shape=None is not allowed"),
    (dict(input_shape=(2, 0, 6)), r"input_shape=\(2, 0, 6\)"),
    (dict(input_shape=(3, 6, 6)), r"input_shape=\(3, 6, 6\) does not fit the model"),
    (dict(callback=3), r"callback=3 is not callable"),
    (dict(device="gpu7"), r"device='gpu7' is not allowed; allowed: None .*'cpu', 'cuda'"),
    (dict(exclude=["*"]), r"nothing prunable"),
])
def test_bad_input_names_argument_value_and_allowed(kwargs, match):
    args = dict(method="ntksap", sparsity=0.5, input_shape=SHAPE, progress=False)
    args.update(kwargs)
    method = args.pop("method")
    with pytest.raises(ValueError, match=match):
        ntksap.prune(TinyConvBN(), method, **args)


def test_model_without_prunable_weights_is_refused():
    with pytest.raises(ValueError, match="nothing prunable"):
        ntksap.prune(nn.Sequential(nn.BatchNorm1d(3)), "magnitude", 0.5, input_shape=(3,))


def test_non_finite_scores_are_refused_naming_the_layer():
    model = TinyMLP()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite .* 'fc1.weight'"):
        ntksap.prune(model, "magnitude", 0.5, input_shape=(5,))


def test_errors_come_before_expensive_work(monkeypatch):
    called = []
    monkeypatch.setitem(ntksap.METHODS, "ntksap",
                        ntksap.METHODS["ntksap"].__class__(lambda *a: called.append(1), 20))
    with pytest.raises(ValueError):
        ntksap.prune(TinyConvBN(), "ntksap", 0.5, input_shape=SHAPE, scope="bad")
    assert not called
