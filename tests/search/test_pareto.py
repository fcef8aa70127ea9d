"""Multi-objective studies end to end: latency_ms, [constraints], the Pareto front, the [champion] rule that picks
from it, pruning on the accuracy objective, and export-best TRIAL=n; plus the recorded reason of every prune."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import PARETO_CHANNELS, cnn_parameter_count, pareto_study, study_refusal

from pipeline.search import pareto, pruning
from pipeline.spec import studies

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

def test_a_multi_objective_study_measures_latency_keeps_constraints_and_picks_from_the_front(study_env, capsys):
    study_env.write_study(**pareto_study())
    assert study_env.run("search") == 0
    out = capsys.readouterr().out
    spec = studies.load(study_env.studies_dir / "tiny.toml")
    records = study_env.records()
    limit = cnn_parameter_count(PARETO_CHANNELS[1])

    # The largest model misses the size constraint: pruned before any training, its excess given to Optuna.
    big = [r for r in records if r.params and r.params["cnn_channels"] == PARETO_CHANNELS[2]]
    assert big and all(r.state == "PRUNED" and r.fail_reason == "infeasible" and not r.history for r in big)
    assert all(r.constraints["parameter_count"] == r.parameter_count - limit > 0 for r in big)
    assert "infeasible" in out and f"is not <= {limit}" in out

    complete = [r for r in records if r.state == "COMPLETE"]
    assert len(complete) >= 2
    for r in complete:
        # The third objective is the measured latency, on the recorded thread count; constraints met.
        assert r.latency_ms > 0 and r.latency_threads == 1 and r.values[2] == r.latency_ms
        assert r.values[1] == r.parameter_count and r.constraints["parameter_count"] <= 0 and r.feasible

    front = pareto.front(records, spec.directions)
    assert front  # its size depends on measured latencies: a small model that is also faster may dominate
    for r in complete:  # the front: exactly the complete trials no other complete trial dominates
        beaten = any(all((o.values[0] >= r.values[0], o.values[1] <= r.values[1], o.values[2] <= r.values[2]))
                     and o.values != r.values for o in complete)
        assert (r in front) == (not beaten)

    choice = pareto.decide(spec, study_env.load())
    best_accuracy = max(r.values[0] for r in front)
    eligible = [r for r in front if r.values[0] >= best_accuracy - 0.2]
    assert choice.trial is not None and choice.trial.parameter_count == min(r.parameter_count for r in eligible)
    assert f"champion: {choice.reason}" in out and "lowest parameter_count" in choice.reason

    # export-best exports the rule's choice; TRIAL=n any complete trial, beside it.
    assert study_env.run("export-best") == 0
    config = json.loads((study_env.exports / "tiny" / "config.json").read_text())
    assert config["trial_number"] == choice.trial.number
    other = next(r for r in complete if r.number != choice.trial.number)
    assert study_env.run("export-best", "--trial", str(other.number)) == 0
    exported = study_env.exports / f"tiny-trial-{other.number}"
    assert json.loads((exported / "config.json").read_text())["trial_number"] == other.number
    assert "Chosen by the user" in (exported / "model_card.md").read_text()
    assert json.loads((study_env.exports / "tiny" / "config.json").read_text())["trial_number"] == choice.trial.number


def test_export_best_of_a_trial_that_is_not_complete_says_which_are(study_env, capsys):
    study_env.write_study(**pareto_study())
    assert study_env.run("search") == 0
    pruned = next(r.number for r in study_env.records() if r.state == "PRUNED")
    assert study_env.run("export-best", "--trial", str(pruned)) == 2
    err = capsys.readouterr().err
    assert f"TRIAL={pruned}" in err and "complete trials:" in err
    assert not (study_env.exports / f"tiny-trial-{pruned}").exists()


def test_a_multi_objective_study_prunes_on_its_accuracy_by_the_median_rule(study_env, capsys):
    """Two good baselines complete, then one that cannot learn (lr 1e-6) falls below their median at epoch 1."""
    study_env.write_study(trials=3, sampler="nsga2", pruner="median", epochs=2,
                          objectives=[{"metric": "val_accuracy"}, {"metric": "flops_per_image"}],
                          space={"lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}},
                          baseline=[{"lr": 3e-3, "dropout": 0.1}, {"lr": 5e-3, "dropout": 0.0},
                                    {"lr": 1e-6, "dropout": 0.0}])
    assert study_env.run("search") == 0
    records = study_env.records()
    assert [r.state for r in records] == ["COMPLETE", "COMPLETE", "PRUNED"]
    reason = pruning.PruneReason.from_dict(records[2].prune_reason)
    median = statistics.median(r.history[0]["val_accuracy"] for r in records[:2])
    assert (reason.epoch, reason.metric) == (1, "val_accuracy")
    assert reason.value == records[2].history[0]["val_accuracy"] < median == reason.compared_with
    assert "pruned: epoch 1: val_accuracy" in capsys.readouterr().out


def test_a_single_objective_prune_records_what_the_pruner_compared(study_env, mlflow_store, capsys):
    study_env.write_study(trials=3, pruner="median", epochs=2,
                          space={"lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}},
                          baseline=[{"lr": 3e-3, "dropout": 0.1}, {"lr": 5e-3, "dropout": 0.0},
                                    {"lr": 1e-6, "dropout": 0.0}])
    assert study_env.run("search") == 0
    records = study_env.records()
    assert records[2].state == "PRUNED" and records[2].fail_reason == "pruned"
    # Its size, recorded before training; its FLOPs are recorded then only for a FLOPs constraint (else with the
    # trained result, which a pruned trial never has).
    assert records[2].parameter_count > 0 and records[2].flops_per_image is None
    reason = pruning.PruneReason.from_dict(records[2].prune_reason)
    assert reason.compared_with == statistics.median(r.history[0]["val_accuracy"] for r in records[:2])
    assert reason.rule == "median of 2 complete trials at epoch 1"
    assert reason.line() in capsys.readouterr().out
    from conftest import mlflow_runs

    run = next(r for r in mlflow_runs(mlflow_store) if r.data.tags.get("trial_number") == "2")
    assert float(run.data.tags["prune_compared_with"]) == reason.compared_with
    assert run.data.tags["prune_epoch"] == "1" and run.data.tags["fail_detail"] == reason.line()


def test_the_median_rule_waits_for_two_complete_trials_and_prunes_only_the_worse():
    assert pruning.median_rule([0.9], [0.1], 1, "val_accuracy", True, complete_trials=1) is None
    assert pruning.median_rule([0.8, 0.9], [0.86], 1, "val_accuracy", True, complete_trials=2) is None
    worse = pruning.median_rule([0.8, 0.9], [0.84], 1, "val_accuracy", True, complete_trials=2)
    assert (worse.value, worse.compared_with) == (0.84, pytest.approx(0.85))
    assert pruning.median_rule([0.3, 0.5], [0.45, 0.35], 2, "val_loss", False, complete_trials=2) is None


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"objectives": [{"metric": "val_accuracy"}, {"metric": "latency_ms"}], "sampler": "nsga2",
      "pruner": "hyperband"}, "pruner: Hyperband's brackets need"),
    ({"objectives": [{"metric": "parameter_count"}, {"metric": "latency_ms"}], "sampler": "nsga2"},
     "pruner: prunes on a validation objective"),
    ({"constraints": {"speed": {"max": 2}}}, "constraints.speed: is not a metric"),
    ({"constraints": {"latency_ms": {}}}, "constraints.latency_ms: sets no bound"),
    ({"constraints": {"latency_ms": {"min": 3, "max": 2}}}, "min = 3 is above max = 2"),
    ({"champion": {"prefer": "latency_ms"}}, "champion.prefer: picks from a Pareto front"),
    ({"objectives": [{"metric": "val_accuracy"}, {"metric": "latency_ms"}], "sampler": "nsga2", "pruner": "none",
      "champion": {"seeds": 3}}, "champion: with top_k/seeds/minutes confirms a single validation objective"),
    ({"objectives": [{"metric": "val_accuracy"}, {"metric": "latency_ms"}], "sampler": "nsga2", "pruner": "none",
      "champion": {"prefer": "val_accuracy", "within": {"latency_ms": -1}}}, "a distance from the best must be >= 0"),
    ({"objectives": [{"metric": "val_accuracy"}, {"metric": "val_accuracy"}], "sampler": "nsga2", "pruner": "none"},
     "names a metric twice"),
])
def test_a_bad_multi_objective_setting_is_refused_in_one_line(tiny_dataset, tmp_path, overrides, expected):
    assert expected in study_refusal(tmp_path, **overrides)


def test_constraints_change_the_fingerprint_only_when_declared(tiny_dataset, tmp_path):
    """A study file made before constraints existed keeps its fingerprint (its store resumes without FRESH=1)."""
    from tiny_study import write_study

    plain = studies.load(write_study(tmp_path / "a"))
    assert "constraints" not in plain.search_definition()
    bounded = studies.load(write_study(tmp_path / "b", constraints={"latency_ms": {"max": 2.0}}))
    assert bounded.fingerprint() != plain.fingerprint() and bounded.measures_latency and not plain.measures_latency


def test_a_single_objective_study_never_crowns_an_infeasible_trial(study_env, capsys):
    """Every trial misses an impossible latency bound: each completes, none is feasible, so there is no champion."""
    study_env.write_study(trials=2, constraints={"latency_ms": {"max": 1e-6}})
    assert study_env.run("search") == 0
    records = study_env.records()
    assert [r.state for r in records] == ["COMPLETE", "COMPLETE"]
    assert all(r.constraints["latency_ms"] == r.latency_ms - 1e-6 > 0 and not r.feasible for r in records)
    capsys.readouterr()
    assert study_env.run("export-best") == 2
    assert "no complete trial to export" in capsys.readouterr().err
    page = (study_env.reports / "tiny.html").read_text()  # the report greys both out and names no champion
    assert page.count('<tr class="infeasible"><td class="num">') == 2 and "No champion yet" in page


def test_the_rule_applies_limits_then_within_then_prefer_and_names_trials_it_cannot_judge(tiny_dataset, tmp_path):
    """pareto.choose on hand-made records (accuracy up, latency down): every one is on the front."""
    from datetime import datetime

    from tiny_study import write_study

    from pipeline import store

    def trial(number: int, accuracy: float, latency: float | None, count: int) -> store.TrialRecord:
        return store.TrialRecord(number, "COMPLETE", [accuracy, float(count)], {}, 1.0, datetime.now(), best_epoch=1,
                                 history=[{"val_accuracy": accuracy}], parameter_count=count, latency_ms=latency)

    records = [trial(0, 0.99, 2.0, 900), trial(1, 0.985, 1.0, 500), trial(2, 0.98, 0.5, 300),
               trial(3, 0.97, None, 100)]  # trial 3: from before latency_ms was measured

    def rule(**champion) -> pareto.Choice:
        spec = studies.load(write_study(tmp_path / str(len(list(tmp_path.iterdir()))), sampler="nsga2",
                                        pruner="none", champion=champion, objectives=[
                                            {"metric": "val_accuracy"}, {"metric": "parameter_count"}]))
        return pareto.choose(spec, records)

    assert [r.number for r in pareto.front(records, ["maximize", "minimize"])] == [0, 1, 2, 3]
    fastest = rule(prefer="latency_ms")
    assert fastest.trial.number == 2 and "1 of them left out: they did not record latency_ms" in fastest.reason
    assert rule(prefer="val_accuracy", limits={"latency_ms": {"max": 1.5}}).trial.number == 1
    assert rule(prefer="parameter_count", within={"val_accuracy": 0.006}).trial.number == 1
    assert rule(prefer="parameter_count").trial.number == 3  # nothing to measure it against: it qualifies
    none = rule(prefer="val_accuracy", limits={"latency_ms": {"max": 0.1}})
    assert none.trial is None and "none qualifies" in none.reason


def test_a_flops_bound_is_checked_before_training(study_env):
    study_env.write_study(trials=2, constraints={"flops_per_image": {"max": 10}})
    assert study_env.run("search") == 0
    records = study_env.records()
    assert all(r.state == "PRUNED" and r.fail_reason == "infeasible" and not r.history for r in records)
    assert all(r.constraints == {"flops_per_image": r.flops_per_image - 10} and r.flops_per_image > 10
               for r in records)
