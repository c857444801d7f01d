"""Comparing NTK spectra (ntksap.spectra) and the spectrum figures (ntksap.figures.spectra), against
explicit loops over eigenvalues."""

import math

import numpy as np
import pandas as pd
import pytest

from ntksap import spectra


def naive_log_distance(a, b):
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    total = 0.0
    for x, y in zip(a, b):
        total += abs(math.log10(max(x, 1e-30)) - math.log10(max(y, 1e-30)))
    return total / len(a)


def long_frame(spectra_by_key, keys):
    rows = []
    for key, eig in spectra_by_key.items():
        key = key if isinstance(key, tuple) else (key,)
        for i, e in enumerate(sorted(eig, reverse=True)):
            rows.append({**dict(zip(keys, key)), "index": i, "eigenvalue": e})
    return pd.DataFrame(rows)


def test_log_distance_matches_a_loop_and_its_meaning():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=30), rng.lognormal(size=30)
    assert spectra.log_distance(a, b) == pytest.approx(naive_log_distance(a, b), rel=1e-12)
    assert spectra.log_distance(b, b) == 0.0
    assert spectra.log_distance(b / 10, b) == pytest.approx(1.0)  # ten times smaller everywhere
    assert spectra.log_distance(rng.permutation(a), b) == pytest.approx(spectra.log_distance(a, b))  # sorted first
    zero = np.array([1.0, 0.0, -1e-12])  # rounding noise of a singular kernel counts as the floor
    assert spectra.log_distance(zero, np.ones(3)) == pytest.approx(naive_log_distance(zero, np.ones(3)))
    with pytest.raises(ValueError, match="same number"):
        spectra.log_distance(a, b[:5])


def test_relative_spectra_and_distances_per_key():
    rng = np.random.default_rng(1)
    dense = {s: rng.lognormal(size=8) for s in (0.5, 0.9)}
    pruned = {(s, it): dense[s] * rng.uniform(0.1, 1.0, 8) for s in (0.5, 0.9) for it in (1, 4)}
    ref = long_frame(dense, ["sparsity"])
    frame = long_frame(pruned, ["sparsity", "iteration"])
    rel = spectra.relative_spectra(frame, ref, on=["sparsity"])
    for r in rel.itertuples():  # each eigenvalue over the reference's of the same rank and sparsity
        expected = sorted(dense[r.sparsity], reverse=True)[r.index]
        assert r.reference == expected and r.relative == pytest.approx(r.eigenvalue / expected)
    d = spectra.distances(frame, ref, by=["sparsity", "iteration"], on=["sparsity"])
    assert len(d) == 4
    for r in d.itertuples():
        assert r.log_distance == pytest.approx(naive_log_distance(pruned[(r.sparsity, r.iteration)],
                                                                  dense[r.sparsity]))
    with pytest.raises(ValueError, match="more than one spectrum"):
        spectra.relative_spectra(frame, frame, on=["sparsity"])  # two iterations per sparsity
    with pytest.raises(ValueError, match="lacks column"):
        spectra.relative_spectra(frame, ref.drop(columns="sparsity"), on=["sparsity"])
    with pytest.raises(ValueError, match="ranks or keys"):
        spectra.relative_spectra(frame, ref[ref["sparsity"] == 0.5], on=["sparsity"])
    with pytest.raises(ValueError, match="must be among"):
        spectra.distances(frame, ref, by=["iteration"], on=["sparsity"])


def test_final_snapshots_keep_the_last_iteration_of_each_pruning():
    frame = long_frame({(0.5, 0): [3, 2], (0.5, 1): [2, 1], (0.5, 20): [1, 0.5], (0.9, 0): [3, 2],
                        (0.9, 7): [1, 0.1]}, ["sparsity", "iteration"])
    last = spectra.final_snapshots(frame)
    assert sorted(set(zip(last["sparsity"], last["iteration"]))) == [(0.5, 20), (0.9, 7)]
    assert len(last) == 4


def test_spectrum_figures_draw_every_spectrum_and_no_empty_panel():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ntksap.figures import spectra as figures

    rng = np.random.default_rng(2)
    sparsities = [0.5, 0.7, 0.8, 0.9, 0.95]
    dense = long_frame({s: rng.lognormal(size=6) for s in sparsities}, ["sparsity"])
    frame = long_frame({(s, it): rng.lognormal(size=6) for s in sparsities for it in (0, 1, 5)},
                       ["sparsity", "iteration"])
    rel = spectra.relative_spectra(frame, dense, on=["sparsity"])
    axes = figures.plot_spectrum_facets(rel, y="relative")  # 5 panels, 4 a row: 8 axes, 3 hidden
    visible = [ax for ax in axes if ax.get_visible()]
    assert len(axes) == 8 and len(visible) == 5
    for ax in visible:
        assert len([ln for ln in ax.get_lines() if ln.get_linestyle() != ":"]) == 3  # one per iteration
        assert ax.get_yscale() == "log"
    assert all(not ax.get_visible() for ax in axes[5:])
    plt.close("all")
    summary = pd.DataFrame({"label": ["Random", "NTK-SAP", "SNIP"], "log_distance": [0.9, 0.2, 0.5],
                            "trace": [1.0, 2.0, 3.0], "condition": [10.0, 20.0, 30.0]})
    ax = figures.plot_distances(summary, hue=None)
    heights = [p.get_height() for p in ax.patches]
    assert heights == [0.9, 0.2, 0.5]
    assert ax.patches[1].get_facecolor()[:3] == (0.0, 0.0, 0.0)  # NTK-SAP in black, as in Figure 1
    fig = figures.plot_distances_with_table(summary)
    bars = fig.axes[1]
    assert [p.get_height() for p in bars.patches] == [0.2, 0.5, 0.9]  # closest first, as the table
    assert [t.get_text() for t in bars.get_xticklabels()] == ["NTK-SAP", "SNIP", "Random"]
    plt.close("all")
    eig = long_frame({"Dense (unpruned)": [4, 2, 1], "NTK-SAP": [3, 1, 0.5], "Random": [2, 0.1, 0.0]}, ["label"])
    ax = figures.plot_spectra(eig)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert lines["Dense (unpruned)"].get_linestyle() == "--" and len(lines["Random"].get_xdata()) == 2  # 0 left out
    with pytest.raises(ValueError, match="hue='method'"):
        figures.plot_spectra(eig, hue="method")
    plt.close("all")
