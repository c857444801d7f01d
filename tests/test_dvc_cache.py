"""A cache that never serves stale results: what DVC reruns after an edit, and
what keeps its cache exact (prepared data, data locations outside the params).

Fast tests first: ``ntksap.locations`` (where the datasets live on this machine:
environment variables, then ``ntksap.local.yaml``) and the prepare stage
(``ntksap.stages.prepare``: the same bytes from any data folder, loaded back as
``get_dataset`` gives it).

Then, ``slow``: a temporary git + DVC copy of the project (``dvcrepo.make_repo``)
on the ``micro`` set, after one ``dvc repro``:

(a) an edit inside a plot function (ntksap/figures/accuracy.py) reruns only ``plot``;
(b) an edit of the training augmentation (ntksap/augment.py) puts every train stage out of date (and
    exactly the other stages whose code imports it);
(c) a changed line of ntksap/train.py trains again, in a new checkpoint folder (its key hashes the
    trainer's source), instead of publishing the finished old checkpoint;
(d) ``dvc repro -f`` of one prune stage with nothing changed leaves every other stage up to date and
    no prune or train output hash in dvc.lock changes (executed notebooks and timings are outputs
    nothing downstream reads);
(e) another data folder (``NTKSAP_DATA_ROOT``, ``ntksap.local.yaml``) changes no stage, and preparing
    the data there gives the same file.

Cost: the fast tests a few seconds; the slow ones one ``micro`` ``dvc repro``
(every stage, 7 notebooks) plus plot twice, two trainings, one prune and one
prepare again: about 3-4 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from ntksap import locations
from ntksap.data import get_dataset
from ntksap.stages import prepare

import dvcrepo

ROOT = Path(__file__).resolve().parents[1]


# -- where the datasets live (fast) ----------------------------------------------------------------------
def test_location_defaults_and_environment(tmp_path):
    assert locations.dataset_location("digits", environ={}, start=tmp_path) == \
        {"root": "data", "local_path": None, "download": True}
    env = {"NTKSAP_DATA_ROOT": "/scratch/data", "NTKSAP_DATA_LOCAL_PATH": "/archive/c10.tar.gz",
           "NTKSAP_DATA_DOWNLOAD": "0"}
    assert locations.dataset_location("cifar10", environ=env, start=tmp_path) == \
        {"root": "/scratch/data", "local_path": "/archive/c10.tar.gz", "download": False}
    assert locations.dataset_location("cifar10", environ={"NTKSAP_DATA_ROOT": ""}, start=tmp_path)["root"] == "data"
    with pytest.raises(ValueError, match=r"NTKSAP_DATA_DOWNLOAD='yes' is not allowed; allowed: 1 .* or 0"):
        locations.dataset_location("cifar10", environ={"NTKSAP_DATA_DOWNLOAD": "yes"}, start=tmp_path)
    with pytest.raises(ValueError, match=r"NTKSAP_DATA_LOCAL_PATH='/x' is set, but dataset 'digits' ships"):
        locations.dataset_location("digits", environ={"NTKSAP_DATA_LOCAL_PATH": "/x"}, start=tmp_path)
    with pytest.raises(ValueError, match=r"dataset='cifar' is not allowed \(did you mean 'cifar10'\?\)"):
        locations.dataset_location("cifar", environ={}, start=tmp_path)


def test_location_from_the_local_file_above_the_working_folder(tmp_path):
    (tmp_path / "ntksap.local.yaml").write_text(
        "data:\n  root: datasets\n  download: false\n  local_paths: {cifar10: archive/c10.tar.gz, imagenet: /ilsvrc}\n")
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"  # where DVC runs a queued experiment
    queued.mkdir(parents=True)
    for start in (tmp_path, queued):
        assert locations.local_file(start) == tmp_path / "ntksap.local.yaml"
        assert locations.dataset_location("cifar10", environ={}, start=start) == \
            {"root": str(tmp_path / "datasets"), "local_path": str(tmp_path / "archive/c10.tar.gz"), "download": False}
    assert locations.dataset_location("imagenet", environ={}, start=queued)["local_path"] == "/ilsvrc"
    assert locations.dataset_location("cifar100", environ={}, start=queued)["local_path"] is None
    env = {"NTKSAP_DATA_ROOT": "/fast", "NTKSAP_DATA_DOWNLOAD": "1", "NTKSAP_DATA_LOCAL_PATH": "/mine.tgz"}
    assert locations.dataset_location("cifar10", environ=env, start=queued) == \
        {"root": "/fast", "local_path": "/mine.tgz", "download": True}  # the environment wins


@pytest.mark.parametrize("text, message", [
    ("data:\n  roots: x\n", r"the key data\.roots is not allowed \(did you mean 'root'\?\); allowed: root, download, local_paths"),
    ("data:\n  download: 'no'\n", r"data\.download='no' is not allowed; allowed: true or false"),
    ("data:\n  local_paths: {cifar1: /x}\n", r"the key data\.local_paths\.cifar1 is not allowed \(did you mean 'cifar10'\?\); allowed: digits, cifar10"),
    ("data:\n  root: ''\n", r"data\.root='' is not allowed"),
    ("train:\n  lr: 1\n", r"only a 'data' section is allowed at the top, found \['train'\]"),
    ("data: [1\n", r"not valid YAML"),
])
def test_a_bad_local_file_is_named_with_its_key(tmp_path, text, message):
    (tmp_path / "ntksap.local.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        locations.dataset_location("cifar10", environ={}, start=tmp_path)
    assert str(tmp_path / "ntksap.local.yaml") in str(info.value)


def test_the_local_file_is_git_ignored():
    assert "/ntksap.local.yaml" in (ROOT / ".gitignore").read_text().splitlines()


# -- the prepare stage (fast) ---------------------------------------------------------------------------
def test_prepared_file_is_the_same_bytes_from_any_data_folder_and_loads_as_get_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("NTKSAP_DATA_LOCAL_PATH", "NTKSAP_DATA_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)
    files = []
    for i, root in enumerate(("one", "two", "one")):  # a fresh decode twice, then from the cache
        monkeypatch.setenv("NTKSAP_DATA_ROOT", str(tmp_path / root))
        files.append(prepare.prepare("digits", tmp_path / f"prepared-{i}.pt").read_bytes())
    assert files[0] == files[1] == files[2]
    assert (tmp_path / "one" / "digits").is_dir() and (tmp_path / "two" / "digits").is_dir()
    loaded, direct = prepare.load_prepared(tmp_path / "prepared-0.pt"), get_dataset("digits", root=tmp_path / "one")
    for field in ("name", "num_classes", "input_shape", "mean", "std", "augment", "classes"):
        assert getattr(loaded, field) == getattr(direct, field), field
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        a, b = getattr(loaded, field), getattr(direct, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert loaded.source == str(tmp_path / "prepared-0.pt")


def test_a_damaged_or_missing_prepared_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTKSAP_DATA_ROOT", str(tmp_path / "data"))
    path = prepare.prepare("digits", tmp_path / "digits.pt")
    obj = torch.load(path, weights_only=True)
    obj["train_images"][0, 0, 0, 0] += 1
    torch.save(obj, path)
    with pytest.raises(ValueError, match="fails its checksum"):
        prepare.load_prepared(path)
    with pytest.raises(FileNotFoundError, match="run `dvc repro prepare`"):
        prepare.load_prepared(tmp_path / "nothing.pt")


# -- the pipeline in a temporary repository (slow) --------------------------------------------------------
EXPERIMENT = "micro"
RUNS = ("magnitude", "ntksap")  # the micro set's runs, one seed
TRAIN = {"train@0"}              # one train stage per seed, covering every run


def _status(repo: Path, extra_env: dict | None = None) -> set[str]:
    """The stages ``dvc status`` lists as changed."""
    return set(json.loads(dvcrepo.run(repo, "dvc", "status", "--json", extra_env=extra_env).stdout))


def _repro(repo: Path, *args: str, extra_env: dict | None = None) -> str:
    out = dvcrepo.run(repo, "dvc", "repro", *args, extra_env=extra_env)
    return out.stdout + out.stderr


def _lock(repo: Path) -> dict[str, dict[str, str]]:
    """Stage -> {output path: md5} from dvc.lock."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in st.get("outs", [])} for name, st in stages.items()}


def _result_hashes(repo: Path) -> dict[str, str]:
    """The hash of every masks, prune and train result folder (not their notebooks or timings)."""
    return {path: md5 for name, outs in _lock(repo).items() if name.startswith(("prune@", "train@"))
            for path, md5 in outs.items() if path.split("/")[2] in ("masks", "prune", "train")}


def _edit_function(path: Path, name: str) -> str:
    """Insert a no-op statement at the top of function ``name``'s body in ``path``
    (after its docstring); returns the original text."""
    text = path.read_text()
    func = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.name == name)
    body = func.body[1:] if ast.get_docstring(func) is not None and len(func.body) > 1 else func.body
    first = body[0]
    lines = text.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + "_edited = True  # an edit by tests/test_dvc_cache.py\n")
    path.write_text("".join(lines))
    return text


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The micro set, reproduced once, in a committed temporary repository."""
    from ntksap import config

    repo = dvcrepo.make_repo(tmp_path_factory.mktemp("cache"))
    config.write_params(config.compose(EXPERIMENT), repo / "params.yaml")
    dvcrepo.commit(repo, "micro")
    out = _repro(repo)
    assert {"check", "prepare", "spectrum", "plot", *TRAIN, "prune@0"} == dvcrepo.ran(out)
    assert _status(repo) == set()
    return repo


@pytest.mark.slow
def test_a_plot_function_edit_reruns_only_plot(repo):
    assert _status(repo) == set()
    source = repo / "ntksap" / "figures" / "accuracy.py"
    original = _edit_function(source, "plot_accuracy")
    try:
        assert _status(repo) == {"plot"}
        assert dvcrepo.ran(_repro(repo)) == {"plot"}
    finally:
        source.write_text(original)
    assert dvcrepo.ran(_repro(repo)) <= {"plot"}  # back to the original (or restored from the run cache)
    assert _status(repo) == set()


@pytest.mark.slow
def test_an_augmentation_edit_puts_every_training_out_of_date(repo):
    assert _status(repo) == set()
    source = repo / "ntksap" / "augment.py"
    original = _edit_function(source, "augment_batch")
    try:
        changed = _status(repo)
        assert TRAIN <= changed, changed
        # and exactly the stages whose code imports it (the data loaders, which prune and spectrum use too,
        # import it; plot and check through the parameters' registry of datasets)
        stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
        assert changed == {s for s in _lock(repo) if "ntksap/augment.py" in stages[s.split("@")[0]]["deps"]}
    finally:
        source.write_text(original)
    assert _status(repo) == set()


@pytest.mark.slow
def test_a_training_code_change_trains_again_in_a_new_checkpoint_folder(repo):
    from ntksap import layout, params

    assert _status(repo) == set()
    cfg = params.load_params(repo / "params.yaml")
    folders = {r: {p.name for p in (repo / layout.checkpoints_dir(cfg, r, 0)).iterdir()} for r in RUNS}
    timings = (repo / layout.timings_path("train", cfg, 0)).stat().st_mtime_ns
    before = _result_hashes(repo)
    source = repo / "ntksap" / "train.py"
    original = _edit_function(source, "train")
    try:
        assert TRAIN <= _status(repo)
        out = _repro(repo)
        assert TRAIN <= dvcrepo.ran(out), out
        for r in RUNS:
            now = {p.name for p in (repo / layout.checkpoints_dir(cfg, r, 0)).iterdir()}
            new = now - folders[r]
            # a new key: one folder for the run's sparsities trained at once (train.stack), with one
            # checkpoint and a folder per sparsity
            assert folders[r] <= now and len(new) == 1, (folders[r], now)
            work = repo / layout.checkpoints_dir(cfg, r, 0) / new.pop()
            assert (work / "checkpoint.pt").is_file()
            assert len([d for d in work.iterdir() if (d / "model.pt").is_file()]) == len(cfg.sparsities)
        spent = repo / layout.timings_path("train", cfg, 0)
        assert spent.stat().st_mtime_ns > timings      # trained: new seconds per epoch
        assert len(spent.read_text().splitlines()) == 1 + len(RUNS) * cfg.train.epochs * len(cfg.sparsities)
        assert _result_hashes(repo) == before  # the same (deterministic) results, trained again
        assert "plot" not in dvcrepo.ran(out)  # so nothing downstream reruns
    finally:
        source.write_text(original)
    out = _repro(repo)  # the original code: DVC's run cache has its results
    assert {s for s in TRAIN if f"Stage '{s}' is cached - skipping run" in out} == TRAIN, out
    assert _status(repo) == set()


@pytest.mark.slow
def test_forcing_one_prune_stage_changes_no_result_hash(repo):
    assert _status(repo) == set()
    before, lock = _result_hashes(repo), _lock(repo)
    out = _repro(repo, "-f", "-s", "prune@0")
    assert dvcrepo.ran(out) == {"prune@0"}
    assert _status(repo) == set()  # train, spectrum and plot read only deterministic files
    assert _result_hashes(repo) == before
    after = _lock(repo)
    assert {s: o for s, o in after.items() if s != "prune@0"} == {s: o for s, o in lock.items() if s != "prune@0"}


@pytest.mark.slow
def test_another_data_folder_changes_no_stage(repo, tmp_path):
    assert _status(repo) == set()
    elsewhere = {"NTKSAP_DATA_ROOT": str(tmp_path / "datasets")}
    assert _status(repo, elsewhere) == set()
    prepared = repo / "data" / "prepared" / "digits.pt"
    before = prepared.read_bytes()
    out = _repro(repo, "-f", "-s", "prepare", extra_env=elsewhere)  # decoded again, into the other folder
    assert dvcrepo.ran(out) == {"prepare"} and (tmp_path / "datasets" / "digits").is_dir()
    assert prepared.read_bytes() == before
    assert _status(repo) == set()
    local = repo / "ntksap.local.yaml"
    local.write_text(f"data:\n  root: {tmp_path / 'other'}\n  download: false\n")
    try:
        assert dvcrepo.run(repo, "git", "check-ignore", "-q", "ntksap.local.yaml", check=False).returncode == 0
        assert _status(repo) == set()
        assert "Data and pipelines are up to date." in _repro(repo)
    finally:
        local.unlink()
