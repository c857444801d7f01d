"""Final and best test accuracy (``plot.accuracy``) from the training results
to the summary, Table 1, ``metrics.json``, the ``dvc plots`` series and the
figures, on a fake experiment with known histories. Fast: no training, no
notebooks, except one 3-epoch training on digits."""

import json

import matplotlib
import pandas as pd
import pytest
import yaml

from ntksap import config, layout, params, results
from ntksap.figures import accuracy as accuracy_figures
from ntksap.params import ParamsError

matplotlib.use("Agg")

# test top-1 per epoch of (run, seed, sparsity); final = the last, best = the highest (its epoch)
HISTORIES = {
    ("magnitude", 0, 0.5): [40.0, 70.0, 60.0],
    ("magnitude", 0, 0.9): [20.0, 30.0, 35.0],
    ("magnitude", 1, 0.5): [50.0, 80.0, 80.0],  # a tie: the first epoch with the highest counts
    ("magnitude", 1, 0.9): [25.0, 45.0, 40.0],
    ("ntksap", 0, 0.5): [60.0, 90.0, 85.0],
    ("ntksap", 0, 0.9): [30.0, 50.0, 20.0],
    ("ntksap", 1, 0.5): [55.0, 65.0, 75.0],
    ("ntksap", 1, 0.9): [35.0, 55.0, 45.0],
}


def _final(run, s):
    return [HISTORIES[run, seed, s][-1] for seed in (0, 1)]


def _best(run, s):
    return [max(HISTORIES[run, seed, s]) for seed in (0, 1)]


def _cfg(*overrides):
    return params.parse_params(config.compose("micro", ["seeds=[0,1]", *overrides]))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``results/micro/train/<run>-<seed>/{results,history}.csv`` as the train
    stage writes them; magnitude's results.csv lacks the best_* columns (a run
    trained before they were recorded), so they come from its history."""
    monkeypatch.chdir(tmp_path)
    cfg = _cfg()
    for run in cfg.runs:
        for seed in cfg.seeds:
            rows, hist = [], []
            for s in cfg.sparsities:
                top1 = HISTORIES[run, seed, s]
                top5 = [min(100.0, a + 10) for a in top1]
                hist += [{"sparsity": s, "epoch": e + 1, "test_top1": a, "test_top5": b} for e, (a, b)
                         in enumerate(zip(top1, top5))]
                best = top1.index(max(top1))
                row = {"sparsity": s, "tag": layout.sparsity_tag(s), "density": 1 - s, "test_top1": top1[-1],
                       "test_top5": top5[-1], "epochs": len(top1)}
                if run != "magnitude":
                    row.update(best_test_top1=top1[best], best_test_top5=top5[best], best_epoch=best + 1)
                rows.append(row)
            out = layout.train_dir(cfg, run, seed)
            out.mkdir(parents=True)
            pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
            pd.DataFrame(hist).to_csv(out / "history.csv", index=False)
    return tmp_path


def test_collected_results_and_summary_hold_the_final_and_the_best_accuracy(fake):
    cfg = _cfg()
    collected = results.collect_results(cfg)
    for row in collected.itertuples():
        top1 = HISTORIES[row.run, row.seed, row.sparsity]
        assert row.test_top1 == top1[-1] and row.best_test_top1 == max(top1)
        assert row.best_epoch == top1.index(max(top1)) + 1  # filled from the history for magnitude
        assert row.best_test_top5 == min(100.0, max(top1) + 10)  # top-5 of the best top-1 epoch
    assert collected["best_epoch"].dtype.kind == "i"
    final, best = results.summarise(collected), results.summarise(collected, "best")
    for run in cfg.runs:
        for s in cfg.sparsities:
            f = final[(final["run"] == run) & (final["sparsity"] == s)].iloc[0]
            b = best[(best["run"] == run) & (best["sparsity"] == s)].iloc[0]
            assert f["mean"] == pytest.approx(sum(_final(run, s)) / 2) and f["seeds"] == 2
            assert b["mean"] == pytest.approx(sum(_best(run, s)) / 2) and b["seeds"] == 2
            assert f["std"] == pytest.approx(pd.Series(_final(run, s)).std())
            assert b["std"] == pytest.approx(pd.Series(_best(run, s)).std())
            for summary in (f, b):  # both accuracies, whichever is chosen
                assert summary["final"] == f["mean"] and summary["best"] == b["mean"]
    assert set(final["accuracy"]) == {"final"} and set(best["accuracy"]) == {"best"}


def test_plot_accuracy_best_switches_table_metrics_series_and_figure_captions(fake):
    import matplotlib.pyplot as plt

    out = fake / "plots"
    tables = {}
    for which in ("final", "best"):
        cfg = _cfg(f"plot.accuracy={which}")
        assert cfg.plot.accuracy == which
        summary = results.summarise(results.collect_results(cfg), cfg.plot.accuracy)
        table = results.accuracy_table(summary)
        tables[which] = table
        caption = results.accuracy_caption(which)
        assert caption == {"final": "final test top-1 (%)", "best": "best test top-1 over epochs (%)"}[which]
        assert caption in results.to_markdown(table).splitlines()[0]  # the header says which
        values = _final if which == "final" else _best
        for run in cfg.runs:
            for s in cfg.sparsities:
                v = values(run, s)
                mean, std = sum(v) / 2, pd.Series(v).std()
                assert table.loc[cfg.label(run), layout.sparsity_label(s)] == f"{mean:.2f} ± {std:.2f}"
        # metrics.json: both accuracies, whatever the choice
        metrics = results.write_metrics(summary, fake / f"metrics_{which}.json")
        assert json.loads((fake / f"metrics_{which}.json").read_text()) == metrics
        assert set(metrics) == {"final", "best"}
        for run in cfg.runs:
            for s in cfg.sparsities:
                tag = layout.sparsity_tag(s)
                assert metrics["final"][run][tag] == pytest.approx(sum(_final(run, s)) / 2)
                assert metrics["best"][run][tag] == pytest.approx(sum(_best(run, s)) / 2)
        # the dvc plots series: the chosen accuracy under dvc.yaml's column, and which it is
        results.write_dvc_series(summary, results.collect_histories(cfg), out / which)
        series = pd.read_csv(out / which / "accuracy" / "ntksap.csv")
        assert list(series["test_top1"]) == pytest.approx([sum(values("ntksap", s)) / 2 for s in cfg.sparsities])
        assert set(series["accuracy"]) == {which}
        # the figure names it in its title and y label
        fig, ax = plt.subplots()
        accuracy_figures.plot_accuracy(summary, ax=ax, title="micro")
        assert ax.get_title() == f"micro: {caption}" and ax.get_ylabel() == caption
        plt.close(fig)
    assert not tables["final"].equals(tables["best"])


def test_learning_curves_say_what_final_and_best_are(fake):
    import matplotlib.pyplot as plt

    cfg = _cfg()
    fig, ax = plt.subplots()
    accuracy_figures.plot_curves(results.collect_histories(cfg), 0.9, ax=ax)
    assert "test top-1 (%) per epoch" in ax.get_title() and "final" in ax.get_title() and "best" in ax.get_title()
    plt.close(fig)


def test_a_bad_plot_accuracy_is_refused_naming_the_key(tmp_path, capsys):
    with pytest.raises(ParamsError) as exc:
        params.parse_params(config.compose("micro", ["plot.accuracy=top"]))
    msg = str(exc.value)
    for piece in ("plot.accuracy='top'", "allowed", "final", "best"):
        assert piece in msg, f"{piece!r} not in {msg!r}"
    bad = tmp_path / "params.yaml"  # what the pipeline's check stage runs
    data = config.compose("micro")
    data["plot"]["accuracy"] = "top"
    bad.write_text(yaml.safe_dump(data))
    assert config.main(["check", str(bad)]) == 2
    assert "plot.accuracy='top'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="plot.accuracy='top'"):
        results.summarise(pd.DataFrame(columns=["run", "label", "method", "sparsity", "test_top1"]), "top")


def test_training_records_the_best_epoch_and_its_top5(tmp_path, one_thread):
    """``train.train``'s metrics.json: best_* are those of the first epoch with
    the highest test top-1 in its history, the test_* those of the last."""
    import torch

    from ntksap import build_model, data, train

    bundle = data.get_dataset("digits", root=tmp_path / "data")
    torch.manual_seed(0)
    history = train.train(build_model("digits_cnn", 10), None, bundle, params.protocol("digits", epochs=3),
                          tmp_path / "run", progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    best = history.loc[history["test_top1"].idxmax()]
    assert m["best_test_top1"] == pytest.approx(best["test_top1"]) == pytest.approx(history["test_top1"].max())
    assert m["best_test_top5"] == pytest.approx(best["test_top5"]) and m["best_epoch"] == int(best["epoch"])
    assert m["test_top1"] == pytest.approx(history["test_top1"].iloc[-1]) and m["epochs"] == 3


def test_dvc_series_of_an_untrained_experiment_have_one_file_per_run(fake, tmp_path):
    """train.epochs = 0 (Figure 2's set): no history, yet every run gets its
    accuracy series and a one-point curve, its evaluation at init (DVC needs
    both output folders)."""
    cfg = _cfg()
    summary = results.summarise(results.collect_results(cfg), "final")
    empty = results.collect_histories(cfg).iloc[0:0]
    results.write_dvc_series(summary, empty, tmp_path)
    for run in cfg.runs:
        curve = pd.read_csv(tmp_path / "curves" / f"{run}.csv")
        top = summary[(summary["run"] == run) & (summary["sparsity"] == summary["sparsity"].max())]
        assert curve["epoch"].tolist() == [0] and curve["test_top1"].tolist() == pytest.approx(top["mean"].tolist())
        assert (tmp_path / "accuracy" / f"{run}.csv").is_file()
