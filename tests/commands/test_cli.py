"""The CLI: `train` end to end on the tiny dataset, and its exit codes for bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipeline.cli import main, parse_assignment
from pipeline.spec import paths
from pipeline.spec.errors import BadInput


@pytest.mark.parametrize(
    "text, expected",
    [("lr=0.01", ("lr", 0.01)), ("epochs=3", ("epochs", 3)), ("batch_norm=false", ("batch_norm", False)),
     ("cnn_channels=[16, 32]", ("cnn_channels", [16, 32])), ("activation=gelu", ("activation", "gelu")),
     ("optimizer='sgd'", ("optimizer", "sgd"))],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


def test_parse_assignment_needs_key_and_value():
    with pytest.raises(BadInput, match="expected key=value"):
        parse_assignment("lr")


def _train(root, *extra):
    return main(["train", "--dataset", "tiny", "--root", str(root), "--val-size", "100", *extra])


def test_a_set_value_nested_too_deeply_to_parse_exits_2_with_one_line(capsys):
    assert main(["train", "--model", "mlp", "--set", "lr=" + "[" * 5000 + "]" * 5000]) == 2
    err = capsys.readouterr().err
    assert "--set lr=...: the value is nested too deeply to read" in err and "Traceback" not in err


def test_train_command_prints_epochs_and_final_table(tiny_dataset, capsys):
    _, root = tiny_dataset
    assert _train(root, "--model", "mlp", "--set", "epochs=2", "--set", "batch_size=50") == 0
    out = capsys.readouterr().out
    assert "epoch 1:" in out and "epoch 2:" in out
    assert "parameters" in out and "MFLOPs/image" in out
    assert "best val accuracy" in out


def test_train_command_bad_parameter_exits_2_with_one_line(tiny_dataset, capsys):
    _, root = tiny_dataset
    assert _train(root, "--set", "activation=swish") == 2
    err = capsys.readouterr().err.strip()
    assert "activation = 'swish'" in err and "'relu', 'gelu', 'leaky_relu'" in err
    assert len(err.splitlines()) == 1


def test_train_command_unknown_key_suggests_the_right_one(tiny_dataset, capsys):
    _, root = tiny_dataset
    assert _train(root, "--set", "learning_rate=0.1") == 2
    assert "unknown parameter 'learning_rate'" in capsys.readouterr().err


def test_module_entry_point_exit_code_for_bad_dataset(tmp_path):
    """`python -m pipeline` as a real process: argparse refuses an unknown dataset with exit 2."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "data", "--dataset", "cifar", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'cifar'" in result.stderr


@pytest.mark.data
def test_train_command_with_a_study_trains_its_baseline(capsys):
    from conftest import require_real_dataset

    require_real_dataset("mnist")
    assert main(["train", "--study", "smoke", "--set", "epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "cnn on mnist (5,000 train / 1,000 val" in out and "best val accuracy" in out


# --------------------------------------------------------------------------------------------------
# The make front door


def _make(*args: str, **env: str) -> subprocess.CompletedProcess:
    from pipeline.spec.paths import PROJECT_ROOT

    return subprocess.run(["make", "--no-print-directory", "-s", "-C", str(PROJECT_ROOT), *args],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("true", True), ("0", False), ("no", False),
                                       ("off", False), ("false", False), ("", False)])
def test_make_switches_mean_off_when_they_say_so(value, on):
    planned = _make("-n", "search", "export-best", "STUDY=cnn", f"FRESH={value}", f"FORCE={value}")
    assert planned.returncode == 0, planned.stderr
    assert ("--fresh" in planned.stdout) == on and ("--force" in planned.stdout) == on


def test_make_refuses_a_switch_it_cannot_read_with_one_line():
    refused = _make("-n", "search", "STUDY=cnn", "FRESH=maybe")
    assert refused.returncode == 2
    assert "FRESH=maybe: expected 1 or 0" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_make_tracking_off_and_on():
    off, on = (_make("-n", "search", "STUDY=cnn", f"TRACKING={value}") for value in ("off", "1"))
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    assert "--no-tracking" in off.stdout and "--no-tracking" not in on.stdout


def test_make_baselines_trial_and_report_reach_their_commands():
    cold, warm = (_make("-n", "search", "STUDY=cnn", f"BASELINES={value}") for value in ("off", "on"))
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    assert "--no-baselines" in cold.stdout and "--no-baselines" not in warm.stdout
    assert re.search(r"--started-at \d{10}", warm.stdout)  # the clock of a planned search counts make's set-up
    refused = _make("-n", "search", "STUDY=cnn", "BASELINES=cold")
    assert refused.returncode == 2 and "BASELINES=cold: expected 1 or 0" in refused.stderr
    one, champion = (_make("-n", "export-best", "STUDY=cnn", *trial) for trial in (["TRIAL=7"], []))
    assert '--trial "7"' in one.stdout and "--trial" not in champion.stdout
    report = _make("-n", "report", "STUDY=cnn")
    assert report.returncode == 0 and 'pipeline report --study "cnn"' in report.stdout
    profiled, plain = (_make("-n", "bench-trainer", *profile) for profile in (["PROFILE=50"], []))
    assert "trainer_vs_baseline.py --profile 50" in profiled.stdout and "--profile" not in plain.stdout


def test_make_storage_with_shell_characters_reaches_the_program_whole(tmp_path):
    """STORAGE travels in the environment: an `&` in it is not a shell's background operator."""
    journal = tmp_path / "a&b" / "optuna.journal"
    listed = _make("studies", f"STORAGE={journal}")
    assert listed.returncode == 0, listed.stderr
    assert journal.is_file()  # opened where STORAGE said, not at "…/a"
    planned = _make("-n", "studies", f"STORAGE={journal}")
    assert planned.returncode == 0 and "pipeline studies" in planned.stdout
    assert "--storage" not in planned.stdout and str(journal) not in planned.stdout  # on no command line


def test_resume_command_names_the_store_and_tracking_it_needs(monkeypatch):
    from pipeline.commands import search
    from pipeline.search.options import SearchOptions
    from pipeline.spec import studies

    spec = studies.load("smoke")
    monkeypatch.delenv("STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = SearchOptions()
    assert search.resume_command(spec, default, "sqlite:///studies/optuna.db") == "make search STUDY=smoke"
    url = "postgresql://pipeline:s3cret@db-host/optuna?sslmode=require&x=1"
    remote = SearchOptions(storage=url, workers=4, tracking=False)
    command = search.resume_command(spec, remote, url)
    assert command == ("make search STUDY=smoke WORKERS=4 "
                       "STORAGE='postgresql://pipeline:***@db-host/optuna?sslmode=require&x=1' TRACKING=off")
    assert search.resume_command(spec, default, "x", "http://db-host:5000").startswith(
        "MLFLOW_TRACKING_URI=http://db-host:5000 make search")
    # MLflow puts its default store's URI in the environment once connected: the hint does not repeat it
    assert search.resume_command(spec, default, "x", paths.DEFAULT_TRACKING_URI) == "make search STUDY=smoke"
