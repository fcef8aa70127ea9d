"""Study files: every shipped file loads; bad files are refused before anything runs, naming file and key."""

from __future__ import annotations

import pytest
from optuna.trial import FixedTrial

from pipeline.cli import main
from pipeline.spec import hparams, space, studies

VALID = """
dataset = "mnist"
model = "cnn"
trials = 2
epochs = 1
sampler = "tpe"
pruner = "median"

[fixed]
cnn_channels = [8, 16]

[space]
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
optimizer = { type = "categorical", choices = ["adamw", "sgd"] }
momentum = { type = "float", low = 0.8, high = 0.95, when = { optimizer = "sgd" } }
cnn_width = { type = "int", low = 8, high = 32, step = 8 }

[[baseline]]
lr = 3e-3
optimizer = "adamw"
cnn_width = 16
"""


def _write(tmp_path, text, name="trial"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", studies.available())
def test_every_shipped_study_loads_and_samples_valid_params(name):
    spec = studies.load(name)
    assert spec.name == name and spec.trial_budget >= 1 and (spec.minutes is None or spec.minutes > 0)
    for baseline in spec.baseline:  # each baseline is a complete point of its space
        params = space.suggest(spec, FixedTrial(space.enqueue_form(spec, baseline)))
        hparams.resolve_params(params)


def test_required_studies_are_shipped():
    assert {"cnn", "mlp", "resnet", "fashion-cnn", "smoke", "cifar10", "cifar10-transfer", "folder-example"} <= set(
        studies.available())


def test_conditional_parameter_only_when_its_condition_holds(tmp_path):
    spec = studies.load(_write(tmp_path, VALID))
    with_sgd = space.suggest(spec, FixedTrial({"lr": 0.002, "optimizer": "sgd", "momentum": 0.9, "cnn_width": 16}))
    assert with_sgd["momentum"] == 0.9 and with_sgd["cnn_channels"] == [8, 16] and with_sgd["epochs"] == 1
    with_adamw = space.suggest(spec, FixedTrial({"lr": 0.002, "optimizer": "adamw", "cnn_width": 16}))
    assert "momentum" not in with_adamw


def test_list_valued_choices_round_trip(tmp_path):
    text = VALID.replace('cnn_channels = [8, 16]', '').replace(
        "[space]", '[space]\ncnn_channels = { type = "categorical", choices = [[8, 16], [16, 32]] }').replace(
        "[[baseline]]", "[[baseline]]\ncnn_channels = [16, 32]")
    spec = studies.load(_write(tmp_path, text))
    params = space.suggest(spec, FixedTrial(space.enqueue_form(spec, spec.baseline[0])))
    assert params["cnn_channels"] == [16, 32]


BAD = [
    ("unknown top-level key", ('trials = 2', 'trials = 2\nworkers = 3'), "unknown key 'workers'"),
    ("wrong type", ('trials = 2', 'trials = "ten"'), "trials = 'ten'"),
    ("inverted range", ('low = 1e-3, high = 1e-2', 'low = 1e-2, high = 1e-3'), "space.lr: low = 0.01 must be below"),
    ("empty range", ('low = 8, high = 32', 'low = 8, high = 8'), "space.cnn_width: low = 8 must be below high = 8"),
    ("log range touching zero", ('low = 1e-3, high = 1e-2, log', 'low = 0.0, high = 1e-2, log'),
     "space.lr.low: = 0.0: a log range must be > 0"),
    ("unknown sampler", ('sampler = "tpe"', 'sampler = "bayes"'), "sampler: 'bayes' is not one of tpe"),
    ("unknown pruner", ('pruner = "median"', 'pruner = "sometimes"'), "pruner: 'sometimes' is not one of"),
    ("unknown model", ('model = "cnn"', 'model = "vit"'), "model: 'vit' is not one of mlp, cnn, resnet18"),
    ("unknown dataset", ('dataset = "mnist"', 'dataset = "imagenet"'), "dataset: 'imagenet' is not one of"),
    ("unknown key in [dataset]", ('dataset = "mnist"', 'dataset = { path = "x", size = 3 }'),
     "unknown key 'dataset.size'"),
    ("bad channels in [dataset]", ('dataset = "mnist"', 'dataset = { path = "x", channels = "cmyk" }'),
     "dataset.channels = 'cmyk'"),
    ("baseline outside the space", ("lr = 3e-3\n", "lr = 0.5\n"), "baseline[0].lr: = 0.5 is outside [0.001, 0.01]"),
    ("baseline missing a parameter", ("cnn_width = 16\n", ""), "baseline[0]: misses 'cnn_width'"),
    ("unknown parameter in space", ("cnn_width = {", "cnn_wdth = {"), "space.cnn_wdth: unknown parameter"),
    ("unknown key in a range", ("step = 8", "stride = 8"), "unknown key 'space.cnn_width.stride'"),
    ("bad fixed value", ("cnn_channels = [8, 16]", "cnn_channels = [8, -16]"), "cnn_channels = [8, -16]"),
    ("range outside what the parameter allows", ('low = 0.8, high = 0.95', 'low = 0.8, high = 1.5'),
     "momentum = 1.5 is not allowed; expected a number in [0, 1)"),
    ("condition on a non-categorical", ('when = { optimizer = "sgd" }', 'when = { lr = 0.01 }'),
     "space.momentum.when: 'lr' must be a categorical parameter"),
    ("searched and fixed", ("[space]", "batch_size = 64\n[space]\nbatch_size = { type = 'int', low = 32, high = 64 }"),
     "space.batch_size: is also in [fixed]"),
    ("malformed TOML", ('trials = 2', 'trials = = 2'), "malformed TOML"),
    # tomllib parses nested arrays recursively: 5,000 levels exceed Python's recursion limit while parsing
    ("arrays nested beyond parsing", ('trials = 2', 'trials = ' + '[' * 5000 + ']' * 5000),
     "arrays or inline tables nested too deeply to parse"),
    # dotted keys nest tables without recursion in the parser; the error message's repr of the value recursed
    ("tables nested by dotted keys", ('cnn_channels = [8, 16]', 'cnn_channels.' + '.'.join(['a'] * 5000) + ' = 1'),
     "fixed.cnn_channels.a.a.a"),
    ("epochs inside fixed", ("[fixed]", "[fixed]\nepochs = 3"), "fixed.epochs: set 'epochs' at the top level"),
    ("int range with log and step", ("low = 8, high = 32, step = 8", "low = 8, high = 32, step = 8, log = true"),
     "space.cnn_width.step: = 8 cannot be combined with log = true"),
    ("no objective", ('pruner = "median"', 'pruner = "median"\nobjectives = []'),
     "objectives = []: List should have at least 1 item"),
    ("step of zero", ("step = 8", "step = 0"), "space.cnn_width.step: = 0 must be > 0"),
    ("no choices", ('choices = ["adamw", "sgd"]', "choices = []"),
     "space.optimizer.choices: is empty; list at least one value"),
    ("condition on a value not among the choices", ('when = { optimizer = "sgd" }', 'when = { optimizer = "rmsprop" }'),
     "space.momentum.when.optimizer: 'rmsprop' is not one of its choices ['adamw', 'sgd']"),
    ("baseline int given as a float", ("cnn_width = 16\n", "cnn_width = 16.0\n"),
     "baseline[0].cnn_width: = 16.0 must be an integer"),
    ("baseline key not in the space", ("cnn_width = 16\n", "cnn_width = 16\nbatch_size = 64\n"),
     "baseline[0].batch_size: is not in [space]; a baseline sets searched parameters only"),
    ("name unlike the file's", ("trials = 2", 'name = "other"\ntrials = 2'),
     "name: is 'other' but the file is trial.toml; make them the same"),
    ("validation leaving no training images", ("trials = 2", "trials = 2\nval_size = 60000"),
     "val_size: 60000 leaves no training images; use fewer than 60000"),
    ("model searched as a range", ("[space]", '[space]\nmodel = { type = "int", low = 1, high = 2 }'),
     "space.model: must be categorical"),
    ("single-objective sampler with several objectives",
     ('sampler = "tpe"\npruner = "median"', 'sampler = "gp"\npruner = "none"\nobjectives = [{ metric = '
      '"val_accuracy" }, { metric = "parameter_count" }]'),
     "sampler: 'gp' is single-objective; use nsga2, tpe or random for several objectives"),
    ("unknown objective metric", ('pruner = "median"', 'pruner = "median"\nobjectives = [{ metric = "val_acc" }]'),
     "objectives[0].metric: 'val_acc' is not one of val_accuracy"),
]


def _search_refused(tmp_path, capsys, *flags: str, study: str = "trial") -> str:
    """`search` of the study file `study` in tmp_path, refused with exit 2 in one line before the study's storage was
    opened: that line."""
    code = main(["search", "--study", study, "--studies-dir", str(tmp_path),
                 "--storage", f"sqlite:///{tmp_path}/optuna.db", *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "optuna.db").exists()
    return err.strip()


@pytest.mark.faults  # README: What survives what
@pytest.mark.parametrize("label, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_study_file_exits_2_naming_file_and_key(tmp_path, capsys, label, change, message):
    old, new = change
    assert old in VALID
    path = _write(tmp_path, VALID.replace(old, new, 1))
    err = _search_refused(tmp_path, capsys)
    assert str(path) in err and message in err


@pytest.mark.faults  # README: What survives what
def test_a_study_file_that_is_not_utf8_exits_2_naming_the_file(tmp_path, capsys):
    path = tmp_path / "trial.toml"
    path.write_bytes(VALID.replace('"tpe"', '"tpe\u00e9"').encode("latin-1"))
    err = _search_refused(tmp_path, capsys)
    assert err == f"error: {path}: not UTF-8 text (byte {VALID.index('tpe') + 3}); save it as UTF-8"


@pytest.mark.faults  # README: What survives what
def test_unknown_study_lists_the_available_ones(capsys):
    assert main(["search", "--study", "nope"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no study 'nope'" in err and "cifar10, cifar10-transfer, cnn, cnn-pareto, fashion-cnn" in err


def test_fingerprint_ignores_budgets_but_not_the_space(tmp_path):
    spec = studies.load(_write(tmp_path, VALID))
    bigger_budget = studies.load(_write(tmp_path, VALID.replace("trials = 2", "trials = 50")))
    assert bigger_budget.fingerprint() == spec.fingerprint()
    changed = studies.load(_write(tmp_path, VALID.replace("high = 1e-2", "high = 2e-2")))
    assert changed.fingerprint() != spec.fingerprint()


def test_fingerprint_of_a_study_is_what_stores_made_before_any_image_datasets_record(tmp_path):
    """Stores keep a study's fingerprint; a new version that hashed it differently would refuse to resume them."""
    assert studies.load(_write(tmp_path, VALID)).fingerprint() == "2a755cb18d84135b"  # as the previous version


def test_a_folder_dataset_table_loads_with_its_defaults(tmp_path):
    text = VALID.replace('dataset = "mnist"', 'dataset = { path = "~/pictures/flowers", image_size = 48 }')
    spec = studies.load(_write(tmp_path, text))
    assert spec.dataset_label == "flowers" and spec.val_size is None  # the folder's val_fraction decides
    assert spec.data.image_size == 48 and spec.data.channels == "auto" and spec.data.test_fraction == 0.1
    explicit = studies.load(_write(tmp_path, text.replace("trials = 2", "trials = 2\nval_size = 30")))
    assert explicit.val_size == 30


def test_families_can_compete_in_one_study(tmp_path):
    text = VALID.replace("[space]", '[space]\nmodel = { type = "categorical", choices = ["cnn", "mlp"] }').replace(
        "[[baseline]]", '[[baseline]]\nmodel = "mlp"')
    spec = studies.load(_write(tmp_path, text))
    params = space.suggest(spec, FixedTrial(space.enqueue_form(spec, spec.baseline[0])))
    assert params["model"] == "mlp"


def test_command_line_overrides_replace_only_what_they_name(tmp_path):
    """TRIALS=, TIMEOUT=, EPOCHS=, TRAIN_LIMIT=, VAL_LIMIT= (studies.with_overrides); unset ones keep the file's."""
    spec = studies.load(_write(tmp_path, VALID))
    assert studies.with_overrides(spec, trials=None, timeout_minutes=None, epochs=None) is spec
    quick = studies.with_overrides(spec, trials=7, timeout_minutes=2.5, epochs=None, train_limit=256, val_limit=None)
    assert (quick.trials, quick.timeout_minutes, quick.train_limit) == (7, 2.5, 256)
    assert (quick.epochs, quick.val_limit, quick.space, quick.fixed) == (spec.epochs, None, spec.space, spec.fixed)
    assert studies.with_overrides(spec, trials=50).fingerprint() == spec.fingerprint()  # a budget: resumable
    assert (spec.trials, spec.train_limit) == (2, None)  # the loaded spec itself is unchanged


@pytest.mark.parametrize("override", [{"trials": 0}, {"epochs": -1}, {"train_limit": -5}, {"timeout_minutes": 0}])
def test_command_line_overrides_are_validated_like_the_file(tmp_path, override):
    spec = studies.load(_write(tmp_path, VALID))
    with pytest.raises(studies.StudyError) as refused:
        studies.with_overrides(spec, **override)
    key = next(iter(override))
    assert f"{key} = {override[key]}" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.faults  # README: What survives what
def test_a_study_file_named_like_a_version_is_refused(tmp_path, capsys):
    """cnn-v2 is how FRESH=1 names version 2 of cnn: a file of that name would be mistaken for it."""
    _write(tmp_path, VALID, name="trial-v2")
    err = _search_refused(tmp_path, capsys, study="trial-v2")
    assert "'trial-v2' ends like a study version" in err and "trial-2.toml" in err


@pytest.mark.faults  # README: What survives what
@pytest.mark.parametrize("flags, message", [
    (["--threads", "-1"], "--threads -1: expected a whole number >= 1"),
    (["--threads", "0"], "--threads 0: expected a whole number >= 1"),
    (["--device", "foo"], "--device 'foo': expected auto, cpu, mps, cuda or cuda:<index>"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has no such device"),
    (["--trials", "0"], "trials = 0"),
    (["--timeout", "-1"], "timeout_minutes = -1.0"),
    (["--train-limit", "-5"], "train_limit = -5"),
])
def test_bad_command_line_values_exit_2_before_anything_opens(tmp_path, capsys, monkeypatch, flags, message):
    _write(tmp_path, VALID)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert message in _search_refused(tmp_path, capsys, *flags)
    assert not (tmp_path / "mlflow.db").exists()
