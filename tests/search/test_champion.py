"""The champion phase (pipeline/champion.py): the search's best configurations trained again over seeds, the
champion by the best mean with a Student-t interval, through the real CLI on the tiny dataset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import datetime

import mlflow
import pytest
from conftest import TINY_CLI, StudyEnv, kill_search_mid_trial, study_refusal
from optuna.trial import TrialState

from pipeline import store
from pipeline.cli import main
from pipeline.search import champion
from pipeline.spec import studies
from pipeline.spec.studies import StudyError
from pipeline.tracking import registry

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

# Two configurations of the same network (so the same FLOPs): A is steady, B (a far too high learning rate and
# heavy dropout) lands either near 0.6 or at 1.0. With study seed 30, B's search run is the study's best single
# run (1.00), and over three seeds A is the better configuration (a mean near 0.92 against B's near 0.73). The
# exact values depend on the arithmetic (bf16 or fp32, AVX-512 or AVX2 kernels): the tests assert the order, and
# take every figure they check from the stores.
STEADY, LUCKY = {"lr": 0.03, "dropout": 0.0}, {"lr": 0.3, "dropout": 0.5}


def write_lucky_study(env: StudyEnv, **champion_table) -> None:
    env.write_study(trials=2, epochs=15, seed=30, sampler="random", pruner="none", fixed={"augment": 0.0},
                    space={"lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
                           "dropout": {"type": "float", "low": 0.0, "high": 0.5}},
                    baseline=[STEADY, LUCKY], champion={"top_k": 2, "seeds": 3, "minutes": 10} | champion_table)


def phase_runs(env: StudyEnv, states=None) -> list[store.TrialRecord]:
    return store.records(env.load("tiny" + champion.COMPANION), states)


def outcomes(env: StudyEnv) -> list[tuple[int, list[tuple[int, int, float]]]]:
    """Each candidate's runs as (repeat, seed, value): what must not depend on how the phase got there."""
    return [(c.trial.number, [(r.repeat, r.seed, r.value) for r in c.runs]) for c in table(env).candidates]


def table(env: StudyEnv) -> champion.Standings:
    storage = store.make_storage(env.storage)
    spec = studies.load("tiny", env.studies_dir)
    return champion.standings(spec, env.load(), champion.find_companion(storage, "tiny"))


# --------------------------------------------------------------------------------------------------
# The statistics and the choice, on given values


def test_the_interval_is_the_student_t_interval_of_the_mean():
    # By hand: mean 0.993; deviations -0.003, -0.001, 0.004; variance 26e-6 / 2 = 13e-6; std 0.00360555;
    # standard error 0.00360555 / sqrt(3) = 0.00208167; t(0.975, 2 degrees of freedom) = 4.302653 (a t table).
    summary = champion.summarize([0.990, 0.992, 0.997])
    assert summary.mean == pytest.approx(0.993, abs=1e-12)
    assert summary.std == pytest.approx(0.00360555, abs=1e-8)
    assert summary.standard_error == pytest.approx(0.00208167, abs=1e-8)
    assert summary.ci_low == pytest.approx(0.993 - 4.302653 * 0.00208167, abs=1e-7)
    assert summary.ci_high == pytest.approx(0.993 + 4.302653 * 0.00208167, abs=1e-7)
    assert (summary.low, summary.high, summary.n) == (0.990, 0.997, 3)
    # Two runs: t(0.975, 1) = 12.7062; one run has no spread and no interval.
    two = champion.summarize([0.5, 0.7])
    assert two.ci_high - two.mean == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2), abs=1e-4)
    one = champion.summarize([0.8])
    assert (one.mean, one.std, one.ci_low, one.ci_high) == (0.8, None, None, None)


def candidate(number: int, values: list[float], flops: int, rank: int) -> champion.Candidate:
    record = store.TrialRecord(number, "COMPLETE", [values[0]], {}, 1.0, datetime.now(), flops_per_image=flops)
    runs = [champion.Run(i, 100 + i, i, v) for i, v in enumerate(values)]
    return champion.Candidate(record, rank, runs, champion.summarize(values))


def test_the_best_mean_wins_a_cheaper_model_within_one_standard_error_wins_the_tie_and_incomplete_ones_wait():
    leader = candidate(1, [0.990, 0.994, 0.998], flops=2_000_000, rank=2)  # mean 0.994, standard error 0.0023
    lucky = candidate(0, [0.999, 0.980, 0.981], flops=1_000_000, rank=1)  # the best single run, mean 0.9867
    chosen, reason = champion.choose([lucky, leader], "maximize", seeds=3)
    assert chosen is leader and "trial 1 has the best mean" in reason and "tie" not in reason

    close = candidate(2, [0.993, 0.992, 0.991], flops=500_000, rank=3)  # 0.002 below: within 0.0023
    chosen, reason = champion.choose([lucky, leader, close], "maximize", seeds=3)
    assert chosen is close
    assert "within one standard error" in reason and "fewer FLOPs" in reason and "trial 1 has the best mean" in reason
    assert "(0.5 M vs 2.0 M)" in reason

    # Counts that round alike at one decimal are shown with the decimals that tell them apart.
    near_copy = candidate(6, [0.993, 0.992, 0.991], flops=1_995_000, rank=3)
    reason = champion.choose([leader, near_copy], "maximize", seeds=3)[1]
    assert "(1.995 M vs 2.000 M)" in reason
    twin = candidate(7, [0.993, 0.992, 0.991], flops=1_999_900, rank=3)
    assert "(1,999,900 vs 2,000,000)" in champion.choose([leader, twin], "maximize", seeds=3)[1]
    uncounted = candidate(8, [0.990, 0.994, 0.998], flops=None, rank=2)  # a trial that recorded no FLOPs
    assert "(0.5 M vs - M)" in champion.choose([uncounted, close], "maximize", seeds=3)[1]

    unproven = candidate(3, [0.9999], flops=100, rank=4)  # one run: not a candidate until its repeats ran
    assert champion.choose([unproven, leader], "maximize", seeds=3)[0] is leader
    assert champion.choose([unproven], "maximize", seeds=3)[0] is None

    low_loss = candidate(4, [0.10, 0.11, 0.12], flops=1, rank=1)
    high_loss = candidate(5, [0.30, 0.31, 0.32], flops=1, rank=2)
    assert champion.choose([high_loss, low_loss], "minimize", seeds=3)[0] is low_loss
    # The exported run: the confirmation run (never the search's own) nearest the mean.
    assert champion.closest_to_mean(leader).repeat == 1  # 0.994 is the mean itself


# --------------------------------------------------------------------------------------------------
# The phase, end to end


def test_the_champion_is_the_best_mean_not_the_lucky_single_run_and_everything_is_recorded(
        study_env, mlflow_store, capsys):
    write_lucky_study(study_env)
    assert study_env.run("search") == 0
    out = capsys.readouterr().out
    best = store.leading_best(study_env.load())
    assert best.sampled == LUCKY and best.values == [1.0]  # the search alone would crown the lucky seed

    runs = phase_runs(study_env, (TrialState.COMPLETE,))
    assert sorted((r.confirmation_of, r.repeat) for r in runs) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for run in runs:  # recorded like a trial: params, the derived seed, every epoch, provenance
        assert run.seed == studies.derive_seed(30, run.confirmation_of, run.repeat)
        assert run.sampled == (STEADY if run.confirmation_of == 0 else LUCKY)
        assert len(run.history) == 15 and run.dataset_digest and run.split_hash

    standings = table(study_env)
    lucky, steady = standings.candidates  # in the search's order: the lucky run first
    assert lucky.runs[0].value > steady.runs[0].value  # the lucky configuration owns the best single run...
    assert steady.summary.mean > lucky.summary.mean  # ...and the steady one the best mean over three seeds
    assert standings.champion is steady and steady.trial.number == 0
    # Rounds, best mean first: repeat 1 in the search's order (the lucky run first); by then the steady configuration
    # leads on its mean, so its repeat 2 trains before the lucky one's (a phase cut short there completes it).
    number = {(r.confirmation_of, r.repeat): r.number for r in runs}
    assert max(number[(0, 1)], number[(1, 1)]) < min(number[(0, 2)], number[(1, 2)])
    assert number[(1, 1)] < number[(0, 1)]
    assert sum(r.value for r in steady.runs[:2]) > sum(r.value for r in lucky.runs[:2])
    assert number[(0, 2)] < number[(1, 2)]
    mean, exported = steady.summary.mean, standings.exported
    assert exported.repeat == min((1, 2), key=lambda repeat: (abs(steady.runs[repeat].value - mean), repeat))
    assert "champion phase of tiny" in out and f"Champion: trial 0 has the best mean ({mean:.4f} over 3 runs)" in out
    # What to re-check next is the champion's exported run, not the search's lucky best.
    assert (f"`make replay STUDY=tiny TRIAL=0 REPEAT={exported.repeat}` re-checks the champion's exported run bit for "
            "bit") in " ".join(out.split())

    # The report page: the phase's choice is the champion (not the search's lucky best), with the phase's table.
    page = (study_env.reports / "tiny.html").read_text()
    assert f"Trial <b>{steady.trial.number}</b>" in page and f"Trial <b>{best.number}</b>" not in page
    assert (f'<tr class="chosen"><td class="num">2</td><td class="num">0</td><td class="num">3</td><td class="num">'
            f'{mean:.4f}</td><td class="num">{steady.summary.std:.4f}</td><td class="num">'
            f'[{steady.summary.ci_low:.4f}, {steady.summary.ci_high:.4f}]</td>') in page

    # MLflow: each run a child run tagged as a confirmation of its trial; the table and its figures on the parent.
    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    confirmations = client.search_runs([experiment], "tags.role = 'confirmation'")
    assert sorted((r.data.tags["confirmation_of"], r.data.tags["repeat"]) for r in confirmations) == [
        ("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert all(r.info.status == "FINISHED" and "model_uri" in r.data.tags for r in confirmations)
    (parent,) = client.search_runs([experiment], "tags.role = 'study'")
    assert parent.data.metrics["champion_val_mean"] == pytest.approx(mean)
    assert (parent.data.metrics["champion_val_ci_low"], parent.data.metrics["champion_val_ci_high"]) == \
        pytest.approx((steady.summary.ci_low, steady.summary.ci_high))
    artifact = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/champion.json")
    assert json.loads(artifact)["champion_trial"] == 0
    written = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/champion.md")
    assert f"| 0 (champion) | 3 | {mean:.4f} | {steady.summary.std:.4f} | [{steady.summary.ci_low:.4f}, " in written
    # The registry's champion: the chosen configuration, by its run closest to the mean.
    version = registry.champion(client, "tiny")
    assert (version.trial_number, version.confirmation_number) == (0, exported.number)

    # Export: those weights, the mean and interval over seeds beside the single test figure.
    assert study_env.run("export-best") == 0
    metrics = json.loads((study_env.exports / "tiny" / "metrics.json").read_text())
    config = json.loads((study_env.exports / "tiny" / "config.json").read_text())
    assert (config["trial_number"], config["repeat"]) == (0, exported.repeat)
    assert config["trial_seed"] == studies.derive_seed(30, 0, exported.repeat)
    assert metrics["val_over_seeds"]["mean"] == pytest.approx(mean) and metrics["val_over_seeds"]["runs"] == 3
    card = (study_env.exports / "tiny" / "model_card.md").read_text()
    assert f"mean {mean:.4f}, 95% CI [{steady.summary.ci_low:.4f}, {steady.summary.ci_high:.4f}]" in card
    assert f"repeat {exported.repeat} of trial 0" in card

    capsys.readouterr()
    assert study_env.run("replay", "--trial", "0", "--repeat", str(exported.repeat)) == 0  # replays bit for bit
    assert f"trial 0 repeat {exported.repeat} replayed identically" in capsys.readouterr().out


def test_two_fresh_runs_give_the_same_table_and_untracked_export_takes_the_same_run(study_env, tmp_path):
    twin = study_env.replace(studies_dir=tmp_path / "twin" / "studies", storage=f"sqlite:///{tmp_path}/twin.db",
                             exports=tmp_path / "twin" / "exports")
    for env in (study_env, twin):
        write_lucky_study(env)
        assert env.run("search") == 0
    first, second = table(study_env).as_dict(), table(twin).as_dict()
    assert first == second and first["champion_trial"] == 0
    assert twin.run("export-best") == 0  # no registry: the chosen run is retrained from its record
    config = json.loads((twin.exports / "tiny" / "config.json").read_text())
    assert (config["trial_number"], config["repeat"], config["trial_seed"]) == (
        0, first["exported"]["repeat"], first["exported"]["seed"])


def test_the_phase_resumes_adds_only_what_a_larger_table_asks_and_respects_its_minutes(study_env, capsys):
    write_lucky_study(study_env, seeds=2)
    assert study_env.run("search") == 0
    before = {(r.confirmation_of, r.repeat): r.number for r in phase_runs(study_env, (TrialState.COMPLETE,))}
    assert set(before) == {(0, 1), (1, 1)}

    capsys.readouterr()
    assert study_env.run("search") == 0  # a finished phase is not run again
    assert "0 runs to train" in capsys.readouterr().out
    assert len(phase_runs(study_env)) == 2

    write_lucky_study(study_env, seeds=3, minutes=1e-6)  # one more seed each, but no time to train one
    assert study_env.run("search") == 0
    out = capsys.readouterr().out
    assert "2 runs to train" in out and "minutes would be exceeded by the next run: 2 runs left" in out
    assert len(phase_runs(study_env, (TrialState.COMPLETE,))) == 2
    assert table(study_env).champion is None  # no candidate has its three runs yet

    write_lucky_study(study_env, seeds=3)
    assert study_env.run("search") == 0
    after = {(r.confirmation_of, r.repeat): r.number for r in phase_runs(study_env, (TrialState.COMPLETE,))}
    assert set(after) == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert {key: after[key] for key in before} == before  # the first runs were not trained again
    assert table(study_env).champion.trial.number == 0

    write_lucky_study(study_env, top_k=1)  # fewer candidates: nothing to add, nothing lost
    assert study_env.run("search") == 0
    assert len(phase_runs(study_env)) == 4 and [c.trial.number for c in table(study_env).candidates] == [1]


@pytest.mark.faults
def test_kill_9_mid_phase_then_rerun_completes_it_with_nothing_repeated(study_env, tmp_path):
    twin = study_env.replace(studies_dir=tmp_path / "twin" / "studies", storage=f"sqlite:///{tmp_path}/twin.db")
    for env in (study_env, twin):
        write_lucky_study(env)
    assert twin.run("search") == 0  # never interrupted
    process = subprocess.Popen(study_env.command("search"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut: dict[str, object] = {}

    def mid_phase_run() -> int | None:
        """A champion-phase run with a few epochs behind it, after another one completed."""
        try:
            runs = phase_runs(study_env)
        except KeyError:  # the phase has not started yet
            return None
        running = [r for r in runs if r.state == "RUNNING" and 1 <= len(r.history) <= 13]
        if not running or not any(r.state == "COMPLETE" for r in runs):
            return None
        cut.update(running=running[0], complete={r.number for r in runs if r.state == "COMPLETE"})
        return process.pid

    kill_search_mid_trial(process, mid_phase_run)

    rerun = subprocess.run(study_env.command("search"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    runs = phase_runs(study_env)
    complete = [r for r in runs if r.state == "COMPLETE"]
    assert sorted((r.confirmation_of, r.repeat) for r in complete) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert cut["complete"] <= {r.number for r in complete}  # what was done before the kill stayed done
    killed = cut["running"]
    (retry,) = [r for r in runs if r.retry_of == killed.number]
    assert (retry.confirmation_of, retry.repeat, retry.seed) == (killed.confirmation_of, killed.repeat, killed.seed)
    assert retry.resumed_from_epoch >= 1  # it took over the killed run's checkpoint
    assert outcomes(study_env) == outcomes(twin)  # the same seeds and values as the run never interrupted
    assert "Champion: trial 0" in rerun.stdout


def test_after_two_workers_search_the_coordinator_runs_the_phase_with_the_same_outcome(study_env, tmp_path):
    twin = study_env.replace(studies_dir=tmp_path / "twin" / "studies", storage=f"sqlite:///{tmp_path}/twin.db")
    for env in (study_env, twin):
        write_lucky_study(env)
    assert twin.run("search") == 0
    env = study_env.replace(storage=str(study_env.studies_dir / "optuna.journal"))
    assert main(env.args("search", "--workers", "2"),
                worker_program=[sys.executable, str(TINY_CLI), str(env.root)]) == 0
    assert {r.owner["pid"] for r in phase_runs(env, (TrialState.COMPLETE,))} == {os.getpid()}
    assert outcomes(env) == outcomes(twin)  # each run's seed decides its value, whichever process trains it


def test_a_study_without_a_champion_table_has_no_phase(study_env, capsys):
    study_env.write_study(trials=2)
    assert study_env.run("search") == 0
    assert "champion phase" not in capsys.readouterr().out
    assert champion.find_companion(store.make_storage(study_env.storage), "tiny") is None


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"champion": {"seeds": 1}}, "champion.seeds = 1: Input should be greater than or equal to 2"),
    ({"champion": {"top_k": 0}}, "champion.top_k = 0"),
    ({"champion": {"minutes": 0}}, "champion.minutes = 0"),
    ({"champion": {"runs": 3}}, "unknown key 'champion.runs'"),
    ({"champion": {"seeds": 3}, "objectives": [{"metric": "parameter_count"}]},
     "champion: with top_k/seeds/minutes confirms a single validation objective"),
])
def test_a_bad_champion_table_is_refused_in_one_line(tiny_dataset, tmp_path, overrides, expected):
    assert expected in study_refusal(tmp_path, **overrides)


def test_a_study_name_with_a_colon_is_refused(tmp_path):
    from tiny_study import write_study

    path = write_study(tmp_path, name="a:b")
    with pytest.raises(StudyError, match="holds a ':'"):
        studies.load(path)


def test_the_alias_follows_the_phase_within_a_study_and_values_across_studies():
    """registry's rule for moving `champion`, on the tags a registered version carries."""
    from types import SimpleNamespace

    def registered(study: str, value: float, confirmed: bool) -> SimpleNamespace:
        tags = {"study": study, "objective": "val_accuracy", "evaluation_set": "tiny", "objective_value": repr(value)}
        return SimpleNamespace(tags=tags | ({"selection": registry.CONFIRMED} if confirmed else {}))

    def offered(study: str, value: float, confirmed: bool) -> registry.Candidate:
        return registry.Candidate("tiny", study, 0, "run", "uri", "val_accuracy", "maximize", value, "tiny",
                                  confirmation_number=3 if confirmed else None)

    # Within a study: the phase's mean replaces a luckier single run, and a single run never displaces it.
    assert not registry._stays(registered("tiny", 0.99, confirmed=False), offered("tiny", 0.95, confirmed=True))
    assert registry._stays(registered("tiny", 0.95, confirmed=True), offered("tiny", 0.99, confirmed=False))
    assert not registry._stays(registered("tiny", 0.99, confirmed=True), offered("tiny", 0.95, confirmed=True))
    # Across studies the better value wins, as before.
    assert registry._stays(registered("tiny", 0.99, confirmed=True), offered("tiny-v2", 0.95, confirmed=True))
    assert not registry._stays(registered("tiny", 0.95, confirmed=True), offered("tiny-v2", 0.99, confirmed=True))
    measured_elsewhere = registered("tiny", 0.99, confirmed=True)
    measured_elsewhere.tags["evaluation_set"] = "another split"
    assert not registry._stays(measured_elsewhere, offered("tiny-v2", 0.5, confirmed=False))
