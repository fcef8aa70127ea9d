"""store/samplers.py: each sampler and pruner name a study file may give makes its own, the pruners judge from
half-way through training, and a Hyperband rung waits for its quorum."""

from __future__ import annotations

import types

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.spec import checks
from pipeline.store import samplers

SAMPLER_TYPES = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                 "gp": optuna.samplers.GPSampler, "cmaes": optuna.samplers.CmaEsSampler,
                 "nsga2": optuna.samplers.NSGAIISampler}
PRUNER_TYPES = {"hyperband": samplers.QuorumHyperband, "median": optuna.pruners.MedianPruner,
                "none": optuna.pruners.NopPruner}


@pytest.mark.parametrize("name", checks.SAMPLERS)
def test_each_sampler_a_study_file_may_name_makes_its_own(name):
    made = samplers.make_sampler(types.SimpleNamespace(sampler=name), 3)
    assert type(made) is SAMPLER_TYPES[name]


@pytest.mark.parametrize("name", checks.PRUNERS)
def test_each_pruner_a_study_file_may_name_makes_its_own(name):
    made = samplers.make_pruner(types.SimpleNamespace(pruner=name, epochs=5, planned=False))
    assert type(made) is PRUNER_TYPES[name]


def test_an_unknown_sampler_or_pruner_is_refused_not_replaced():
    with pytest.raises(ValueError, match="'nsga3'"):
        samplers.make_sampler(types.SimpleNamespace(sampler="nsga3"), 3)
    with pytest.raises(ValueError, match="'asha'"):
        samplers.make_pruner(types.SimpleNamespace(pruner="asha", epochs=5, planned=False))


@pytest.mark.parametrize(("epochs", "first"), [(1, 1), (2, 1), (3, 2), (5, 3), (8, 4), (20, 10)])
def test_pruners_judge_a_trial_from_half_way_through_its_epochs(epochs, first):
    assert samplers.first_pruned_epoch(epochs) == first


@pytest.mark.parametrize("pruner", ["hyperband", "median"])
def test_a_poor_trial_is_not_pruned_before_half_way_and_is_there(pruner):
    """The shipped set-up on a 5-epoch study: four trials at 0.99 every epoch, then one at 0.5 every epoch. Its
    noisy early epochs are not judged; at epoch 3 it is below the rung's better half (the median) and stops."""
    spec = types.SimpleNamespace(pruner=pruner, epochs=5, planned=False)
    study = optuna.create_study(direction="maximize", pruner=samplers.make_pruner(spec))

    def run(value: float) -> int | None:
        """The epoch it was pruned at, None when it completed."""
        trial = study.ask()
        for epoch in range(1, 6):
            trial.report(value, epoch)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                return epoch
        study.tell(trial, value)
        return None

    assert [run(0.99) for _ in range(4)] == [None] * 4
    assert run(0.5) == 3


def test_a_hyperband_rung_prunes_nothing_until_four_trials_reached_it():
    """Optuna's rung keeps the best len // 2 (at least one), so the 2nd and 3rd trials to reach it go on only if
    they beat every earlier one: after two strong (baseline) trials that would prune every sampled one."""
    spec = types.SimpleNamespace(pruner="hyperband", epochs=5, planned=False)
    study = optuna.create_study(direction="maximize", pruner=samplers.make_pruner(spec))
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner) and study.pruner.quorum == 4

    def reach_rung(value: float) -> tuple[bool, int]:
        trial = study.ask()
        for epoch in (1, 2, 3):
            trial.report(value, epoch)
        pruned = trial.should_prune()
        study.tell(trial, state=TrialState.PRUNED) if pruned else study.tell(trial, value)
        trials = study.get_trials(deepcopy=False)
        return pruned, len(samplers.last_rung(study.pruner, study, trials, trials[trial.number]).values)

    assert [reach_rung(v) for v in (0.995, 0.994, 0.990)] == [(False, 1), (False, 2), (False, 3)]
    assert reach_rung(0.980) == (True, 4)  # the rung is 4 strong: the worst half stops
    assert reach_rung(0.999) == (False, 5)
