"""``ntksap.profiling.SavedTensorMeter`` against hand-counted graphs, and the
memory promise of NTK-SAP: one noise mini-batch's activations at a time."""

import torch

import ntksap
from ntksap.profiling import SavedTensorMeter


def test_meter_counts_saved_tensors_while_their_graph_lives():
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6, 5, requires_grad=True)
    with SavedTensorMeter() as meter:
        prod = a * b                         # mul saves both factors
        assert meter.live_bytes == a.nbytes + b.nbytes
        sq = prod.pow(2)                     # pow saves its input: a third storage
        assert meter.live_bytes == meter.peak_bytes == a.nbytes + b.nbytes + prod.nbytes
        twice = a * a                        # the same storage saved twice is counted once
        assert meter.live_bytes == a.nbytes + b.nbytes + prod.nbytes
        del twice
        sq.sum().backward()                  # backward frees the saved tensors
        del prod, sq
    assert meter.live_bytes == 0
    assert meter.total_bytes == a.nbytes + b.nbytes + a.nbytes    # a * b has a's shape and dtype
    assert a.grad is not None


def test_ntksap_holds_one_noise_mini_batch_of_activations_at_a_time(tiny_conv):
    """Scoring 4 mini-batches keeps no more saved-for-backward memory alive at
    once than scoring 1 (each batch's graphs are freed before the next), while
    4 times as much is saved over the whole run."""
    kw = dict(input_shape=(2, 6, 6), iterations=2, rounds=2, epsilon=0.01, batch_size=8, seed=0,
              progress=False, apply=False)
    peaks, totals = [], []
    for batches in (1, 4):
        with SavedTensorMeter() as meter:
            ntksap.prune(tiny_conv, "ntksap", 0.7, num_samples=8 * batches, **kw)
        assert meter.live_bytes == 0
        peaks.append(meter.peak_bytes)
        totals.append(meter.total_bytes)
    assert peaks[0] > 0 and peaks[1] == peaks[0]
    assert totals[1] > 3.5 * totals[0]
    # the meter does see graphs that are kept alive (what this test guards against):
    with SavedTensorMeter() as one:
        kept = [tiny_conv(torch.randn(8, 2, 6, 6)).sum()]
    with SavedTensorMeter() as four:
        kept = [tiny_conv(torch.randn(8, 2, 6, 6)).sum() for _ in range(4)]
    assert four.live_bytes == four.peak_bytes > 3 * one.peak_bytes
    del kept
