"""The parameter schema (ntksap.params), its validation messages, the named
experiment sets and their Hydra groups (ntksap.config, ntksap/conf)."""

import copy
from pathlib import Path

import pytest
import yaml

from ntksap import config, params, schema
from ntksap.config import compose, experiment_sets
from ntksap.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
PAPER_SPARSITIES = [1 - 0.8 ** k for k in range(2, 19, 2)]  # PAPER.md section 2
PAPER_SETS = {"quick", "cifar10_resnet20", "cifar100_vgg16", "tiny_imagenet_resnet18", "imagenet_resnet18",
              "imagenet_resnet50", "spectrum_resnet20", "ablation_T", "ablation_epsilon", "ablation_R",
              "ablation_noise_vs_data", "ablation_fixed_weights"}


@pytest.fixture(scope="module")
def quick():
    return compose("quick")


def test_every_paper_result_has_a_named_set_that_validates():
    sets = experiment_sets()
    assert PAPER_SETS <= set(sets)
    for name in sets:
        data = compose(name)
        p = parse_params(data, name)
        assert p.experiment == name  # results/<name>: sets never share a folder
        assert sets[name], f"{name} has no description line"


def test_committed_params_yaml_is_the_quick_set(quick):
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert on_disk == quick
    p = load_params(ROOT / "params.yaml")
    assert p.experiment == "quick" and p.dataset == "digits" and p.model == "digits_cnn"
    assert {r.method for r in p.runs.values()} == {"random", "magnitude", "snip", "iterative_snip", "grasp",
                                                   "synflow", "ntksap"}
    assert len(p.sparsities) >= 5 and max(p.sparsities) >= 0.98 and len(p.seeds) == 2


def test_dvc_composes_the_same_params_as_config_compose(tmp_path, quick):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(params.CONF_DIR), None, "config", "", ["experiment=cifar10_resnet20", "train.epochs=7"])
    assert yaml.safe_load(out.read_text()) == compose("cifar10_resnet20", ["train.epochs=7"])
    compose_and_dump(out, str(params.CONF_DIR), None, "config", "", [])  # no override: the default set
    assert yaml.safe_load(out.read_text()) == quick


def test_named_sets_hold_the_papers_values():
    c10 = parse_params(compose("cifar10_resnet20"))
    assert c10.sparsities == pytest.approx(PAPER_SPARSITIES, abs=5e-7) and c10.seeds == [0, 1, 2]
    t = c10.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.nesterov, t.weight_decay, t.milestones, t.gamma) == \
        (160, 128, 0.1, 0.9, False, 1e-4, [80, 120], 0.1)
    ntk = c10.runs["ntksap"]
    assert (ntk.iterations, ntk.rounds, ntk.epsilon) == (20, 5, 0.01)
    assert c10.runs["synflow"].iterations == 100 and c10.runs["iterative_snip"].iterations == 100
    c100 = parse_params(compose("cifar100_vgg16"))
    assert c100.model == "vgg16_bn" and c100.train.nesterov and c100.train.weight_decay == 5e-4
    assert c100.train.milestones == [60, 120] and (c100.runs["ntksap"].iterations, c100.runs["ntksap"].rounds) == (100, 1)
    tiny = parse_params(compose("tiny_imagenet_resnet18"))
    assert (tiny.train.epochs, tiny.train.batch_size, tiny.train.lr, tiny.train.milestones) == (200, 256, 0.2, [100, 150])
    for arch in ("resnet18", "resnet50"):
        im = parse_params(compose(f"imagenet_{arch}"))
        assert im.model == arch and im.seeds == [0] and im.train.epochs == 90
        assert im.sparsities == pytest.approx([1 - 0.8 ** 10, 1 - 0.8 ** 14], abs=5e-7)  # 89.26 %, 95.60 %
        assert "dense" in im.runs  # Table 1 reports the dense net
    fig2 = parse_params(compose("spectrum_resnet20"))
    assert fig2.spectrum.sparsity == pytest.approx(1 - 0.8 ** 6, abs=5e-7) and fig2.spectrum.num_inputs == 100
    assert [r.iterations for r in parse_params(compose("ablation_T")).runs.values()] == [1, 2, 4, 10, 20]
    assert {r.weights for r in parse_params(compose("ablation_fixed_weights")).runs.values()} == {"redraw", "fixed"}
    assert {r.inputs for r in parse_params(compose("ablation_noise_vs_data")).runs.values()} == {"noise", "data"}
    eps = [r.epsilon for r in parse_params(compose("ablation_epsilon")).runs.values()]
    assert max(eps) / min(eps) >= 1e3  # orders of magnitude
    assert len({r.rounds for r in parse_params(compose("ablation_R")).runs.values()}) >= 3


def _bad(quick, path, value):
    data = copy.deepcopy(quick)
    *head, last = path
    node = data
    for k in head:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    with pytest.raises(ParamsError) as exc:
        parse_params(data)
    return str(exc.value)


@pytest.mark.parametrize("path,value,expected", [
    (("runs", "ntksap", "method"), "ntk_sap", ["runs.ntksap.method", "'ntk_sap'", "allowed", "ntksap", "synflow",
                                               "did you mean 'ntksap'"]),
    (("model",), "resnet21", ["model", "'resnet21'", "resnet20", "vgg16_bn", "digits_cnn"]),
    (("dataset",), "mnist", ["dataset", "'mnist'", "digits", "cifar10", "imagenet"]),
    (("sparsities",), [0.5, 1.0], ["sparsities[1]", "1.0", "[0, 1)"]),
    (("sparsities",), [-0.1, 0.5], ["sparsities[0]", "-0.1", "[0, 1)"]),
    (("sparsities",), [0.5, 0.5], ["sparsities", "without repeats"]),
    (("train", "epochs"), -1, ["train.epochs", "-1", "integer >= 0"]),
    (("train", "epochs"), 2.5, ["train.epochs", "2.5", "integer >= 0"]),
    (("train", "lr"), 0, ["train.lr", "a number > 0"]),
    (("seeds",), [True], ["seeds[0]", "True", "integer >= 0"]),
    (("seeds",), [], ["seeds", "non-empty"]),
    (("prune", "scope"), "layerwise", ["prune.scope", "'layerwise'", "global", "local"]),
    (("prune", "track", "mode"), "eigen", ["prune.track.mode", "'eigen'", "spectrum", "trace", "none"]),
    (("experiment",), "../elsewhere", ["experiment", "'../elsewhere'", "letters, digits and _"]),
    (("runs",), {"my-run": {"method": "snip"}}, ["runs", "'my-run'", "letters, digits and _"]),
    (("runs",), {}, ["runs", "non-empty mapping"]),
    (("train", "epochs"), KeyError, ["missing key 'train.epochs'", "integer >= 0"]),
    (("spectrum", "sparsity"), 0.5, ["spectrum.sparsity", "0.5", "one of sparsities"]),
    (("spectrum", "seed"), 7, ["spectrum.seed", "7", "one of seeds"]),
    (("runs", "snip", "epsilon"), 0.1, ["runs.snip.epsilon", "0.1", "'snip'", "NTK-SAP setting"]),
    (("runs", "random", "weights"), "fixed", ["runs.random.weights", "'fixed'", "NTK-SAP setting"]),
    (("runs", "ntksap", "iterations"), 0, ["runs.ntksap.iterations", "0", "integer >= 1"]),
])
def test_bad_values_are_rejected_naming_key_value_and_what_is_allowed(quick, path, value, expected):
    msg = _bad(quick, path, value)
    assert msg.startswith("params.yaml: ")
    for piece in expected:
        assert piece in msg, f"{piece!r} not in {msg!r}"


@pytest.mark.parametrize("path,typo,right", [
    (("prune",), "batch_sise", "prune.batch_size"),
    ((), "sparsites", "sparsities"),
    (("train",), "epoch", "train.epochs"),
    (("runs", "ntksap"), "itertions", "runs.ntksap.iterations"),
])
def test_a_typo_in_a_key_is_rejected_with_the_closest_key(quick, path, typo, right):
    data = copy.deepcopy(quick)
    node = data
    for k in path:
        node = node[k]
    node[typo] = 3
    with pytest.raises(ParamsError) as exc:
        parse_params(data)
    msg = str(exc.value)
    prefix = ".".join([*path, typo])
    assert f"unknown key '{prefix}'" in msg and f"did you mean '{right.rsplit('.', 1)[-1]}'" in msg
    assert "allowed keys" in msg and "3" in msg


def test_defaults_fill_in_and_values_are_normalised(quick):
    data = copy.deepcopy(quick)
    del data["plot"]
    del data["prune"]["track"]
    data["train"]["lr"] = 1  # an int where a float is expected is fine
    p = parse_params(data)
    assert p.plot.density_sparsity is None and p.prune.track.mode == "spectrum"
    assert isinstance(p.train.lr, float) and p.train.lr == 1.0
    assert p.runs["ntksap"].weights == "redraw" and p.runs["ntksap"].inputs == "noise"


def test_render_params_round_trips_every_named_set():
    for name in experiment_sets():
        data = compose(name)
        text = config.render_params(data, config.PARAMS_HEADER.format(name=name))
        assert yaml.safe_load(text) == data
        assert "# training epochs" in text  # every knob carries its description


def test_cli_check_stamps_only_valid_params(tmp_path, quick, capsys):
    good, bad, stamp = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "out" / "ok"
    good.write_text(yaml.safe_dump(quick))
    assert config.main(["check", str(good), "--stamp", str(stamp)]) == 0
    assert stamp.read_text() == "params valid\n"
    stamp.unlink()
    broken = copy.deepcopy(quick)
    broken["runs"]["snip"]["method"] = "snipp"
    bad.write_text(yaml.safe_dump(broken))
    assert config.main(["check", str(bad), "--stamp", str(stamp)]) == 2
    err = capsys.readouterr().err
    assert "runs.snip.method='snipp'" in err and "allowed" in err
    assert not stamp.exists()
    assert config.main(["check", str(tmp_path / "missing.yaml")]) == 2


def test_cli_compose_writes_a_valid_commented_params_file(tmp_path):
    out = tmp_path / "params.yaml"
    assert config.main(["compose", "ablation_T", "train.epochs=3", "-o", str(out)]) == 0
    p = load_params(out)
    assert p.experiment == "ablation_T" and p.train.epochs == 3
    assert out.read_text().startswith("# Parameters of the pipeline")
    assert config.main(["compose", "no_such_set", "-o", str(out)]) == 2
    assert load_params(out).experiment == "ablation_T"  # a failure leaves the file as it was


def test_hydra_refuses_an_override_of_an_unknown_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="batch_sise"):
        compose("quick", ["prune.batch_sise=3"])



# ---------------------------------------------------------------------------------
# the Hydra groups: train/<dataset>, runs/figure1, sparsity_grid/paper
# ---------------------------------------------------------------------------------
CONF = ROOT / "ntksap" / "conf"


def _experiment_file(name):
    """A set's own file, merged over the set it extends (a default naming
    another set, as cifar10_resnet20_extended does): its defaults first, then
    each key, mappings merged one level down."""
    own = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    for parent in [d for d in own["defaults"] if isinstance(d, str) and d in experiment_sets()]:
        base = _experiment_file(parent)
        merged = {**base, **own, "defaults": base["defaults"] + own["defaults"]}
        for key, value in own.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merged[key] = {**base[key], **value}
        own = merged
    return own


@pytest.mark.parametrize("name", sorted(experiment_sets()))
def test_each_named_set_validates_and_takes_its_datasets_protocol(name):
    p = parse_params(compose(name), name)
    own = _experiment_file(name)
    assert {"override /train": p.dataset} in own["defaults"]          # the dataset's protocol group ...
    assert p.train == params.protocol(p.dataset, **own.get("train", {}))  # ... and only what the set changes
    assert p.train.model_dump(include=set(params.Train.EXECUTION_FIELDS)) == {
        "stack": "auto", "channels_last": None, "amp": None, "compile": False, "num_workers": 8,
        "eval_batch_size": 500}


def test_named_sets_state_only_what_differs_from_the_groups():
    figure1 = yaml.safe_load((CONF / "runs" / "figure1.yaml").read_text())
    paper = yaml.safe_load((CONF / "sparsity_grid" / "paper.yaml").read_text())["sparsities"]
    for name in experiment_sets():
        own = _experiment_file(name)
        dataset = own["dataset"]
        protocol = params.protocol(dataset).model_dump()
        for key, value in own.get("train", {}).items():
            assert value != protocol[key], f"{name}: train.{key} repeats the {dataset} protocol"
        assert own.get("sparsities") != paper, f"{name}: pick the paper's sparsities with `- /sparsity_grid: paper`"
        if {"/runs": "figure1"} in own["defaults"]:
            for run, settings in own.get("runs", {}).items():
                for key, value in settings.items():
                    assert figure1.get(run, {}).get(key) != value, f"{name}: runs.{run}.{key} repeats figure1"
        else:
            assert set(own["runs"]) != set(figure1), f"{name}: pick Figure 1's runs with `- /runs: figure1`"


def test_the_groups_hold_the_papers_protocols_runs_and_sparsities():
    c10 = params.protocol("cifar10")                                   # PAPER.md section 5, CIFAR-10 / ResNet-20
    assert (c10.epochs, c10.batch_size, c10.lr, c10.momentum, c10.nesterov, c10.weight_decay, c10.milestones,
            c10.gamma) == (160, 128, 0.1, 0.9, False, 1e-4, [80, 120], 0.1)
    c100 = params.protocol("cifar100")
    assert (c100.epochs, c100.batch_size, c100.nesterov, c100.weight_decay, c100.milestones) == \
        (160, 128, True, 5e-4, [60, 120])
    tiny = params.protocol("tiny_imagenet")
    assert (tiny.epochs, tiny.batch_size, tiny.lr, tiny.weight_decay, tiny.milestones) == \
        (200, 256, 0.2, 5e-4, [100, 150])
    im = params.protocol("imagenet")
    assert (im.epochs, im.batch_size, im.lr, im.weight_decay, im.milestones, im.processes) == \
        (90, 256, 0.1, 1e-4, [30, 60, 80], "auto")
    digits = params.protocol("digits")                                 # the quick set's protocol
    assert (digits.epochs, digits.batch_size, digits.lr, digits.weight_decay, digits.milestones) == \
        (10, 64, 0.1, 5e-4, [6, 8])
    assert parse_params(compose("quick")).train == digits
    paper = yaml.safe_load((CONF / "sparsity_grid" / "paper.yaml").read_text())["sparsities"]
    assert paper == pytest.approx(PAPER_SPARSITIES, abs=5e-7)
    runs = {name: params.Run(**run) for name, run in yaml.safe_load((CONF / "runs" / "figure1.yaml").read_text()).items()}
    assert [r.method for r in runs.values()] == ["random", "magnitude", "snip", "iterative_snip", "grasp",
                                                 "synflow", "ntksap"]
    assert (runs["ntksap"].iterations, runs["ntksap"].rounds, runs["ntksap"].epsilon) == (20, 5, 0.01)


def test_protocol_overrides_are_checked_and_unknown_datasets_refused():
    assert params.protocol("digits", epochs=3, milestones=(2,)).milestones == [2]
    with pytest.raises(ParamsError, match=r"^train protocol 'digits' .*epochs=-1 is not allowed; allowed: an "
                                          r"integer >= 0"):
        params.protocol("digits", epochs=-1)
    with pytest.raises(ParamsError, match=r"unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        params.protocol("digits", epoch=3)
    with pytest.raises(ParamsError, match=r"dataset='cifar01' is not allowed \(did you mean 'cifar10'\?\)"):
        params.protocol("cifar01")


# ---------------------------------------------------------------------------------
# Train: the one training protocol (trainer, torchrun child, pipeline)
# ---------------------------------------------------------------------------------
def test_train_round_trips_through_a_dump_and_json():
    import json

    t = params.protocol("imagenet", amp=False, num_workers=2)
    assert params.Train.model_validate(t.model_dump()) == t
    assert params.Train.model_validate(json.loads(json.dumps(t.model_dump(mode="json")))) == t
    assert params.protocol("imagenet", **json.loads(json.dumps(t.model_dump()))) == t


def test_train_fingerprint_fields_leave_out_the_execution_only_ones():
    t = params.protocol("cifar10")
    assert list(t.experiment()) == ["epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                                    "milestones", "gamma", "augment"]   # what TrainConfig fingerprinted
    assert set(params.Train.EXECUTION_FIELDS) | set(t.experiment()) | {"processes"} == set(params.Train.model_fields)
    assert params.protocol("cifar10", compile=True, eval_batch_size=7).experiment() == t.experiment()


def test_train_compile_is_a_bool_or_reduce_overhead():
    for how in (False, True, "reduce-overhead"):
        assert params.protocol("digits", compile=how).compile == how
    for bad in ("fast", 1, "true", None):
        with pytest.raises(ParamsError, match=rf"compile={bad!r} is not allowed; allowed: true or false or "
                                              r"'reduce-overhead'"):
            params.protocol("digits", compile=bad)


def test_a_changed_train_field_is_checked():
    t = params.protocol("digits")
    with pytest.raises(ParamsError, match=r"^Train: epochs=-1 is not allowed; allowed: an integer >= 0$"):
        t.epochs = -1
    with pytest.raises(ParamsError, match=r"Train: nesterov=True is not allowed with momentum=0"):
        params.Train(epochs=1, batch_size=1, lr=0.1, weight_decay=0, momentum=0, nesterov=True)
    with pytest.raises(ParamsError, match=r"Train: missing key 'lr'"):
        params.Train(epochs=1, batch_size=1, weight_decay=0)


# ---------------------------------------------------------------------------------
# messages and describe
# ---------------------------------------------------------------------------------
def test_messages_name_source_key_value_allowed_and_the_closest_name(quick):
    data = copy.deepcopy(quick)
    data["runs"]["snip"]["method"] = "snipp"
    data["prune"]["track"]["mode"] = "spectra"
    data["train"]["lr"] = -0.1
    data["plot"]["acuracy"] = "best"
    with pytest.raises(ParamsError) as exc:
        parse_params(data, "my.yaml")
    lines = str(exc.value).splitlines()
    assert lines == [   # every bad key, in the schema's order, one line each
        "my.yaml: runs.snip.method='snipp' is not allowed (did you mean 'snip'?); allowed: one of random, "
        "magnitude, snip, iterative_snip, grasp, synflow, ntksap, random_erk, synflow_l2, px, dense",
        "my.yaml: prune.track.mode='spectra' is not allowed (did you mean 'spectrum'?); allowed: one of spectrum, "
        "trace, none",
        "my.yaml: train.lr=-0.1 is not allowed; allowed: a number > 0",
        "my.yaml: unknown key 'plot.acuracy' (did you mean 'accuracy'?) with value 'best'; allowed keys at 'plot': "
        "density_sparsity, table_sparsities, accuracy",
    ]


def test_the_data_section_is_machine_config_not_a_parameter(quick):
    assert "data" not in quick
    with pytest.raises(ParamsError, match=r"unknown key 'data' \(did you mean 'dataset'\?\)"):
        parse_params({**quick, "data": {"root": "data"}})


def test_describe_lists_every_field_of_every_model_with_what_is_allowed(capsys):
    text = config.describe()
    prefixes = {params.Params: "", params.Run: "runs.<name>.", params.Prune: "prune.", params.Track: "prune.track.",
                params.Train: "train.", params.Spectrum: "spectrum.", params.Plot: "plot."}
    sections = {"runs", "prune", "track", "train", "spectrum", "plot"}
    rows = 0
    for model, prefix in prefixes.items():
        for name, field in model.model_fields.items():
            if name in sections:
                continue
            assert field.description, f"{prefix}{name} has no description"
            row = f"| `{prefix}{name}` | {field.description} | {schema.allowed(schema.field_type(field))} |"
            assert row in text.splitlines(), row
            rows += 1
    assert len(text.splitlines()) == rows + 2                            # the header and nothing else
    assert "| `train.epochs` | training epochs" in text and "an integer >= 0 |" in text
    assert "| `runs.<name>.method` |" in text and "one of random, magnitude" in text
    assert "null (the method's own) or one of train, eval, unperturbed" in text
    assert config.main(["describe"]) == 0 and capsys.readouterr().out.strip() == text


def test_list_and_section_keys_stay_plain_overrides_beside_the_groups():
    """`-S sparsities=[...]`, `-S runs.<name>.<key>=...` and `-S train.epochs=...` override the
    keys, not the groups that fill them (the sparsity group is named sparsity_grid for this)."""
    p = config.compose("cifar10_resnet20", ["sparsities=[0.5,0.737856]", "runs.ntksap.iterations=5",
                                            "train.epochs=3"])
    assert p["sparsities"] == [0.5, 0.737856]
    assert p["runs"]["ntksap"]["iterations"] == 5 and p["train"]["epochs"] == 3


def test_the_short_figure1_set_is_the_paper_protocol_on_a_laptop_budget():
    short = parse_params(compose("cifar10_resnet20_short"))
    full = parse_params(compose("cifar10_resnet20"))
    assert (short.dataset, short.model, short.seeds) == ("cifar10", "resnet20", [0])
    assert {r.method for r in short.runs.values()} == {r.method for r in full.runs.values()} | {"dense"}
    assert 3 <= len(short.sparsities) <= 4 and set(short.sparsities) <= set(full.sparsities)
    assert {0.95602, 0.981986} <= set(short.sparsities)
    assert short.runs["ntksap"] == full.runs["ntksap"] and short.prune == full.prune  # the paper's pruning
    t, f = short.train, full.train
    assert t.epochs < f.epochs
    assert t.milestones == [m * t.epochs / f.epochs for m in f.milestones]  # the schedule scaled, not cut
    assert t.model_dump(exclude={"epochs", "milestones"}) == f.model_dump(exclude={"epochs", "milestones"})


def test_the_resnet20_sets_record_full_spectra_while_pruning_and_the_big_ones_a_trace():
    for name, cfg in ((n, parse_params(compose(n))) for n in config.experiment_sets()):
        if cfg.model == "resnet20":
            assert cfg.prune.track.mode == "spectrum", name
        elif cfg.model in ("vgg16_bn", "resnet18_tiny", "resnet18_imagenet_stem", "resnet18", "resnet50"):
            assert cfg.prune.track.mode == "trace", name


def test_the_extended_figure1_set_adds_the_new_methods_to_the_paper_protocol():
    ext = parse_params(compose("cifar10_resnet20_extended"))
    full = parse_params(compose("cifar10_resnet20"))
    assert {n: r for n, r in ext.runs.items() if n in full.runs} == full.runs
    assert {r.method for n, r in ext.runs.items() if n not in full.runs} == {"random_erk", "synflow_l2", "px"}
    assert ext.model_dump(exclude={"experiment", "runs"}) == full.model_dump(exclude={"experiment", "runs"})
    assert ext.prune_set("px") == "balanced"          # PX's paper: 10 per class, class-balanced
    assert ext.prune_set("snip") == "random"          # the paper's baselines as the authors draw it
    assert ext.runs["px"].iterations == ext.runs["synflow_l2"].iterations == 100
    assert [ext.label(n) for n in ("random_erk", "synflow_l2", "px")] == ["Random (ERK)", "SynFlow-L2", "PX"]


def test_a_run_may_choose_its_prune_set_and_a_data_free_one_may_not():
    p = compose("quick")
    p["runs"] = {"snip": {"method": "snip", "prune_set": "random"}, "px": {"method": "px"}}
    cfg = parse_params(p)
    assert (cfg.prune.prune_set, cfg.prune_set("snip"), cfg.prune_set("px")) == ("balanced", "random", "balanced")
    p["runs"] = {"synflow": {"method": "synflow", "prune_set": "random"}}
    with pytest.raises(ParamsError, match="runs.synflow.prune_set='random' is not allowed for method 'synflow'"):
        parse_params(p)
    p["runs"] = {"px": {"method": "px", "prune_set": "fixed"}}
    with pytest.raises(ParamsError, match="runs.px.prune_set"):
        parse_params(p)
