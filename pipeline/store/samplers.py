"""The study file's sampler and pruner: Optuna's samplers, Hyperband with a quorum per rung or the median rule,
both judging from half-way through training, and what a Hyperband rung judged (for pruning.py's explanations).

Reading a Hyperband rung needs Optuna's private API (`hyperband_bracket`, `hyperband_reduction_factor`,
`RUNG_PREFIX`); each use is wrapped once here (tests/store/test_samplers.py; the Optuna version is pinned in
tests/store/test_store.py). `versions.open_study` gives a study the sampler and pruner made here; search/pruning.py
explains a prune with the rungs read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from pipeline.spec.studies import StudySpec

MEDIAN_STARTUP_TRIALS = 2  # complete trials before the median rule prunes anything (here and in pruning.py)
RUNG_PREFIX = "completed_rung_"  # the system attribute Optuna's successive halving records a trial's rung value in


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded with `seed`."""
    if spec.sampler == "tpe":  # Optuna 5: multivariate + constant liar by default
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {spec.sampler!r}")  # checks.SAMPLERS keeps a study file to the ones above


def first_pruned_epoch(epochs: int) -> int:
    """The first epoch at which a pruner may stop a trial of `epochs` epochs: half-way through.

    Before it, the learning-rate schedule has not yet annealed (onecycle peaks at 30% of training) and one epoch's
    accuracy ranks close configurations at random: over the four 5-epoch champion-phase runs of cnn's two best
    configurations, epochs 1-3 ranked them against their final accuracy with Spearman -0.6, -0.3 and -0.2, and
    Hyperband's old first rung (epoch 1, keep a third) pruned a near-copy of cnn's best trial.
    """
    return max(1, math.ceil(epochs / 2))


class QuorumHyperband(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband, except that a rung prunes nothing until `quorum` trials of the bracket have reached it.

    Optuna's rung keeps the best len // reduction_factor of the trials that reached it (at least one), so its
    second and third arrivals go on only if they beat every one before them. In a study that opens with strong
    [[baseline]] trials that pruned every sampled trial: in a 30-minute cnn run a sampled configuration that
    ends at 99.56% elsewhere stood third at its rung, 0.46 points behind the baselines at epoch 3, and stopped.
    With a quorum of 2 x reduction factor a rung halves only once it holds two halves.
    """

    def __init__(self, min_resource: int, max_resource: int, reduction_factor: int):
        super().__init__(min_resource=min_resource, max_resource=max_resource, reduction_factor=reduction_factor)
        self.quorum = 2 * reduction_factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not super().prune(study, trial):  # Optuna's rule; it also records the trial's value at its rung
            return False
        trials = study.get_trials(deepcopy=False)
        judged = last_rung(self, study, trials, next(t for t in trials if t.number == trial.number))
        return judged is not None and len(judged.values) >= self.quorum


@dataclass(frozen=True)
class Rung:
    """The last Hyperband rung a trial was judged at: its number, the trial's bracket, and the values of the
    bracket's trials that reached it (the trial's own among them)."""

    number: int
    bracket: int
    values: list[float]


def last_rung(pruner: optuna.pruners.HyperbandPruner, study: optuna.Study, trials: list[optuna.trial.FrozenTrial],
              trial: optuna.trial.FrozenTrial) -> Rung | None:
    """The last rung `trial` (as stored now) was judged at; None when it reached none."""
    rungs = [int(k.removeprefix(RUNG_PREFIX)) for k in trial.system_attrs if k.startswith(RUNG_PREFIX)]
    if not rungs:
        return None
    key, bracket = f"{RUNG_PREFIX}{max(rungs)}", hyperband_bracket(pruner, study, trial)
    values = [t.system_attrs[key] for t in trials
              if key in t.system_attrs and hyperband_bracket(pruner, study, t) == bracket]
    return Rung(max(rungs), bracket, values)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Hyperband: successive halving (keep the better half, reduction factor 2) from half-way through training,
    each rung judging once 4 trials reached it (`QuorumHyperband`): a 5-epoch study has one rung, at epoch 3, and
    a 20-epoch one two brackets with rungs at 10. Halving rather than keeping a third because a study of
    minutes-long trials has few trials per rung. Median: the median rule from the same epoch, once two trials are
    complete."""
    first = first_pruned_epoch(spec.epochs)
    if spec.planned:  # its rungs are complete short runs (search/plan.py), ranked when they end: none stops part-way
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":
        return QuorumHyperband(min_resource=first, max_resource=spec.epochs, reduction_factor=2)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=first)
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {spec.pruner!r}")  # checks.PRUNERS keeps a study file to the ones above


def hyperband_bracket(pruner: optuna.pruners.HyperbandPruner, study: optuna.Study,
                      trial: optuna.trial.FrozenTrial) -> int:
    """The Hyperband bracket a trial belongs to (pruning.py explains a prune with the bracket's other trials)."""
    return pruner._get_bracket_id(study, trial)


def hyperband_reduction_factor(pruner: optuna.pruners.HyperbandPruner) -> int:
    return pruner._reduction_factor
