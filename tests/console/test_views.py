"""Console output, drawn from plain values into a rich Console that writes to a string."""

from __future__ import annotations

import io
import signal
from datetime import datetime
from types import SimpleNamespace

import pytest
from rich.console import Console
from tiny_study import write_study

from pipeline import store
from pipeline.console import lines, search_view, tables, train_view, workers_view
from pipeline.search import pareto, workers
from pipeline.search.events import BatchDone, EpochEnded, TrialEnded, TrialStarted, Waiting, Warned
from pipeline.search.options import SearchOutcome
from pipeline.spec import studies
from pipeline.spec.stop_reason import StopReason
from pipeline.training.train import EpochMetrics


@pytest.fixture
def spec(tmp_path) -> studies.StudySpec:
    """Study "views": 4 trials of 3 epochs (the tiny study on a registered dataset)."""
    return studies.load(write_study(tmp_path, "views", dataset="mnist", trials=4, epochs=3))


@pytest.fixture
def out(monkeypatch) -> io.StringIO:
    """What views print to the console (not a terminal: no colours, no live bars)."""
    text = io.StringIO()
    monkeypatch.setattr(lines, "console", Console(file=text, force_terminal=False, width=200, highlight=False,
                                                  soft_wrap=True))
    return text


def metrics(epoch: int, val_accuracy: float = 0.8125, val_loss: float = 0.5) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, train_loss=0.7, train_accuracy=0.75, val_loss=val_loss,
                        val_accuracy=val_accuracy, lr=1e-3, epoch_seconds=1.5, images_per_second=1000.0)


def started(number: int) -> TrialStarted:
    return TrialStarted(number, {"model": "cnn", "lr": 1e-3}, seed=11, parameter_count=1234, data=None)


def record(number: int, value: float, sampled: dict) -> store.TrialRecord:
    return store.TrialRecord(number=number, state="COMPLETE", values=[value], sampled=sampled, seconds=12.0,
                             completed_at=datetime(2025, 1, 1), params={"model": "cnn", **sampled})


# --------------------------------------------------------------------------------------------------
# One line per finished trial


def test_trial_line_complete_shows_value_duration_and_sampled_params():
    line = lines.trial_line(TrialEnded(3, "COMPLETE", [0.91234], 12.34, {"lr": 0.00123456, "layers": 2}))
    assert line == "trial   3 COMPLETE 0.9123" + " " * 7 + "12.3 s  lr=0.00123, layers=2"


def test_trial_line_pruned_shows_the_reason():
    line = lines.trial_line(TrialEnded(4, "PRUNED", None, 2.0, {"lr": 0.5}, fail_reason="diverged",
                                       fail_detail="loss became nan at epoch 1, step 3"))
    assert line.startswith("trial   4 PRUNED   diverged") and "lr=0.5" in line
    assert "loss became" not in line  # the detail is for failures


def test_trial_line_fail_shows_reason_and_the_first_line_of_the_detail_cut_at_120():
    detail = "x" * 150 + "\nsecond line of the message"
    line = lines.trial_line(TrialEnded(5, "FAIL", None, 1.0, {}, fail_reason="RuntimeError", fail_detail=detail,
                                       traceback="Traceback (most recent call last): ..."))
    assert line.startswith("trial   5 FAIL     RuntimeError: " + "x" * 120 + " ")
    assert "x" * 121 not in line and "second line" not in line and "Traceback" not in line


# --------------------------------------------------------------------------------------------------
# make search: the bars and the plain lines


def test_the_epoch_bar_shows_a_new_trial_as_soon_as_it_starts(spec, out):
    view = search_view.SearchView()
    view.live = True  # bars, as on a terminal
    with view.running(spec, status=lambda: (0, None)):
        view.trial_started(started(0))
        view.batch_done(5, 10)
        view.epoch_ended(0, metrics(1))
        epoch_task = view.bars.tasks[view.epoch_task]
        assert epoch_task.description == "trial 0 epoch 2"
        view.batch_done(7, 10)
        view.trial_ended(TrialEnded(0, "COMPLETE", [0.8125], 3.0, {"lr": 1e-3}))
        view.trial_started(started(1))  # before its first epoch ends
        epoch_task = view.bars.tasks[view.epoch_task]
        assert epoch_task.description == "trial 1 epoch 1"  # not "trial 0 epoch 2"
        assert epoch_task.completed == 0  # not trial 0's 7 batches
        assert view.bars.tasks[view.trials_task].description == "trial 1 | best -"
    assert view.bars is None


def test_off_a_terminal_each_epoch_and_each_trial_is_one_plain_line(spec, out):
    view = search_view.SearchView()
    assert not view.live
    with view.running(spec, status=lambda: (1, [0.8125])):
        view.trial_started(started(7))
        view.batch_done(3, 10)  # no bars off a terminal
        view.epoch_ended(7, metrics(1, val_accuracy=0.75, val_loss=0.625))
        view.epoch_ended(7, metrics(2))
        view.trial_ended(TrialEnded(7, "COMPLETE", [0.8125], 3.0, {"lr": 1e-3}))
    assert out.getvalue().splitlines() == [
        "  trial 7 epoch 1: val_accuracy 0.7500 val_loss 0.6250 (1.5 s)",
        "  trial 7 epoch 2: val_accuracy 0.8125 val_loss 0.5000 (1.5 s)",
        "trial   7 COMPLETE 0.8125" + " " * 8 + "3.0 s  lr=0.001",
    ]


def test_workers_view_off_a_terminal_names_the_worker_of_each_line(spec, out):
    """WORKERS=N: the coordinator's view of the events its workers send (workers.EventView's lines, read back)."""
    finished = [0]
    view = workers_view.WorkersView(spec, lambda: (finished[0], [0.8125] if finished[0] else None),
                                    SimpleNamespace(plans=workers.plan(2, 1, [])))
    assert not view.live
    ended = TrialEnded(5, "COMPLETE", [0.8125], 3.0, {"lr": 1e-3})
    with view:
        view.show(1, started(5))
        view.show(1, BatchDone(3, 10))
        view.show(1, EpochEnded(5, epoch=1, val_accuracy=0.75, val_loss=0.625, seconds=1.5))
        view.worker_line(2, "[bold]a library's own line[/]")  # printed as it is, not as markup
        finished[0] = 1
        view.show(1, ended)
        assert view.bars.tasks[view.trials_task].completed == 1
        assert view.bars.tasks[view.trials_task].description == "trials | best 0.8125"
        view.show(2, Waiting())
        view.show(2, Waiting())  # sent every second while it waits: drawn once
        assert view.bars.tasks[view.tasks[2]].description == "worker 2: waiting for the last trials"
        view.show(2, Warned("MLflow is slow"))
        view.worker_ended(1, SimpleNamespace(returncode=-signal.SIGKILL, pid=4321), unexpected=True)
        view.worker_ended(2, SimpleNamespace(returncode=0, pid=4322), unexpected=False)
    assert out.getvalue().splitlines() == [
        "  worker 1: trial 5 epoch 1: val_accuracy 0.7500 val_loss 0.6250 (1.5 s)",
        "worker 2: [bold]a library's own line[/]",
        "trial   5 COMPLETE 0.8125" + " " * 8 + "3.0 s  lr=0.001  (worker 1)",
        "warning (worker 2): MLflow is slow",
        "worker 1 (pid 4321) ended (SIGKILL); the others carry on and rerun its trial",
    ]


# --------------------------------------------------------------------------------------------------
# The end of a search


def outcome(**changes) -> SearchOutcome:
    top = [record(2, 0.95, {"lr": 0.002, "dropout": 0.1}), record(0, 0.9, {"lr": 0.01, "dropout": 0.3}),
           record(3, 0.85, {"lr": 0.0005, "dropout": 0.25})]
    fields = dict(study_name="views-v2", ran=4, stop_reason=StopReason.BUDGET, seconds=90.0, finished=4,
                  decision=pareto.Choice(top[0], "", [], []), top=top, resume_command="make search STUDY=views")
    return SearchOutcome(**{**fields, **changes})


def test_summary_lists_the_top_trials_in_order_and_the_best_one(spec, out):
    tables.summary(spec, outcome())
    text = out.getvalue()
    assert "4 trials run in 1.5 min; 4/4 finished (budget reached)" in text
    assert "top trials of views-v2 (val_accuracy)" in text
    header = [cell.strip() for cell in next(line for line in text.splitlines() if "┃" in line).split("┃")[1:-1]]
    assert header == ["trial", "value", "time", "parameters"]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "│" in line]
    assert rows == [["2", "0.9500", "12 s", "lr=0.002, dropout=0.1"],
                        ["0", "0.9000", "12 s", "lr=0.01, dropout=0.3"],
                        ["3", "0.8500", "12 s", "lr=0.0005, dropout=0.25"]]
    assert "best trial 2: 0.9500 with {'model': 'cnn', 'lr': 0.002, 'dropout': 0.1}" in text


def test_summary_of_a_timed_out_search_without_complete_trials(spec, out):
    tables.summary(spec, outcome(stop_reason=StopReason.TIMEOUT, finished=0, decision=None, top=[]))
    text = out.getvalue()
    assert "(time budget spent)" in text and "top trials" not in text and "best trial" not in text


def test_search_result_gives_the_replay_command_of_the_best_trial(spec, out):
    tables.search_result(spec, outcome(messages=["MLflow: see the runs"]))
    text = " ".join(out.getvalue().split())
    assert text.startswith("MLflow: see the runs")
    assert "`make search STUDY=views` continues the study" in text
    assert "`make replay STUDY=views TRIAL=2` re-checks the best trial" in text


def test_search_result_without_a_best_trial_points_to_make_studies(spec, out):
    tables.search_result(spec, outcome(decision=None, top=[]))
    assert "`make studies`" in out.getvalue() and "make replay" not in out.getvalue()
    out.seek(0)
    out.truncate()
    tables.search_result(spec, outcome(stop_reason=StopReason.INTERRUPTED, signal_number=signal.SIGINT))
    # ...the interrupt message said what to do
    assert out.getvalue() == ""


def test_an_interrupted_search_names_its_signal_and_how_to_resume(spec, capsys):
    search_view.SearchView().ended(spec, outcome(stop_reason=StopReason.INTERRUPTED, signal_number=signal.SIGTERM))
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("SIGTERM received: the running trial is recorded as FAIL (interrupted) and queued again")
    assert err.endswith("Resume with: make search STUDY=views")


def test_only_an_interrupted_outcome_has_a_stop_signal():
    assert outcome(stop_reason=StopReason.INTERRUPTED, signal_number=signal.SIGHUP).stop_signal is signal.SIGHUP
    with pytest.raises(ValueError, match="budget was not interrupted"):
        outcome().stop_signal  # noqa: B018 - the property raises
    with pytest.raises(ValueError):
        outcome(stop_reason=StopReason.INTERRUPTED).stop_signal  # noqa: B018 - without its number


@pytest.mark.parametrize("text", ["[/] a closing tag", "[red]red[/red] and [link=x]", "flowers [v2]"])
def test_user_text_with_rich_markup_is_printed_as_written(out, text):
    """A study's description or a folder's name is the user's text: brackets in it are not markup (a stray
    `[/]` would raise rich's MarkupError)."""
    search_view.SearchView().header(f"study: {text}")
    with train_view.TrainView(epochs=1) as view:
        view.header(f"cnn on {text}")
    printed = out.getvalue()
    assert f"study: {text}" in printed and f"cnn on {text}" in printed


def test_whatever_is_printed_loses_its_control_characters_and_the_passwords_of_its_urls(capsys):
    """A worker's warning or an error may quote a URL with its password, a name may hold an ESC: every line printed
    goes through lines.literal, which shows neither, and prints markup-like text as it is."""
    lines.say("warning: \x1b]0;title\x07http://admin:S3NTINEL-pw@db-host:5000 refused [/]")
    search_view.SearchView().warning("MLflow: postgresql://u:S3NTINEL-pw@db/x")
    captured = capsys.readouterr()
    assert "S3NTINEL" not in captured.out + captured.err and "\x1b" not in captured.out
    assert "warning: ]0;titlehttp://admin:***@db-host:5000 refused [/]" in captured.out
    assert "postgresql://u:***@db/x" in captured.err


def test_the_workers_view_masks_the_passwords_a_worker_prints_or_warns_of(spec, out):
    view = workers_view.WorkersView(spec, lambda: (0, None), SimpleNamespace(plans=workers.plan(1, 1, [])))
    with view:
        view.worker_line(1, "UserWarning: from a library, password http://admin:S3NTINEL-pw@db-host:5000 quoted")
        view.show(1, Warned("MLflow: postgresql://u:S3NTINEL-pw@db/x refused"))
    printed = out.getvalue()
    assert "S3NTINEL" not in printed
    assert "worker 1: UserWarning: from a library, password http://admin:***@db-host:5000 quoted" in printed
    assert "warning (worker 1): MLflow: postgresql://u:***@db/x refused" in printed
