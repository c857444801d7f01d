"""The pruning loop's contract with the authors' code and with the GPU: the
authors' kept-count and tie rule, the prune set iterated once per iteration
(one batch at a time), TF32 off while scoring, every CUDA generator restored."""

import copy

import numpy as np
import pytest
import torch

import ntksap
from ntksap import pruning
from ntksap.masks import Masks
from ntksap.pruning import select_masks
from conftest import TinyConvBN

SHAPE = (2, 6, 6)


def authors_reference(scores, alive, density):
    """Their mask step, written out: k = int((1 - d) N); threshold = the k-th
    smallest score (dead weights score 0); prune every score <= threshold."""
    s = np.where(alive, scores, 0.0)
    k = int((1.0 - density) * s.size)
    if k < 1:
        return alive.astype(np.float32)
    threshold = np.sort(s, kind="stable")[k - 1]
    return ((s > threshold) & alive).astype(np.float32)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_authors_rule_matches_their_kthvalue_step_with_ties(scope):
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (6, 5), "b": (40,), "c": (3, 3, 2)}
    scores = {n: torch.randint(0, 6, s, generator=g).double() for n, s in shapes.items()}  # many ties
    masks = Masks({n: (torch.rand(s, generator=g) < 0.8).float() for n, s in shapes.items()})
    for density in (0.9, 0.5, 0.31, 0.05, 0.999):
        got = select_masks(scores, masks, density, scope, rule="authors")
        if scope == "global":
            flat = authors_reference(np.concatenate([scores[n].numpy().ravel() for n in shapes]),
                                     np.concatenate([masks[n].numpy().ravel() for n in shapes]) != 0, density)
            ref, i = {}, 0
            for n, s in shapes.items():
                ref[n] = flat[i:i + int(np.prod(s))].reshape(s)
                i += int(np.prod(s))
        else:
            ref = {n: authors_reference(scores[n].numpy().ravel(), masks[n].numpy().ravel() != 0,
                                        density).reshape(shapes[n]) for n in shapes}
        for n in shapes:
            np.testing.assert_array_equal(got[n].numpy(), ref[n], err_msg=f"{n} at d={density}")
            assert torch.all(got[n] <= masks[n])  # nothing revived


def test_authors_rule_keeps_n_minus_int_without_ties_and_round_differs_by_at_most_one():
    g = torch.Generator().manual_seed(1)
    scores = {"w": torch.rand(1001, generator=g)}
    masks = Masks({"w": torch.ones(1001)})
    for density in (0.8, 0.8 ** 7, 0.5004, 0.3337):
        a = select_masks(scores, masks, density, rule="authors")["w"].sum().item()
        r = select_masks(scores, masks, density, rule="round")["w"].sum().item()
        assert a == 1001 - int((1 - density) * 1001)
        assert r == round(density * 1001) and abs(a - r) <= 1


def test_count_rule_reaches_prune_and_is_validated():
    torch.manual_seed(0)
    model = TinyConvBN()
    seen = []
    ntksap.prune(copy.deepcopy(model), "synflow", 0.9, input_shape=SHAPE, iterations=4, count_rule="authors",
                 progress=False, callback=lambda t, m, s: seen.append(m.kept))
    N = Masks.ones_like(model).numel
    assert seen[-1] <= N - int((1 - (0.1 ** (4 / 4))) * N)
    with pytest.raises(ValueError, match=r"count_rule='nearest' is not allowed.*; allowed: one of 'round', 'authors'"):
        ntksap.prune(model, "synflow", 0.9, input_shape=SHAPE, count_rule="nearest")


class CountingLoader:
    """A re-iterable prune set that draws new batches on every pass (as a
    shuffling, augmenting DataLoader does) and counts its passes."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        g = torch.Generator().manual_seed(self.passes)
        for _ in range(2):
            yield torch.randn(8, *SHAPE, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_prune_set_is_iterated_once_per_iteration_and_each_pass_counts():
    torch.manual_seed(0)
    model = TinyConvBN()
    loader = CountingLoader()
    a = ntksap.prune(copy.deepcopy(model), "iterative_snip", 0.8, data=loader, iterations=5, progress=False)
    assert loader.passes == 1 + 5  # one look at the first batch, then one pass per iteration
    fixed = [next(iter(CountingLoader())) for _ in range(2)]
    b = ntksap.prune(copy.deepcopy(model), "iterative_snip", 0.8, data=fixed, iterations=5, progress=False)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the passes really fed the scores


def test_one_shot_iterators_are_read_once_and_bad_batches_are_refused():
    torch.manual_seed(0)
    model = TinyConvBN()
    batches = [(torch.randn(8, *SHAPE), torch.randint(0, 3, (8,))) for _ in range(2)]
    a = ntksap.prune(copy.deepcopy(model), "iterative_snip", 0.8, data=iter(batches), iterations=3, progress=False)
    b = ntksap.prune(copy.deepcopy(model), "iterative_snip", 0.8, data=batches, iterations=3, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="data is empty"):
        ntksap.prune(model, "snip", 0.8, data=iter([]))
    with pytest.raises(ValueError, match=r"batch 1 has inputs of shape \(3, 6, 6\), expected \(2, 6, 6\)"):
        ntksap.prune(model, "snip", 0.8, data=[batches[0], (torch.randn(8, 3, 6, 6), batches[0][1])])


def test_scoring_runs_without_tf32_and_restores_the_callers_setting():
    b = torch.backends
    before = b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision
    try:
        b.cuda.matmul.fp32_precision = "tf32"
        b.cudnn.conv.fp32_precision = "tf32"
        seen = []
        ntksap.prune(TinyConvBN(), "ntksap", 0.5, input_shape=SHAPE, iterations=2, rounds=1, num_samples=4,
                     progress=False, callback=lambda t, m, s: seen.append(
                         (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)))
        assert seen == [("ieee", "ieee")] * 2
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = before


def test_every_cuda_generator_is_forked_once_cuda_is_initialised(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert pruning._rng_devices(torch.device("cpu")) == [0, 1, 2]
    assert pruning._rng_devices(torch.device("cuda:1")) == [0, 1, 2]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert pruning._rng_devices(torch.device("cpu")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_of_every_device_are_restored():
    states = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    ntksap.prune(TinyConvBN(), "random", 0.5, input_shape=SHAPE, device="cuda", progress=False, seed=123)
    for i, s in enumerate(states):
        assert torch.equal(torch.cuda.get_rng_state(i), s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prune_set_stays_on_the_host():
    batches = [(torch.randn(8, *SHAPE), torch.randint(0, 3, (8,))) for _ in range(3)]
    masks = ntksap.prune(TinyConvBN(), "snip", 0.5, data=batches, device="cuda", progress=False)
    assert all(x.device.type == "cpu" for x, _ in batches) and masks.density == pytest.approx(0.5, abs=0.02)


def test_synflow_dtype_is_validated_and_float32_scores_in_float32():
    seen = []
    ntksap.prune(TinyConvBN(), "synflow", 0.5, input_shape=SHAPE, iterations=2, synflow_dtype="float32",
                 progress=False, callback=lambda t, m, s: seen.append({v.dtype for v in s.values()}))
    assert seen == [{torch.float32}] * 2
    with pytest.raises(ValueError, match=r"synflow_dtype='float16' is not allowed.*; allowed: one of 'float64', 'float32'"):
        ntksap.prune(TinyConvBN(), "synflow", 0.5, input_shape=SHAPE, synflow_dtype="float16")
