"""Why a trial was pruned, and the median rule for multi-objective studies.

Every pruned trial records a `PruneReason`: the epoch, its value there, the value it was compared with and the
rule, shown in its trial line, its MLflow tags and the study report.

- A single-objective study prunes with Optuna's pruner (`hyperband`, `median`); `explain` reads back what that
  pruner compared: the median of the complete trials at that epoch, or the value a Hyperband rung promotes.
- A multi-objective study cannot use Optuna's pruners (`Trial.report` takes one objective). Its trials are pruned
  by `median_rule` on the study's validation objective only (val_accuracy, else val_loss): the rule of Optuna's
  MedianPruner, applied to the per-epoch histories every trial records.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import store
from pipeline.spec.tables import PRUNED_ON
from pipeline.store import samplers


@dataclass(frozen=True)
class PruneReason:
    epoch: int
    metric: str
    value: float  # the trial's value that was judged (its best so far for the median rule)
    compared_with: float  # what it had to reach
    rule: str  # e.g. "median of 4 complete trials at epoch 2"

    def line(self) -> str:
        return f"epoch {self.epoch}: {self.metric} {self.value:.4f} vs {self.compared_with:.4f} ({self.rule})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, recorded: dict[str, Any] | None) -> PruneReason | None:
        return cls(**recorded) if recorded else None


def pruned_metric(metrics: Sequence[str]) -> str | None:
    """The objective a study prunes on: its only one, or (several) val_accuracy, else val_loss."""
    if len(metrics) == 1:
        return metrics[0]
    return next((m for m in PRUNED_ON if m in metrics), None)


def _best_so_far(values: Sequence[float], maximize: bool) -> float:
    return max(values) if maximize else min(values)


def median_rule(values_at_epoch: Sequence[float], own: Sequence[float], epoch: int, metric: str, maximize: bool,
                complete_trials: int) -> PruneReason | None:
    """The median rule: prune when the trial's best value so far (`own`, epochs 1..epoch) is worse than the median
    of the complete trials' values at this epoch. None: it goes on."""
    if complete_trials < samplers.MEDIAN_STARTUP_TRIALS or not values_at_epoch or not own:
        return None
    best, median = _best_so_far(own, maximize), statistics.median(values_at_epoch)
    worse = best < median if maximize else best > median
    if not (worse or math.isnan(best)):
        return None
    rule = f"median of {len(values_at_epoch)} complete trials at epoch {epoch}"
    return PruneReason(epoch, metric, best, median, rule)


def median_from_histories(study: optuna.Study, history: Sequence[dict[str, float]], metric: str,
                          maximize: bool, first_epoch: int) -> PruneReason | None:
    """The median rule on recorded histories (multi-objective studies): the trial's `history` so far against the
    complete trials' recorded histories at the same epoch, from `first_epoch` on (samplers.first_pruned_epoch)."""
    epoch = len(history)
    if epoch < first_epoch:
        return None
    complete = store.records(study, (TrialState.COMPLETE,))
    at_epoch = [r.history[epoch - 1][metric] for r in complete if len(r.history) >= epoch]
    return median_rule(at_epoch, [h[metric] for h in history], epoch, metric, maximize, len(complete))


def explain(study: optuna.Study, trial: optuna.Trial, epoch: int, metric: str) -> PruneReason | None:
    """What Optuna's pruner compared when it pruned `trial` at `epoch` (single-objective studies)."""
    pruner = study.pruner
    trials = study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == trial.number)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    if isinstance(pruner, optuna.pruners.HyperbandPruner):
        return _rung(pruner, study, trials, frozen, epoch, metric, maximize)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    at_epoch = [t.intermediate_values[epoch] for t in complete if epoch in t.intermediate_values]
    own = [v for step, v in frozen.intermediate_values.items() if step <= epoch]
    return median_rule(at_epoch, own, epoch, metric, maximize, len(complete))


def _rung(pruner: optuna.pruners.HyperbandPruner, study: optuna.Study, trials: list[FrozenTrial], frozen: FrozenTrial,
          epoch: int, metric: str, maximize: bool) -> PruneReason | None:
    """Successive halving within the trial's Hyperband bracket: at each rung a trial goes on only if its value is
    among the best 1/reduction_factor of the bracket's trials that reached that rung."""
    rung = samplers.last_rung(pruner, study, trials, frozen)  # the rung it failed at: the last it was judged at
    if rung is None:
        return None
    competing = sorted(rung.values)
    factor = samplers.hyperband_reduction_factor(pruner)
    kept = max(len(competing) // factor, 1)
    needed = competing[-kept] if maximize else competing[kept - 1]
    return PruneReason(epoch, metric, frozen.system_attrs[f"{samplers.RUNG_PREFIX}{rung.number}"], needed,
                       f"Hyperband bracket {rung.bracket} rung {rung.number}: the best {kept} of {len(competing)} "
                       "trials there go on")
