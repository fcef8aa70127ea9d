"""A search planned to its study's minutes (search/planned.py): the clock that keeps a run from starting when it
cannot end in time and stops one at the deadline (to resume it next time), and a whole planned run through the real
CLI: rungs recorded with their fidelity and replayed bit for bit, the champion phase at full fidelity on the threads
the rung-0 workers had between them."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time

import optuna
import pytest
from conftest import StudyEnv, kill_search_mid_trial, require_real_dataset

from pipeline import store
from pipeline.cli import main
from pipeline.data.recorded import study_data
from pipeline.infra.concurrency import available_cores
from pipeline.search import champion, loop, plan, plan_record, planned
from pipeline.search.clock import TrialClock
from pipeline.search.events import Listener
from pipeline.search.fidelity import FULL
from pipeline.search.objective import Objective, SearchTrials
from pipeline.search.plan import Rate, Rates
from pipeline.search.trial_files import checkpoint_path
from pipeline.spec import paths, studies
from pipeline.spec.stop_reason import StopReason
from pipeline.store.versions import versions
from pipeline.training import train

# A device that trains one image a second: no tiny run fits in a few seconds.
CRAWLING = Rates(1, (Rate(1, 1.0, 0.0),), trial_seconds=0.0)
FAST = Rates(1, (Rate(1, 1e-6, 0.0),), trial_seconds=0.0)


def open_tiny(env: StudyEnv, root, **study) -> tuple[studies.StudySpec, optuna.Study, object]:
    env.write_study(pruner="none", **study)
    spec = studies.load("tiny", env.studies_dir)
    opened = store.open_study(spec, store.make_storage(env.storage), log=lambda line: None)
    return spec, opened, study_data(spec, root, "cpu")


def test_a_trial_that_would_not_end_by_its_stage_end_is_not_started_but_queued_again(study_env, tiny_dataset):
    spec, study, data = open_tiny(study_env, tiny_dataset[1], epochs=3)
    clock = TrialClock(CRAWLING, 100, stage_end=time.time() + 30, deadline=time.time() + 600)
    objective = Objective(spec, data, SearchTrials(spec), threads=1, checkpoints=study_env.checkpoints(), clock=clock)
    outcome = loop.run_trials(study, objective, loop.SearchBudget(spec))
    assert (outcome.ran, outcome.stop_reason) == (0, StopReason.TIME)
    first, retry = store.records(study)
    assert (first.state, first.fail_reason, first.history) == ("FAIL", "no_time", [])  # not one epoch trained
    assert "needs about 1500 s" in first.fail_detail  # 500 images x 3 epochs at a second each
    assert (retry.state, retry.retry_of) == ("WAITING", first.number)
    # The next run, with time, trains those very parameters first.
    rerun = Objective(spec, data, SearchTrials(spec), threads=1, checkpoints=study_env.checkpoints())
    assert loop.run_trials(study, rerun, loop.SearchBudget(spec)).stop_reason == StopReason.BUDGET
    done = store.records(study, (optuna.trial.TrialState.COMPLETE,))
    assert (done[0].retry_of, done[0].sampled, done[0].seed) == (first.number, first.sampled, first.seed)


def test_a_trial_running_at_the_deadline_is_stopped_with_its_checkpoint_and_resumed_by_the_next_run(
        study_env, tiny_dataset):
    spec, study, data = open_tiny(study_env, tiny_dataset[1], epochs=3, trials=1)
    deadline, epochs_seen = time.time() + 600, []

    class Watch(Listener):
        def epoch_ended(self, number, metrics):
            epochs_seen.append(metrics.epoch)

    def now() -> float:  # the deadline comes once the first epoch has ended (and been checkpointed)
        return deadline + 1 if epochs_seen else time.time()

    clock = TrialClock(FAST, 100, stage_end=deadline, deadline=deadline, now=now)
    checkpoints = study_env.checkpoints()
    objective = Objective(spec, data, SearchTrials(spec), Watch(), threads=1, checkpoints=checkpoints, clock=clock)
    outcome = loop.run_trials(study, objective, loop.SearchBudget(spec))
    assert (outcome.ran, outcome.stop_reason) == (1, StopReason.TIME)
    stopped, retry = store.records(study)
    assert (stopped.state, stopped.fail_reason, len(stopped.history)) == ("FAIL", "deadline", 1)
    assert checkpoint_path(checkpoints, stopped.number).is_file()  # epoch 1 kept for the retry
    assert (retry.state, retry.first_attempt, retry.seed) == ("WAITING", stopped.number, stopped.seed)

    # The next run (no deadline near) resumes it from epoch 1 and ends as an uninterrupted run would.
    rerun = Objective(spec, data, SearchTrials(spec), threads=1, checkpoints=checkpoints)
    assert loop.run_trials(study, rerun, loop.SearchBudget(spec)).stop_reason == StopReason.BUDGET
    resumed = store.records(study, (optuna.trial.TrialState.COMPLETE,))[0]
    assert resumed.resumed_from_epoch == 1
    whole = train.fit(stopped.params, data, seed=stopped.seed, threads=1)
    assert resumed.history == [{k: getattr(m, k) for k in resumed.history[0]} for m in whole.history]
    assert not checkpoint_path(checkpoints, stopped.number).exists()  # done: nothing left to resume


PLANNED_STUDY = {
    "dataset": "mnist", "model": "cnn", "minutes": 30, "trials": 6, "seed": 3, "sampler": "tpe", "epochs": 2,
    "train_limit": 5000, "val_limit": 1000,
    "fixed": {"cnn_channels": [8, 16], "pool": "every", "head": "gap", "head_units": 0, "batch_size": 64},
    "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
              "dropout": {"type": "float", "low": 0.0, "high": 0.3}},
    "champion": {"top_k": 2, "seeds": 2},
}


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory):
    """One planned search of 6 configurations on an MNIST subset, with 2 workers at rung 0, tracked nowhere. Its
    minutes are far more than it needs on any machine: the study's cap of 6 configurations ends rung 0."""
    require_real_dataset("mnist")
    folder = tmp_path_factory.mktemp("planned")
    (folder / "studies").mkdir()
    (folder / "studies" / "planned.toml").write_text(_toml(PLANNED_STUDY))
    storage = str(folder / "optuna.journal")
    args = ["search", "--study", "planned", "--studies-dir", str(folder / "studies"), "--storage", storage,
            "--root", str(paths.DATA_ROOT), "--no-tracking", "--workers", "2", "--reports-dir", str(folder / "reports")]
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, storage, done.stdout


def _toml(content: dict) -> str:
    plain = [f"{k} = {json.dumps(v)}" for k, v in content.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{key} = {_inline(value)}" for key, value in v.items())
              for k, v in content.items() if isinstance(v, dict)]
    return "\n".join(plain) + "\n\n" + "\n\n".join(tables) + "\n"


def _inline(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def test_a_planned_run_trains_its_rungs_then_the_champion_at_full_fidelity_on_every_thread(planned_run):
    folder, storage, stdout = planned_run
    backend = store.make_storage(storage)
    study = optuna.load_study(study_name="planned", storage=backend)
    made = plan_record.stored(study)
    assert [s.name for s in made.stages] == ["rung 0", "rung 1", "champion"]
    assert "rung 0" in stdout and "the run ends by" in stdout  # the plan's table came first
    assert plan_record.minutes_spent(study) > 0

    sampled = store.records(study, (optuna.trial.TrialState.COMPLETE,))
    assert len(sampled) == 6  # the study's cap
    full_split = study_data(studies.load("planned", folder / "studies"), paths.DATA_ROOT, "cpu").split_hash
    for record in sampled:
        assert record.fidelity == {"rung": 0, "images": 625, "epochs": 1, "subset_seed": record.fidelity["subset_seed"]}
        assert record.params["epochs"] == 1 and record.split_hash != full_split
    workers_threads = max(available_cores() // 2, 1)
    assert {r.threads for r in sampled} == {workers_threads}

    rung1 = store.records(champion.find_companion(backend, "planned", champion.rung_suffix(1)),
                          (optuna.trial.TrialState.COMPLETE,))
    best_two = sorted(sampled, key=lambda r: -r.first_value)[:2]
    assert sorted(r.confirmation_of for r in rung1) == sorted(r.number for r in best_two)  # the best third of 6
    assert {(r.fidelity["rung"], r.fidelity["images"], r.fidelity["epochs"]) for r in rung1} == {(1, 1250, 2)}

    runs = store.records(champion.find_companion(backend, "planned"), (optuna.trial.TrialState.COMPLETE,))
    assert sorted((r.confirmation_of, r.repeat) for r in runs) == sorted(
        (n, repeat) for n in {r.confirmation_of for r in rung1} for repeat in (0, 1))
    assert {(r.fidelity["rung"], r.fidelity["epochs"], len(r.history), r.split_hash) for r in runs} == {
        (FULL, 2, 2, full_split)}
    # Free threads go to the running trials: the later stages run one at a time on every core.
    assert {r.threads for r in runs} == {available_cores()}

    # `make studies` counts a planned study in configurations and minutes
    from pipeline.commands.studies import study_states

    (state,) = study_states(folder / "studies", storage)
    assert state.progress == f"6 configs, {plan_record.minutes_spent(study):.1f}/30 min" and state.state == "resumable"

    # The report page sets each stage's plan against what happened.
    page = (folder / "reports" / "planned.html").read_text()
    assert "Plan and clock" in page
    for found in plan_record.actuals(studies.load("planned", folder / "studies"), study, made):
        assert found.runs == found.stage.runs  # every planned run completed (the cap fixed rung 0's count)
        assert found.wall_seconds is not None and f"{found.runs} of {found.stage.runs}" in page


def test_every_rung_of_a_planned_run_replays_bit_for_bit(planned_run, capsys):
    folder, storage, _ = planned_run
    backend = store.make_storage(storage)
    study = optuna.load_study(study_name="planned", storage=backend)
    runs = store.records(champion.find_companion(backend, "planned"), (optuna.trial.TrialState.COMPLETE,))
    number = runs[0].confirmation_of
    common = ["replay", "--study", "planned", "--studies-dir", str(folder / "studies"), "--storage", storage,
              "--root", str(paths.DATA_ROOT), "--trial", str(number)]
    for extra in ([], ["--rung", "1"], ["--repeat", "0"]):
        assert main([*common, *extra]) == 0, (extra, capsys.readouterr().out[-2000:])
    study = optuna.load_study(study_name="planned", storage=backend)  # the replays' records, as they wrote them
    recorded = store.replays(study)
    assert {name: r["matched"] for name, r in recorded.items()} == {
        f"{number}": True, f"{number}/rung 1": True, f"{number}/repeat 0": True}


def test_make_plan_prints_the_plan_without_training_or_touching_the_store(planned_run, capsys):
    folder, _, _ = planned_run
    storage = str(folder / "untouched.journal")
    code = main(["plan", "--study", "planned", "--studies-dir", str(folder / "studies"), "--storage", storage,
                 "--root", str(paths.DATA_ROOT), "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "planned: 30 minutes on cpu" in out and "2 worker(s) at rung 0" in out
    rows = [line.split()[0:2] for line in out.splitlines()]
    assert ["rung", "0"] in rows and ["rung", "1"] in rows and ["champion", "5,000"] in rows
    assert "the run ends by" in out
    assert versions(store.make_storage(storage), "planned") == []  # nothing made


def test_make_plan_refuses_a_study_without_minutes_in_one_line(study_env, tiny_dataset, capsys):
    study_env.write_study()
    assert study_env.run("plan") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no minutes to plan" in err and "MINUTES=30" in err


def test_a_planned_run_killed_in_its_champion_phase_resumes_there_with_the_minutes_it_has_left(study_env):
    """kill -9 in the middle of a champion-phase run: the rerun skips the rungs done, resumes the killed run from its
    checkpoint, and the minutes of both runs add up on the study's clock."""
    study_env.write_study(minutes=30, trials=4, epochs=12, pruner="none", champion={"top_k": 2, "seeds": 2})
    process = subprocess.Popen(study_env.command("search"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = store.make_storage(study_env.storage)
    cut: dict[str, object] = {}

    def mid_phase_run() -> int | None:
        """A champion-phase run with an epoch or more behind it, after another one completed."""
        companion = champion.find_companion(storage, "tiny")
        runs = store.records(companion) if companion is not None else []
        running = [r for r in runs if r.state == "RUNNING" and 1 <= len(r.history) <= 10]
        if not running or not any(r.state == "COMPLETE" for r in runs):
            return None
        cut.update(running=running[0])
        return process.pid

    kill_search_mid_trial(process, mid_phase_run)
    study = optuna.load_study(study_name="tiny", storage=storage)
    spent_before = plan_record.minutes_spent(study)
    assert spent_before > 0  # counted as trials ended, though the process never got to say goodbye
    assert plan_record.reached(study) == "champion"

    rerun = subprocess.run(study_env.command("search"), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "rung 0 was done by an earlier run" in rerun.stdout, rerun.stdout
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(store.records(study, store.FINISHED)) == 4  # no new rung-0 trial
    assert plan_record.minutes_spent(study) > spent_before
    runs = store.records(champion.find_companion(storage, "tiny"), (optuna.trial.TrialState.COMPLETE,))
    assert len({(r.confirmation_of, r.repeat) for r in runs}) == 4
    killed = cut["running"]
    (retry,) = [r for r in runs if r.retry_of == killed.number]
    assert (retry.confirmation_of, retry.repeat, retry.seed) == (killed.confirmation_of, killed.repeat, killed.seed)
    assert retry.resumed_from_epoch >= 1 and len(retry.history) == 12


def test_the_champion_phase_is_planned_again_at_its_start_for_the_time_left_so_a_champion_comes_out(tiny):
    """Runs slower than planned leave the phase less time than its configurations x seeds: planned again as it
    starts, it trains fewer seeds (then fewer configurations) with every run each needs, rather than all of them
    without a champion; the study's champion table is then the stored plan's."""
    from pipeline.search import plan as plans

    spec = studies.load("cnn")
    study = optuna.create_study(direction="maximize")
    for value in (0.98, 0.97, 0.96):
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 1e-2)  # three distinct configurations
        trial.set_user_attr("flops_per_image", 50_000_000)
        study.tell(trial, value)
    rates = Rates(2, (Rate(50_000_000, 0.001, 0.0),), trial_seconds=0.0)  # a full-fidelity run: 110 s of 110 k images
    budget = plans.Budget(30, 110_000, 100, 10, 1, 1, top_k=2, seeds=3)
    made = plans.make_plan(budget, rates, rates)
    plan_record.store_plan(study, made)

    def at_champion(seconds: float) -> plans.Stage:
        clock = planned.RunClock(time.time(), time.time() + seconds)
        return planned.replanned(spec, study, made, made.champion, clock, tiny)[0].champion

    assert (at_champion(700).configs, at_champion(700).seeds) == (2, 3)  # 6 runs of 110 s fit
    stage = at_champion(450)  # 4 runs fit
    assert (stage.configs, stage.seeds, stage.seconds_each) == (2, 2, pytest.approx(110.0))
    assert plan_record.stored(study).champion == stage
    assert champion.champion_table(spec, study).top_k == 2 and champion.champion_table(spec, study).seeds == 2
    assert (at_champion(250).configs, at_champion(250).seeds) == (1, 2)
    assert "champion 1 x 2 run(s) of 1.8 min" in plan_record.stored(study).warnings[-1]


def test_a_rungs_subset_is_drawn_once_per_process_and_is_the_one_its_records_name(study_env, tiny_dataset):
    from pipeline.search.fidelity import Fidelity

    spec, _, data = open_tiny(study_env, tiny_dataset[1])
    objective = Objective(spec, data, SearchTrials(spec), threads=1)
    rung = Fidelity(0, 200, 1, 5)
    first = objective._data(rung)
    assert objective._data(rung) is first and len(first.train) == 200
    assert first.split_hash == rung.data(data).split_hash != data.split_hash  # the same images, drawn afresh
    assert objective._data(None) is data


def test_a_planned_runs_minutes_count_from_when_the_command_began(study_env, tiny_dataset, capsys):
    """`make search` passes its own start (--started-at): the set-up before the program (a fresh clone's .venv)
    spends the study's minutes too. Begun 55 s ago with one minute, the run has no time for a trial and says so."""
    study_env.write_study(minutes=1, trials=4, pruner="none")
    began = int(time.time()) - 55  # whole seconds, as the Makefile passes them: rounding up would be under 55 s ago
    assert study_env.run("search", "--workers", "1", "--started-at", str(began)) == 0
    study = study_env.load()
    assert store.records(study, store.FINISHED) == []
    assert 55 / 60 <= plan_record.minutes_spent(study) < 1.5
    assert "MINUTES=16 gives it 15 more" in capsys.readouterr().out

    # Raised to 3 minutes, the study is planned again for what it has left, and trains.
    assert study_env.run("search", "--workers", "1", "--minutes", "3") == 0
    assert re.search(r"this plan is for the [12]\.\d left", capsys.readouterr().out)  # 3 less what was spent
    study = study_env.load()
    made = plan_record.stored(study)
    assert made.minutes == 3 and made.planned_seconds <= 2.1 * 60
    assert len(store.records(study, store.FINISHED)) == 4  # the study's cap of configurations
    with pytest.raises(SystemExit) as refused:
        study_env.run("search", "--started-at", "yesterday")
    assert refused.value.code == 2
    assert "expected the Unix time the command began" in capsys.readouterr().err


def test_the_set_up_before_the_search_is_taken_out_of_the_first_plan(study_env, tiny_dataset, capsys):
    """Begun two minutes before the search (a fresh clone's .venv), a 10-minute study is planned for the 8 left, so
    that rung 0 does not find its stage two minutes shorter than planned; the stored plan keeps the study's 10."""
    study_env.write_study(minutes=10, trials=4, pruner="none")
    assert study_env.run("search", "--workers", "1", "--started-at", str(int(time.time()) - 120)) == 0
    found = re.search(r"the set-up before the search took (2\.\d) min: this plan is for the (\d\.\d) left",
                      capsys.readouterr().out)
    assert found is not None and float(found[1]) + float(found[2]) == pytest.approx(10, abs=0.11)
    made = plan_record.stored(study_env.load())
    assert made.minutes == 10
    assert made.reserve_seconds == pytest.approx(
        plan.RESERVE_SECONDS + plan.RESERVE_SHARE * float(found[2]) * 60, abs=0.5)  # made for the 8 minutes


def test_rung_zeros_pace_carries_over_to_all_the_threads_when_slower_than_measured_not_when_faster():
    whole = Rates(2, (Rate(1, 0.001, 0.0005),), trial_seconds=1.0)
    each = whole.scaled(0.5)
    assert planned.carried_over(each, each.scaled(0.8), whole) == whole.scaled(0.8)  # a busy machine: slower
    assert planned.carried_over(each, each.scaled(1.3), whole) == whole  # faster at rung 0: the calibration stands


def test_a_rung_whose_runs_leave_time_unused_is_widened_to_the_next_best_configurations(planned_run, tmp_path):
    """Rung 1 planned for fewer configurations than the time left holds (its first estimate of the champion phase,
    from rung 0's runs, was long): once its runs are done, the plan made again gives it the next best of rung 0, up
    to the best third, and no more; with no time left it stays as it is."""
    folder, storage, _ = planned_run
    copy = tmp_path / "copy.journal"
    shutil.copy(storage, copy)
    study = optuna.load_study(study_name="planned", storage=store.make_storage(str(copy)))
    spec = studies.load("planned", folder / "studies")
    data = study_data(spec, paths.DATA_ROOT, "cpu")
    made = plan_record.stored(study)
    narrow = dataclasses.replace(made, stages=tuple(dataclasses.replace(s, configs=1) if s.rung == 1 else s
                                                    for s in made.stages))
    plan_record.store_plan(study, narrow)
    now = time.time()
    assert planned.widened(spec, study, narrow, narrow.stage("rung 1"), planned.RunClock(now, now + 1), data) is None
    wide, _ = planned.widened(spec, study, narrow, narrow.stage("rung 1"), planned.RunClock(now, now + 1800), data)
    assert wide.stage("rung 1").configs == 2  # the best third of rung 0's 6
    assert plan_record.stored(study).stage("rung 1").configs == 2 and "planned again at rung 1" in wide.warnings[-1]
    assert planned.widened(spec, study, wide, wide.stage("rung 1"), planned.RunClock(now, now + 1800), data) is None


def test_a_rung_that_fell_short_of_its_plan_sends_on_only_its_best_third(study_env, tiny_dataset):
    """Rung 1 was planned for 20 of rung 0's 40 configurations, but rung 0 finished only 9 (a machine slower than
    measured): rung 1 trains the best 3 again, not all 9."""
    from pipeline.search.plan import Plan, Stage

    spec, study, data = open_tiny(study_env, tiny_dataset[1], minutes=30, trials=9)
    images = len(data.train)
    made = Plan(30, 1, 1, (Stage("rung 0", images, 1, 40, 1, 1.0, 1), Stage("rung 1", images, 1, 20, 1, 1.0, 1),
                           Stage("champion", images, 1, 2, 2, 1.0, 1)), 0.0, (), FAST, FAST)
    plan_record.store_plan(study, made)
    now = time.time()
    searched = planned.rung_zero(spec, study, data, Listener(), made, planned.RunClock(now, now + 600), 1, None)
    assert searched.ran == 9
    again, rates = planned.replanned(spec, study, made, made.rungs[1], planned.RunClock(now, now + 600), data)
    assert again.stage("rung 1").configs == 3 and plan_record.stored(study) == again
    out_of_time = planned.RunClock(time.time(), time.time())  # queue rung 1, train none of it
    planned.later_rung(spec, study, store.storage_of(study), data, Listener(), again, rates, again.stage("rung 1"),
                       out_of_time, 1, None)
    companion = champion.find_companion(store.storage_of(study), study.study_name, champion.rung_suffix(1))
    queued = store.records(companion, (optuna.trial.TrialState.WAITING,))
    best_three = [r.number for r in champion.ranked(spec, study)[:3]]
    assert sorted(r.confirmation_of for r in queued) == sorted(best_three)
