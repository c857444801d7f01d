"""The DVC pipeline and its notebooks, end to end on a micro experiment.

Cost: the ``slow`` tests run ``dvc exp run -S experiment=micro`` (every stage
and notebook kind through papermill: 7 notebooks), then one notebook again after
a parameter change, in a temporary git + DVC copy of the repository: about 2
minutes on 2 busy CPU cores. The unit tests at the top take a few seconds.
"""

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ntksap import config, experiment, layout, params, results
from ntksap.figures import style as figure_style
from ntksap.masks import Masks
from ntksap.stages import prune as prune_stage
from ntksap.stages import train as train_stage

import dvcrepo

ROOT = Path(__file__).resolve().parents[1]


def _micro(monkeypatch, overrides=(), **values):
    """The ``micro`` set with Hydra ``overrides`` and top-level ``values``, its
    digits found in the repository's data folder (``NTKSAP_DATA_ROOT``: where
    the data lives is machine config, not a parameter)."""
    monkeypatch.setenv("NTKSAP_DATA_ROOT", str(ROOT / "data"))  # the digits cache, if the repository has one
    return params.parse_params({**config.compose("micro", list(overrides)), **values})


# -- helpers (fast) ------------------------------------------------------------------------
def test_sparsity_tags_and_axis_positions():
    assert layout.sparsity_tag(1 - 0.8 ** 18) == "sp98_20"
    assert layout.sparsity_tag(0.36) == "sp36_00" and layout.sparsity_tag(0.0) == "sp00_00"
    assert layout.sparsity_label(1 - 0.8 ** 14) == "95.60"
    ks = np.arange(2, 19, 2)
    assert np.allclose(figure_style.sparsity_position(1 - 0.8 ** ks), ks)  # evenly spaced, as in the paper


def test_layout_names_every_result_path():
    cfg = params.parse_params(config.compose("micro"))
    r = Path("results/micro")
    assert layout.results_dir(cfg) == r and layout.params_ok_path(cfg) == r / "params.ok"
    assert layout.masks_dir(cfg, "snip", 2) == r / "masks/seed-2/snip"
    assert layout.prune_dir(cfg, "snip", 2) == r / "prune/seed-2/snip"
    assert layout.train_dir(cfg, "snip", 2) == r / "train/seed-2/snip"
    assert [layout.stage_dir(w, cfg, 2) for w in ("masks", "prune", "train")] == \
        [r / "masks/seed-2", r / "prune/seed-2", r / "train/seed-2"]
    assert layout.spectrum_dir(cfg) == r / "spectrum" and layout.plots_dir(cfg) == r / "plots"
    assert layout.series_dir(cfg) == r / "series" and layout.metrics_path(cfg) == r / "metrics.json"
    assert layout.checkpoints_dir(cfg, "snip", 2) == r / "checkpoints/snip-2"
    assert layout.notebook_path("prune", cfg, 2) == r / "notebooks/prune/seed-2.ipynb"
    assert layout.notebook_path("train", cfg, 2) == r / "notebooks/train/seed-2.ipynb"
    assert layout.notebook_path("spectrum", cfg) == r / "notebooks/spectrum.ipynb"
    assert layout.notebook_path("plot", cfg) == r / "notebooks/plot.ipynb"
    assert layout.timings_path("prune", cfg, 2) == r / "timings/prune/seed-2.csv"
    assert layout.timings_path("train", cfg, 2) == r / "timings/train/seed-2.csv"
    assert layout.prepared_path("cifar10") == Path("data/prepared/cifar10.pt")
    assert layout.mask_file("sp50_00") == "sp50_00.pt"
    with pytest.raises(ValueError, match=r"stage='trian' is not allowed \(did you mean 'train'\?\)"):
        layout.notebook_path("trian", cfg, 2)
    with pytest.raises(ValueError, match="stage='plot' is not allowed; allowed: one of 'prune', 'train'"):
        layout.timings_path("plot", cfg, 2)
    with pytest.raises(ValueError, match="what='spectrum' is not allowed"):
        layout.stage_dir("spectrum", cfg, 2)
    with pytest.raises(ValueError, match="needs a seed"):
        layout.notebook_path("prune", cfg)
    with pytest.raises(ValueError, match="takes no seed"):
        layout.notebook_path("plot", cfg, 2)


def test_each_stage_and_figure_module_imports_only_what_it_uses():
    """``ntksap.stages`` and ``ntksap.figures`` import nothing themselves, so a
    notebook importing one stage or figure module does not import the others
    (and its code dependencies stay exact)."""
    own = ["ntksap.stages." + m for m in ("prune", "train", "spectrum")] + \
          ["ntksap.figures." + m for m in ("style", "accuracy", "pruning", "spectra")] + ["ntksap.results"]
    uses = {"ntksap.figures.accuracy": {"ntksap.results", "ntksap.figures.style"}}  # what a module may import
    script = ("import importlib, json, sys\n"
              "loaded = {}\n"
              f"for name in {own!r}:\n"
              "    importlib.import_module(name)\n"
              "    loaded[name] = sorted(m for m in sys.modules if m.startswith('ntksap'))\n"
              "    for m in [m for m in sys.modules if m.startswith('ntksap')]:\n"
              "        del sys.modules[m]  # the next module is imported afresh\n"
              "print(json.dumps(loaded))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(done.stdout.splitlines()[-1])
    for name in own:
        others = set(own) & set(loaded[name]) - {name} - uses.get(name, set())
        assert not others, f"importing {name} imports {sorted(others)}"


def test_notebook_start_up_skips_the_slow_imports_it_does_not_use():
    """What every notebook stage pays before it computes: the stage modules and
    ``load_params`` do not import torchvision (about 2 s; only a download or
    a torchvision model needs it), and the runner (``python -m ntksap.execute``,
    papermill's command line) neither imports torch nor lets jsonschema build
    its rfc3987_syntax grammar (1.5 s), and still parses papermill's arguments."""
    script = ("import sys\n"
              "from ntksap import params\n"
              "from ntksap.stages import prune, train, spectrum\n"
              "params.load_params('params.yaml')\n"
              "print('torchvision' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split()[-1] == "False", "a notebook stage's start-up imports torchvision"
    runner = ("import sys, runpy\n"
              "sys.argv = ['papermill', '--help']\n"
              "try:\n"
              "    runpy.run_module('ntksap.execute', run_name='__main__')\n"
              "except SystemExit:\n"
              "    pass\n"
              "print('MODULES', 'torch' in sys.modules, sys.modules.get('rfc3987_syntax', 'absent'),\n"
              "      'papermill.cli' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "--parameters" in done.stdout, done.stdout[-2000:]          # papermill's own help text
    assert done.stdout.splitlines()[-1].split() == ["MODULES", "False", "None", "True"]


def test_committed_notebooks_are_clean_sources_for_the_pipelines_kernel():
    """No outputs, a papermill parameters cell, unique cell ids, and the kernel
    papermill runs them with (`-k` in dvc.yaml), so JupyterLab opens an executed
    copy on the same kernel."""
    import re

    from ntksap.lab import KERNEL            # what `python -m ntksap.lab install` installs

    kernels = set(re.findall(r"-k (\S+)", (ROOT / "dvc.yaml").read_text()))
    assert kernels == {KERNEL} and dvcrepo.KERNEL == KERNEL
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == KERNEL, path
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), f"{path} has outputs"
        assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1, path
        ids = [c.get("id") for c in nb["cells"]]
        assert None not in ids and len(set(ids)) == len(ids), f"{path}: cell ids missing or repeated"


def test_paths_in_dvc_yaml_match_the_helpers():
    """Every stage of dvc.yaml writes where ntksap.layout (and so the notebooks) reads."""
    from dvc.repo import Repo

    cfg = params.load_params(ROOT / "params.yaml")
    with Repo(str(ROOT)) as repo:
        outs = {s.addressing: {str(Path(o.fs_path).relative_to(ROOT)) for o in s.outs} for s in repo.index.stages}
    as_str = lambda *paths: {str(p) for p in paths}  # noqa: E731
    for seed in cfg.seeds:
        assert outs[f"prune@{seed}"] == as_str(layout.stage_dir("masks", cfg, seed), layout.stage_dir("prune", cfg, seed),
                                               layout.notebook_path("prune", cfg, seed),
                                               layout.timings_path("prune", cfg, seed))
        assert outs[f"train@{seed}"] == as_str(layout.stage_dir("train", cfg, seed),
                                               layout.notebook_path("train", cfg, seed),
                                               layout.timings_path("train", cfg, seed))
        for run in cfg.runs:  # each run's folders inside its seed's
            assert layout.masks_dir(cfg, run, seed).parent == layout.stage_dir("masks", cfg, seed)
            assert layout.prune_dir(cfg, run, seed).parent == layout.stage_dir("prune", cfg, seed)
            assert layout.train_dir(cfg, run, seed).parent == layout.stage_dir("train", cfg, seed)
    assert outs["check"] == as_str(layout.params_ok_path(cfg))
    assert outs["spectrum"] == as_str(layout.spectrum_dir(cfg), layout.notebook_path("spectrum", cfg))
    plot = as_str(layout.plots_dir(cfg), layout.notebook_path("plot", cfg), layout.metrics_path(cfg))
    assert plot <= outs["plot"]
    series = str(layout.series_dir(cfg))
    assert all(o in plot or o == series or o.startswith(series + "/") or o.startswith("docs/figures/")
               for o in outs["plot"]), outs["plot"]
    assert any(o == series or o.startswith(series + "/") for o in outs["plot"])
    prepare = {a for a in outs if a.split("@")[0] == "prepare"}
    assert any(str(layout.prepared_path(cfg.dataset)) in outs[a] for a in prepare), prepare
    assert set(outs) - prepare == {"check", "spectrum", "plot"} | {f"{st}@{s}" for st in ("prune", "train")
                                                                   for s in cfg.seeds}


def test_summaries_and_table_match_a_naive_computation():
    rng = np.random.default_rng(0)
    rows = [{"run": r, "label": r.upper(), "method": r, "seed": s, "sparsity": sp, "test_top1": rng.uniform(10, 90)}
            for r in ("snip", "ntksap") for s in (0, 1, 2) for sp in (0.5, 0.9)]
    rows += [{"run": "dense", "label": "Dense", "method": "dense", "seed": s, "sparsity": 0.0, "test_top1": 95.0 + s}
             for s in (0, 1, 2)]
    res = pd.DataFrame(rows)
    summ = results.summarise(res)
    for (run, sp), g in res.groupby(["run", "sparsity"]):
        hit = summ[(summ["run"] == run) & (summ["sparsity"] == sp)].iloc[0]
        vals = g["test_top1"].to_numpy()
        assert hit["mean"] == pytest.approx(vals.sum() / len(vals))
        assert hit["std"] == pytest.approx(np.sqrt(((vals - vals.mean()) ** 2).sum() / (len(vals) - 1)))
        assert hit["seeds"] == 3
    table = results.accuracy_table(summ, [0.9])
    ntk = res[(res.run == "ntksap") & (res.sparsity == 0.9)]["test_top1"]
    assert table.loc["NTKSAP", "90.00"] == f"{ntk.mean():.2f} ± {ntk.std(ddof=1):.2f}"
    assert table.loc["Dense", "90.00"] == "96.00 ± 1.00"  # a dense run fills every column
    md = results.to_markdown(table)
    assert md.splitlines()[0] == "| method \\ sparsity (%): final test top-1 (%) | 90.00 |"  # names the accuracy
    assert len(md.splitlines()) == 2 + 3


def test_score_histogram_counts_every_live_weight_once():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(5, 7, generator=g), "b": torch.rand(11, generator=g)}
    previous = Masks({"a": (torch.rand(5, 7, generator=g) > 0.3).float(), "b": torch.ones(11)})
    scores = {n: s * previous[n] for n, s in scores.items()}
    final = Masks({n: previous[n] * (scores[n] > 0.5).float() for n in scores})
    h = prune_stage.score_histogram(scores, previous, final, bins=10)
    alive = int(sum(m.sum() for m in previous.values()))
    assert h["pruned"].sum() + h["kept"].sum() == alive
    assert h["kept"].sum() == int(sum(m.sum() for m in final.values()))
    kept_bins = h[h["kept"] > 0]
    assert (kept_bins["right"] > 0.5).all()  # kept weights scored above the cut


def test_prune_kwargs_follow_the_run():
    cfg = params.parse_params(config.compose("ablation_fixed_weights"))
    kw = experiment.prune_kwargs(cfg, "ntksap_redraw", 3, (3, 32, 32))
    assert (kw["iterations"], kw["rounds"], kw["epsilon"], kw["seed"], kw["batch_size"]) == (20, 5, 0.01, 3, 256)
    assert kw["redraw"] is True and kw["noise_inputs"] is True  # the paper's NTK-SAP
    assert experiment.prune_kwargs(cfg, "ntksap_fixed", 3, (3, 32, 32))["redraw"] is False
    cfg = params.parse_params(config.compose("ablation_noise_vs_data"))
    assert experiment.prune_kwargs(cfg, "ntksap_data", 0, (3, 32, 32))["noise_inputs"] is False
    assert experiment.prune_kwargs(cfg, "ntksap_noise", 0, (3, 32, 32))["noise_inputs"] is True
    import inspect

    import ntksap

    assert set(kw) <= set(inspect.signature(ntksap.prune).parameters)  # every key is an option of prune


def test_prune_and_train_helpers_with_zero_epochs(tmp_path, monkeypatch):
    """``train.epochs: 0`` (the Figure 2 set) evaluates each pruned net at its
    init; the accuracy matches a naive evaluation of the masked network. The
    prune stage of a seed prunes every run, each run's masks in its masks
    folder and its record in its prune folder; the seconds go to the seed's
    timings file, not to ``masks.csv``."""
    monkeypatch.chdir(tmp_path)
    cfg = _micro(monkeypatch, ["train.epochs=0", "prune.track.mode=none"])
    pruned = prune_stage.prune_seed(cfg, 0, tmp_path / "m", tmp_path / "p")
    assert list(pruned) == list(cfg.runs)
    res = pruned["magnitude"]
    assert res.track.empty and list(res.masks["tag"]) == ["sp50_00", "sp90_00"]
    manifest = pd.read_csv(tmp_path / "m" / "magnitude" / "masks.csv")
    assert list(manifest.columns) == ["sparsity", "tag", "path", "kept", "numel", "density"]  # no seconds
    assert sorted(p.name for p in (tmp_path / "m" / "magnitude").iterdir()) == \
        ["init.pt", "masks.csv", "sp50_00.pt", "sp50_00.pt.json", "sp90_00.pt", "sp90_00.pt.json"]
    assert sorted(p.name for p in (tmp_path / "p" / "magnitude").iterdir()) == ["density.csv", "scores.csv",
                                                                             "track.csv", "track_spectra.csv"]
    timings = pd.read_csv(layout.timings_path("prune", cfg, 0))
    assert list(timings.columns) == ["run", "sparsity", "tag", "seconds"]
    assert list(timings["run"]) == [r for r in cfg.runs for _ in cfg.sparsities] and (timings["seconds"] > 0).all()
    assert timings[timings["run"] == "magnitude"].drop(columns="run").reset_index(drop=True).equals(res.timings)
    results_, history = train_stage.train_seed(cfg, 0, tmp_path / "m", tmp_path / "t")
    assert list(results_["run"]) == [r for r in cfg.runs for _ in cfg.sparsities]
    results_ = results_[results_["run"] == "magnitude"]
    assert history.empty and list(results_["epochs"]) == [0, 0] and "epoch_time" not in history
    assert list(results_["best_test_top1"]) == list(results_["test_top1"]) and list(results_["best_epoch"]) == [0, 0]
    assert list(results_["best_test_top5"]) == list(results_["test_top5"])  # no epochs: best = final
    assert pd.read_csv(layout.timings_path("train", cfg, 0)).empty
    assert pd.read_csv(tmp_path / "t" / "magnitude" / "results.csv").equals(
        results_.drop(columns="run").reset_index(drop=True))
    bundle = experiment.load_dataset(cfg)
    from ntksap.data import normalise

    x, y = normalise(bundle, bundle.test_images), bundle.test_labels
    for row in results_.itertuples():
        model = experiment.new_model(cfg, 10, 0)
        model.load_state_dict(torch.load(tmp_path / "m" / "magnitude" / "init.pt", weights_only=True))
        masks = Masks.load(tmp_path / "m" / "magnitude" / f"{row.tag}.pt")
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, m in masks.items():
                named[name].mul_(m)
            model.eval()
            acc = 100.0 * (model(x).argmax(1) == y).float().mean().item()
        assert row.test_top1 == pytest.approx(acc, abs=1e-6)


def _rows_without(path: Path, column: str) -> list[list[str]]:
    """A CSV file's rows as written (text), without one column."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, c in enumerate(rows[0]) if c != column]
    return [[r[i] for i in keep] for r in rows]


def test_train_stage_resumes_an_interrupted_run_from_its_checkpoint_folder(tmp_path, monkeypatch, one_thread):
    """DVC deletes a stage's outputs before running it again, so the train stage
    trains in ``results/<experiment>/checkpoints/``: after an interruption in
    epoch 2 of 3, the rerun trains only the missing epochs and its results
    equal an uninterrupted run's (another checkpoint folder). The published
    histories hold no timings (they go to the timings file) and every other
    value exactly as the trainer wrote it."""
    import ntksap.train as trainer

    monkeypatch.chdir(tmp_path)
    cfg = _micro(monkeypatch, ["train.epochs=3", "prune.track.mode=none", "spectrum.sparsity=0.5"],
                 sparsities=[0.5])
    prune_stage.prune_run(cfg, "magnitude", 0, tmp_path / "p")
    assert layout.checkpoints_dir(cfg, "magnitude", 0) == Path("results/micro/checkpoints/magnitude-0")
    reference, _ = train_stage.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "ref")

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
        train_stage.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t", checkpoints=tmp_path / "ck")
    assert not (tmp_path / "t" / "results.csv").exists()
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    monkeypatch.setattr(trainer, "train_epoch", counted_epoch)
    calls["epochs"] = 0
    res, hist = train_stage.train_run(cfg, "magnitude", 0, tmp_path / "p", tmp_path / "t",
                                      checkpoints=tmp_path / "ck", timings=tmp_path / "times.csv")
    assert calls["epochs"] == 2                       # epochs 2 and 3 only
    assert res.drop(columns="density").equals(reference.drop(columns="density"))
    assert "epoch_time" not in hist and "epoch_time" not in pd.read_csv(tmp_path / "t" / "sp50_00" / "history.csv")
    ref_hist = pd.read_csv(tmp_path / "ref" / "history.csv")
    assert hist.reset_index(drop=True).equals(ref_hist)
    assert (tmp_path / "t" / "history.csv").read_bytes() == (tmp_path / "ref" / "history.csv").read_bytes()
    (work,) = (tmp_path / "ck").iterdir()
    assert _rows_without(work / "history.csv", "epoch_time") == _rows_without(tmp_path / "t" / "sp50_00" /
                                                                              "history.csv", "epoch_time")
    times = pd.read_csv(tmp_path / "times.csv")
    assert list(times.columns) == ["sparsity", "epoch", "epoch_time"] and list(times["epoch"]) == [1, 2, 3]
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
    cfg = params.load_params(repo / "params.yaml")
    expected = {"check", "spectrum", "plot", "prune@0", "train@0"}  # a prune and a train stage per seed
    ran = dvcrepo.ran(reproduced)
    prepared = {s for s in ran if s.split("@")[0] == "prepare"}
    assert ran - prepared == expected and prepared  # and the dataset's prepare stage
    for nb in [*(repo / "results/micro").rglob("*.ipynb")]:
        book = json.loads(nb.read_text())
        errors = [o for c in book["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{nb}: {errors}"
        injected = [c for c in book["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert injected, f"{nb} was not run by papermill"
    notebooks = sorted(str(p.relative_to(repo)) for p in (repo / "results/micro").rglob("*.ipynb"))
    assert notebooks == sorted(str(p) for p in [
        layout.notebook_path("plot", cfg), layout.notebook_path("spectrum", cfg),
        *(layout.notebook_path(s, cfg, 0) for s in ("prune", "train"))])
    assert notebooks[0] == "results/micro/notebooks/plot.ipynb"  # the executed notebooks: outside every output
    assert cfg.experiment == "micro" and params.to_dict(cfg) == params.to_dict(params.parse_params(
        config.compose("micro")))  # params.yaml is the named set
    shown = dvcrepo.run(repo, "dvc", "exp", "show", "--json").stdout
    assert "results/micro/metrics.json" in shown and "experiment" in shown


@pytest.mark.slow
def test_prune_stage_outputs(repo, reproduced):
    cfg = params.load_params(repo / "params.yaml")
    spent = pd.read_csv(repo / layout.timings_path("prune", cfg, 0))
    assert list(spent.columns) == ["run", "sparsity", "tag", "seconds"]
    for run in MICRO_RUNS:
        out, record = repo / layout.masks_dir(cfg, run, 0), repo / layout.prune_dir(cfg, run, 0)
        manifest = pd.read_csv(out / "masks.csv")
        assert manifest["sparsity"].tolist() == cfg.sparsities and "seconds" not in manifest  # deterministic
        assert not list(out.rglob("*.ipynb")) and not list(record.rglob("*.ipynb"))
        timings = spent[spent["run"] == run].reset_index(drop=True)
        assert timings["tag"].equals(manifest["tag"])
        init = torch.load(out / "init.pt", weights_only=True)
        for row in manifest.itertuples():
            masks = Masks.load(out / row.path)
            n = sum(m.numel() for m in masks.values())
            kept = int(sum(m.sum() for m in masks.values()))
            assert kept == round((1 - row.sparsity) * n) == row.kept  # global top-k keeps exactly this many
            assert set(masks) <= set(init) and all(masks[k].shape == init[k].shape for k in masks)
        dens = pd.read_csv(record / "density.csv")
        total = dens[dens["name"] == "total"].set_index("sparsity")["kept"]
        assert total.to_dict() == dict(zip(manifest["sparsity"], manifest["kept"]))
        track = pd.read_csv(record / "track.csv")
        its = track.groupby("sparsity")["iteration"].agg(["min", "max"])
        assert (its["min"] == 0).all() and (its["max"] == cfg.runs[run].iterations).all()
        assert set(track["iteration"]) == ({0, 1} if cfg.runs[run].iterations == 1 else {0, 1, 2, 4})
        scores = pd.read_csv(record / "scores.csv")
        assert set(scores["sparsity"]) == set(cfg.sparsities)
    # the same seed gives the same init for every run
    a = torch.load(repo / layout.masks_dir(cfg, "magnitude", 0) / "init.pt", weights_only=True)
    b = torch.load(repo / layout.masks_dir(cfg, "ntksap", 0) / "init.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_spectrum_and_plot_outputs(repo, reproduced):
    cfg = params.load_params(repo / "params.yaml")
    res_dir = repo / "results/micro"
    spent = pd.read_csv(repo / layout.timings_path("train", cfg, 0))
    assert list(spent.columns) == ["run", "sparsity", "epoch", "epoch_time"]
    for run in MICRO_RUNS:
        out = repo / layout.train_dir(cfg, run, 0)
        res = pd.read_csv(out / "results.csv")
        assert res["sparsity"].tolist() == cfg.sparsities and res["test_top1"].between(0, 100).all()
        hist = pd.read_csv(out / "history.csv")
        assert len(hist) == cfg.train.epochs * len(cfg.sparsities) and "epoch_time" not in hist  # deterministic
        assert (spent["run"] == run).sum() == len(hist)
        for tag in res["tag"]:
            assert (out / tag / "metrics.json").is_file() and (out / tag / "model.pt").is_file()
            assert "epoch_time" not in pd.read_csv(out / tag / "history.csv")
            # the resumable run lives outside DVC's output: the run's sparsities trained at once
            # (train.stack: lockstep on a CPU), one checkpoint, a folder per sparsity
            runs = list((repo / layout.checkpoints_dir(cfg, run, 0)).glob(f"lockstep{len(res)}-*/{tag}/model.pt"))
            assert len(runs) == 1 and (runs[0].parent.parent / "checkpoint.pt").is_file()
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
    metrics = json.loads((repo / layout.metrics_path(cfg)).read_text())
    assert set(metrics) == {"final", "best"}  # both, whichever the figures show
    acc = pd.read_csv(plots / "accuracy.csv")
    for run in MICRO_RUNS:
        for s in cfg.sparsities:
            mine = acc[(acc["run"] == run) & ((acc["sparsity"] - s).abs() < 1e-12)]
            assert metrics["final"][run][layout.sparsity_tag(s)] == pytest.approx(mine["test_top1"].mean(), abs=1e-4)
            assert metrics["best"][run][layout.sparsity_tag(s)] == pytest.approx(mine["best_test_top1"].mean(),
                                                                                 abs=1e-4)
        series = repo / layout.series_dir(cfg)
        assert (series / "accuracy" / f"{run}.csv").is_file() and (series / "curves" / f"{run}.csv").is_file()
    shown = json.loads(dvcrepo.run(repo, "dvc", "metrics", "show", "--json").stdout)
    assert "results/micro/metrics.json" in json.dumps(shown)
    dvcrepo.run(repo, "dvc", "plots", "show", "-o", str(repo / "dvc_plots"))
    assert (repo / "dvc_plots" / "index.html").is_file()


def _section_outputs(notebook: Path, heading: str) -> tuple[int, str]:
    """Image outputs and markdown text that the code cells under the markdown
    cell starting with ``heading`` show, up to the next markdown cell."""
    cells = json.loads(notebook.read_text())["cells"]
    start = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                 and "".join(c["source"]).startswith(heading))
    images, text = 0, ""
    for c in cells[start + 1:]:
        if c["cell_type"] == "markdown":
            break
        for o in c.get("outputs", []):
            data = o.get("data", {})
            images += "image/png" in data
            text += "".join(data.get("text/markdown", ""))
    return images, text


@pytest.mark.slow
def test_executed_notebooks_show_every_recorded_spectrum_and_no_empty_panel(repo, reproduced, tmp_path):
    cfg = params.load_params(repo / "params.yaml")
    assert cfg.prune.track.mode == "spectrum"
    prune_nb = repo / layout.notebook_path("prune", cfg, 0)
    images, text = _section_outputs(prune_nb, "## NTK while pruning")
    assert images == 2 and "trace estimate" not in text  # spectra relative to dense per run, trace/condition/distance
    assert _section_outputs(prune_nb, "## Layer-wise density")[0] == 1 and \
        _section_outputs(prune_nb, "## Score distribution")[0] == 1  # one figure of every run
    plot_nb = repo / layout.notebook_path("plot", cfg)
    assert _section_outputs(plot_nb, "## NTK while pruning, by method")[0] == 4  # spectra, relative, bars, trace
    assert _section_outputs(plot_nb, "## Figure 2 beside Figure 1")[0] == 1
    assert _section_outputs(repo / layout.notebook_path("spectrum", cfg), "## Distance to the dense spectrum")[0] == 1
    plots = repo / layout.plots_dir(cfg)
    for fig in ("overview", "prune_spectra", "prune_spectra_relative", "prune_distance"):
        assert (plots / f"{fig}.png").stat().st_size > 0
    distance = pd.read_csv(plots / "prune_distance.csv")
    assert len(distance) == len(MICRO_RUNS) * len(cfg.sparsities) and (distance["log_distance"] > 0).all()
    # a trace-only set: the trace is drawn, a sentence says why nothing else is (in a scratch experiment folder)
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["experiment"], data["prune"]["track"]["mode"] = "micro_trace", "trace"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    out_nb = tmp_path / "prune.ipynb"
    dvcrepo.run(repo, "papermill", "notebooks/prune.ipynb", str(out_nb), "-k", "ntksap", "--log-level", "WARNING",
                "-p", "params_file", str(tmp_path / "params.yaml"), "-p", "masks_dir", str(tmp_path / "masks"),
                "-p", "out_dir", str(tmp_path / "prune"))
    images, text = _section_outputs(out_nb, "## NTK while pruning")
    assert images == 1 and "Only a trace estimate was recorded" in text
    assert pd.read_csv(tmp_path / "prune" / "ntksap" / "track.csv")["condition"].isna().all()  # what is not drawn


def _changed(repo: Path) -> set[str]:
    return set(json.loads(dvcrepo.run(repo, "dvc", "status", "--json").stdout))


@pytest.mark.slow
def test_changing_one_parameter_reruns_only_what_it_affects(repo, reproduced):
    assert _changed(repo) == set()  # everything cached
    values = yaml.safe_load((repo / "params.yaml").read_text())
    assert values["experiment"] == "micro"
    cfg = params.load_params(repo / "params.yaml")
    try:
        # a new seed: its own stages and those that gather every seed, not the cached seed's
        config.write_params({**values, "seeds": [0, 1]}, repo / "params.yaml")
        changed = _changed(repo)
        assert {"prune@1", "train@1"} <= changed and {"prune@0", "train@0"}.isdisjoint(changed)
        # the Figure 2 probe size: the spectrum stage and the plot that shows it beside Figure 1 (and the check)
        more = copy.deepcopy(values)
        more["spectrum"]["num_inputs"] = 5
        config.write_params(more, repo / "params.yaml")
        out = dvcrepo.run(repo, "dvc", "repro")
        assert dvcrepo.ran(out.stdout) == {"check", "spectrum", "plot"}, out.stdout
        assert "Stage 'prune@0' didn't change, skipping" in out.stdout
        eig = pd.read_csv(repo / "results/micro/spectrum/eigenvalues.csv")
        assert (eig.groupby("label").size() == 5 * 10).all()
        # NTK-SAP's iterations: the seed's prune and train stages run again, and in them only NTK-SAP's
        # networks train: magnitude's masks come out the same, so its networks are restored from their
        # finished checkpoints (the seconds they took then), not trained again
        trained = pd.read_csv(repo / layout.timings_path("train", cfg, 0))
        magnitude = (repo / layout.train_dir(cfg, "magnitude", 0) / "results.csv").read_bytes()
        more = copy.deepcopy(values)
        more["runs"]["ntksap"]["iterations"] = 3
        config.write_params(more, repo / "params.yaml")
        assert _changed(repo) == {"check", "prune@0", "train@0", "spectrum", "plot"}
        out = dvcrepo.run(repo, "dvc", "repro")
        assert dvcrepo.ran(out.stdout) == {"check", "prune@0", "train@0", "spectrum", "plot"}, out.stdout
        now = pd.read_csv(repo / layout.timings_path("train", cfg, 0))
        pd.testing.assert_frame_equal(now[now["run"] == "magnitude"], trained[trained["run"] == "magnitude"])
        ntk_then = trained.loc[trained["run"] == "ntksap", "epoch_time"].to_numpy()
        assert (now.loc[now["run"] == "ntksap", "epoch_time"].to_numpy() != ntk_then).all()  # trained again
        assert (repo / layout.train_dir(cfg, "magnitude", 0) / "results.csv").read_bytes() == magnitude
        track = pd.read_csv(repo / layout.prune_dir(cfg, "ntksap", 0) / "track.csv")
        assert track["iteration"].max() == 3
    finally:
        config.write_params(values, repo / "params.yaml")
        out = dvcrepo.run(repo, "dvc", "repro")  # back to the set's results (DVC's run cache has them)
        assert "train@0" not in dvcrepo.ran(out.stdout), out.stdout
    assert _changed(repo) == set()


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
