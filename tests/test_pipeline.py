"""The DVC pipeline and its notebooks, end to end on a micro experiment.

Cost: the ``slow`` tests run ``dvc exp run -S experiment=micro`` (every stage
and notebook kind through papermill: 7 notebooks), then one notebook again after
a parameter change, in a temporary git + DVC copy of the repository: about 2
minutes on 2 busy CPU cores. The unit tests at the top take a few seconds.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ntksap import config, pipeline
from ntksap.masks import Masks

import dvcrepo

ROOT = Path(__file__).resolve().parents[1]


# -- helpers (fast) ------------------------------------------------------------------------
def test_sparsity_tags_and_axis_positions():
    assert pipeline.sparsity_tag(1 - 0.8 ** 18) == "sp98_20"
    assert pipeline.sparsity_tag(0.36) == "sp36_00" and pipeline.sparsity_tag(0.0) == "sp00_00"
    assert pipeline.sparsity_label(1 - 0.8 ** 14) == "95.60"
    ks = np.arange(2, 19, 2)
    assert np.allclose(pipeline.sparsity_position(1 - 0.8 ** ks), ks)  # evenly spaced, as in the paper


def test_paths_in_dvc_yaml_match_the_helpers():
    """Every stage of dvc.yaml writes where pipeline.py (and so the notebooks) reads."""
    from dvc.repo import Repo

    cfg = config.load_params(ROOT / "params.yaml")
    with Repo(str(ROOT)) as repo:
        outs = {s.addressing: [str(Path(o.fs_path).relative_to(ROOT)) for o in s.outs] for s in repo.index.stages}
    for run in cfg.runs:
        for seed in cfg.seeds:
            assert outs[f"prune@{run}-{seed}"] == [str(pipeline.prune_dir(cfg, run, seed))]
            assert outs[f"train@{run}-{seed}"] == [str(pipeline.train_dir(cfg, run, seed))]
    assert outs["spectrum"] == [str(pipeline.spectrum_dir(cfg))]
    assert str(pipeline.plots_dir(cfg)) in outs["plot"]
    assert set(outs) == {"check", "spectrum", "plot"} | {f"{st}@{r}-{s}" for st in ("prune", "train")
                                                         for r in cfg.runs for s in cfg.seeds}


def test_summaries_and_table_match_a_naive_computation():
    rng = np.random.default_rng(0)
    rows = [{"run": r, "label": r.upper(), "method": r, "seed": s, "sparsity": sp, "test_top1": rng.uniform(10, 90)}
            for r in ("snip", "ntksap") for s in (0, 1, 2) for sp in (0.5, 0.9)]
    rows += [{"run": "dense", "label": "Dense", "method": "dense", "seed": s, "sparsity": 0.0, "test_top1": 95.0 + s}
             for s in (0, 1, 2)]
    res = pd.DataFrame(rows)
    summ = pipeline.summarise(res)
    for (run, sp), g in res.groupby(["run", "sparsity"]):
        hit = summ[(summ["run"] == run) & (summ["sparsity"] == sp)].iloc[0]
        vals = g["test_top1"].to_numpy()
        assert hit["mean"] == pytest.approx(vals.sum() / len(vals))
        assert hit["std"] == pytest.approx(np.sqrt(((vals - vals.mean()) ** 2).sum() / (len(vals) - 1)))
        assert hit["seeds"] == 3
    table = pipeline.accuracy_table(summ, [0.9])
    ntk = res[(res.run == "ntksap") & (res.sparsity == 0.9)]["test_top1"]
    assert table.loc["NTKSAP", "90.00"] == f"{ntk.mean():.2f} ± {ntk.std(ddof=1):.2f}"
    assert table.loc["Dense", "90.00"] == "96.00 ± 1.00"  # a dense run fills every column
    md = pipeline.to_markdown(table)
    assert md.splitlines()[0] == "| method \\ sparsity (%): final test top-1 (%) | 90.00 |"  # names the accuracy
    assert len(md.splitlines()) == 2 + 3


def test_score_histogram_counts_every_live_weight_once():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(5, 7, generator=g), "b": torch.rand(11, generator=g)}
    previous = Masks({"a": (torch.rand(5, 7, generator=g) > 0.3).float(), "b": torch.ones(11)})
    scores = {n: s * previous[n] for n, s in scores.items()}
    final = Masks({n: previous[n] * (scores[n] > 0.5).float() for n in scores})
    h = pipeline._score_histogram(scores, previous, final, bins=10)
    alive = int(sum(m.sum() for m in previous.values()))
    assert h["pruned"].sum() + h["kept"].sum() == alive
    assert h["kept"].sum() == int(sum(m.sum() for m in final.values()))
    kept_bins = h[h["kept"] > 0]
    assert (kept_bins["right"] > 0.5).all()  # kept weights scored above the cut


def test_prune_kwargs_follow_the_run():
    cfg = config.parse_params(config.compose("ablation_fixed_weights"))
    kw = pipeline.prune_kwargs(cfg, "ntksap_redraw", 3, (3, 32, 32))
    assert (kw["iterations"], kw["rounds"], kw["epsilon"], kw["seed"], kw["batch_size"]) == (20, 5, 0.01, 3, 256)
    assert kw["redraw"] is True and kw["noise_inputs"] is True  # the paper's NTK-SAP
    assert pipeline.prune_kwargs(cfg, "ntksap_fixed", 3, (3, 32, 32))["redraw"] is False
    cfg = config.parse_params(config.compose("ablation_noise_vs_data"))
    assert pipeline.prune_kwargs(cfg, "ntksap_data", 0, (3, 32, 32))["noise_inputs"] is False
    assert pipeline.prune_kwargs(cfg, "ntksap_noise", 0, (3, 32, 32))["noise_inputs"] is True
    import inspect

    import ntksap

    assert set(kw) <= set(inspect.signature(ntksap.prune).parameters)  # every key is an option of prune


def test_prune_and_train_helpers_with_zero_epochs(tmp_path, monkeypatch):
    """``train.epochs: 0`` (the Figure 2 set) evaluates each pruned net at its
    init; the accuracy matches a naive evaluation of the masked network."""
    monkeypatch.chdir(tmp_path)
    data = config.compose("micro", ["train.epochs=0", "prune.track.mode=none"])
    data["data"]["root"] = str(ROOT / "data")  # the digits cache, if the repository has one
    cfg = config.parse_params(data)
    res = pipeline.prune_run(cfg, "magnitude", 0, tmp_path / "p")
    assert res.track.empty and list(res.masks["tag"]) == ["sp50_00", "sp90_00"]
    results, history = pipeline.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t")
    assert history.empty and list(results["epochs"]) == [0, 0]
    assert list(results["best_test_top1"]) == list(results["test_top1"]) and list(results["best_epoch"]) == [0, 0]
    assert list(results["best_test_top5"]) == list(results["test_top5"])  # no epochs: best = final
    bundle = pipeline.load_dataset(cfg)
    from ntksap.data import normalise

    x, y = normalise(bundle, bundle.test_images), bundle.test_labels
    for row in results.itertuples():
        model = pipeline.new_model(cfg, 10, 0)
        model.load_state_dict(torch.load(tmp_path / "p" / "init.pt", weights_only=True))
        masks = Masks.load(tmp_path / "p" / "masks" / f"{row.tag}.pt")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, m in masks.items():
                params[name].mul_(m)
            model.eval()
            acc = 100.0 * (model(x).argmax(1) == y).float().mean().item()
        assert row.test_top1 == pytest.approx(acc, abs=1e-6)


def test_train_stage_resumes_an_interrupted_run_from_its_checkpoint_folder(tmp_path, monkeypatch, one_thread):
    """DVC deletes a stage's outputs before running it again, so the train stage
    trains in ``results/<experiment>/checkpoints/``: after an interruption in
    epoch 2 of 3, the rerun trains only the missing epochs and its results
    equal an uninterrupted run's (another checkpoint folder)."""
    import ntksap.train as trainer

    monkeypatch.chdir(tmp_path)
    data = config.compose("micro", ["train.epochs=3", "prune.track.mode=none", "sparsities=[0.5]",
                                     "spectrum.sparsity=0.5"])
    data["data"]["root"] = str(ROOT / "data")
    cfg = config.parse_params(data)
    pipeline.prune_run(cfg, "magnitude", 0, tmp_path / "p")
    assert pipeline.checkpoints_dir(cfg, "magnitude", 0) == Path("results/micro/checkpoints/magnitude-0")
    reference, _ = pipeline.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "ref")

    real_evaluate, real_epoch, calls = trainer.evaluate, trainer.train_epoch, {"evaluate": 0, "epochs": 0}

    def evaluate_then_stop(*args, **kwargs):
        calls["evaluate"] += 1
        if calls["evaluate"] == 2:                    # in epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    def counted_epoch(*args, **kwargs):
        calls["epochs"] += 1
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t", checkpoints=tmp_path / "ck")
    assert not (tmp_path / "t" / "results.csv").exists()
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    monkeypatch.setattr(trainer, "train_epoch", counted_epoch)
    calls["epochs"] = 0
    res, hist = pipeline.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t", checkpoints=tmp_path / "ck")
    assert calls["epochs"] == 2                       # epochs 2 and 3 only
    assert res.drop(columns="density").equals(reference.drop(columns="density"))
    ref_hist = pd.read_csv(tmp_path / "ref" / "history.csv").drop(columns="epoch_time")
    assert hist.drop(columns="epoch_time").reset_index(drop=True).equals(ref_hist)
    a = torch.load(tmp_path / "t" / "sp50_00" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "sp50_00" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the pipeline end to end (slow) ---------------------------------------------------------------
MICRO_RUNS = ("magnitude", "ntksap")  # the `micro` set: 2 runs x 2 sparsities x 1 seed, 1 epoch


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A committed git + DVC copy of the project (``dvcrepo.make_repo``)."""
    return dvcrepo.make_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def reproduced(repo):
    """The documented switch to a named set: DVC composes params.yaml with
    Hydra, then runs every stage."""
    out = dvcrepo.run(repo, "dvc", "exp", "run", "-S", "experiment=micro")
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_notebook(repo, reproduced):
    cfg = config.load_params(repo / "params.yaml")
    expected = {"check", "spectrum", "plot"} | {f"{s}@{r}-0" for s in ("prune", "train") for r in MICRO_RUNS}
    assert dvcrepo.ran(reproduced) == expected
    for nb in [*(repo / "results/micro").rglob("*.ipynb")]:
        book = json.loads(nb.read_text())
        errors = [o for c in book["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{nb}: {errors}"
        injected = [c for c in book["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert injected, f"{nb} was not run by papermill"
    notebooks = sorted(str(p.relative_to(repo / "results/micro")) for p in (repo / "results/micro").rglob("*.ipynb"))
    assert notebooks == ["plots/plot.ipynb", "prune/magnitude-0/prune.ipynb", "prune/ntksap-0/prune.ipynb",
                         "spectrum/spectrum.ipynb", "train/magnitude-0/train.ipynb", "train/ntksap-0/train.ipynb"]
    assert cfg.experiment == "micro" and config.to_dict(cfg) == config.to_dict(config.parse_params(
        config.compose("micro")))  # params.yaml is the named set
    shown = dvcrepo.run(repo, "dvc", "exp", "show", "--json").stdout
    assert "results/micro/metrics.json" in shown and "experiment" in shown


@pytest.mark.slow
def test_prune_stage_outputs(repo, reproduced):
    cfg = config.load_params(repo / "params.yaml")
    for run in MICRO_RUNS:
        out = repo / pipeline.prune_dir(cfg, run, 0)
        manifest = pd.read_csv(out / "masks.csv")
        assert manifest["sparsity"].tolist() == cfg.sparsities
        init = torch.load(out / "init.pt", weights_only=True)
        for row in manifest.itertuples():
            masks = Masks.load(out / row.path)
            n = sum(m.numel() for m in masks.values())
            kept = int(sum(m.sum() for m in masks.values()))
            assert kept == round((1 - row.sparsity) * n) == row.kept  # global top-k keeps exactly this many
            assert set(masks) <= set(init) and all(masks[k].shape == init[k].shape for k in masks)
        dens = pd.read_csv(out / "density.csv")
        total = dens[dens["name"] == "total"].set_index("sparsity")["kept"]
        assert total.to_dict() == dict(zip(manifest["sparsity"], manifest["kept"]))
        track = pd.read_csv(out / "track.csv")
        its = track.groupby("sparsity")["iteration"].agg(["min", "max"])
        assert (its["min"] == 0).all() and (its["max"] == cfg.runs[run].iterations).all()
        assert set(track["iteration"]) == ({0, 1} if cfg.runs[run].iterations == 1 else {0, 1, 2, 4})
        scores = pd.read_csv(out / "scores.csv")
        assert set(scores["sparsity"]) == set(cfg.sparsities)
    # the same seed gives the same init for every run
    a = torch.load(repo / pipeline.prune_dir(cfg, "magnitude", 0) / "init.pt", weights_only=True)
    b = torch.load(repo / pipeline.prune_dir(cfg, "ntksap", 0) / "init.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_spectrum_and_plot_outputs(repo, reproduced):
    cfg = config.load_params(repo / "params.yaml")
    res_dir = repo / "results/micro"
    for run in MICRO_RUNS:
        out = repo / pipeline.train_dir(cfg, run, 0)
        res = pd.read_csv(out / "results.csv")
        assert res["sparsity"].tolist() == cfg.sparsities and res["test_top1"].between(0, 100).all()
        hist = pd.read_csv(out / "history.csv")
        assert len(hist) == cfg.train.epochs * len(cfg.sparsities)
        for tag in res["tag"]:
            assert (out / tag / "metrics.json").is_file() and (out / tag / "model.pt").is_file()
            ckpts = list((repo / pipeline.checkpoints_dir(cfg, run, 0)).glob(f"{tag}-*/checkpoint.pt"))
            assert len(ckpts) == 1  # the resumable run lives outside DVC's output
    eig = pd.read_csv(res_dir / "spectrum/eigenvalues.csv")
    counts = eig.groupby(eig.columns[0]).size()
    assert len(counts) == 1 + len(MICRO_RUNS) and (counts == cfg.spectrum.num_inputs * 10).all()
    assert (res_dir / "spectrum/ntk_spectrum.png").stat().st_size > 0
    plots = res_dir / "plots"
    for fig in ("accuracy_vs_sparsity", "training_curves", "layer_density"):
        assert (plots / f"{fig}.png").stat().st_size > 0 and (plots / f"{fig}.pdf").stat().st_size > 0
    assert (repo / "docs/figures/micro.png").stat().st_size > 0
    table = (plots / "table.md").read_text()
    assert "NTK-SAP" in table and "Magnitude" in table and "90.00" in table
    assert "final test top-1 (%)" in table.splitlines()[0]  # plot.accuracy's default, named in the header
    metrics = json.loads((res_dir / "metrics.json").read_text())
    assert set(metrics) == {"final", "best"}  # both, whichever the figures show
    acc = pd.read_csv(plots / "accuracy.csv")
    for run in MICRO_RUNS:
        for s in cfg.sparsities:
            mine = acc[(acc["run"] == run) & ((acc["sparsity"] - s).abs() < 1e-12)]
            assert metrics["final"][run][pipeline.sparsity_tag(s)] == pytest.approx(mine["test_top1"].mean(), abs=1e-4)
            assert metrics["best"][run][pipeline.sparsity_tag(s)] == pytest.approx(mine["best_test_top1"].mean(),
                                                                                   abs=1e-4)
        assert (plots / "accuracy" / f"{run}.csv").is_file() and (plots / "curves" / f"{run}.csv").is_file()
    shown = json.loads(dvcrepo.run(repo, "dvc", "metrics", "show", "--json").stdout)
    assert "results/micro/metrics.json" in json.dumps(shown)
    dvcrepo.run(repo, "dvc", "plots", "show", "-o", str(repo / "dvc_plots"))
    assert (repo / "dvc_plots" / "index.html").is_file()


def _changed(repo: Path) -> set[str]:
    return set(json.loads(dvcrepo.run(repo, "dvc", "status", "--json").stdout))


@pytest.mark.slow
def test_changing_one_parameter_reruns_only_what_it_affects(repo, reproduced):
    assert _changed(repo) == set()  # everything cached
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["experiment"] == "micro"
    try:
        # a new seed: its own (run, seed) stages and those that gather every run, not the cached ones
        config.write_params({**params, "seeds": [0, 1]}, repo / "params.yaml")
        changed = _changed(repo)
        assert {"prune@magnitude-1", "prune@ntksap-1", "train@magnitude-1", "train@ntksap-1"} <= changed
        assert {"prune@magnitude-0", "prune@ntksap-0", "train@magnitude-0", "train@ntksap-0"}.isdisjoint(changed)
        # NTK-SAP's iterations: NTK-SAP's prune stage (its train follows through its output), not magnitude's
        more = copy.deepcopy(params)
        more["runs"]["ntksap"]["iterations"] = 3
        config.write_params(more, repo / "params.yaml")
        assert _changed(repo) == {"check", "prune@ntksap-0", "spectrum", "plot"}
        # the Figure 2 probe size: only the spectrum stage (and the check) run again
        more = copy.deepcopy(params)
        more["spectrum"]["num_inputs"] = 5
        config.write_params(more, repo / "params.yaml")
        out = dvcrepo.run(repo, "dvc", "repro")
        assert dvcrepo.ran(out.stdout) == {"check", "spectrum"}, out.stdout
        assert "Stage 'prune@ntksap-0' didn't change, skipping" in out.stdout
        eig = pd.read_csv(repo / "results/micro/spectrum/eigenvalues.csv")
        assert (eig.groupby("label").size() == 5 * 10).all()
    finally:
        config.write_params(params, repo / "params.yaml")


@pytest.mark.slow
def test_a_bad_parameter_stops_dvc_repro_before_any_work(repo, reproduced):
    good = (repo / "params.yaml").read_text()
    try:
        for path, value, expected in [(("train", "epochs"), -1, "train.epochs=-1"),
                                      (("runs", "magnitude", "method"), "magnitud", "runs.magnitude.method='magnitud'")]:
            bad = yaml.safe_load(good)
            node = bad
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
            out = dvcrepo.run(repo, "dvc", "repro", check=False)
            text = out.stdout + out.stderr
            assert out.returncode != 0
            assert expected in text and "allowed" in text
            assert dvcrepo.ran(out.stdout) == {"check"}  # nothing after the check ran
    finally:
        (repo / "params.yaml").write_text(good)
