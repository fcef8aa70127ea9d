"""A multi-objective study's Pareto front, and the champion its `[champion]` picks from it.

The front holds the complete, feasible trials (within every [constraints] bound) that no other such trial
dominates: at least as good on every objective and better on one. Which of them is the champion is the study
file's decision (tables.ParetoTable): the best by `prefer` among those within its `limits` and within `within`
of the front's best. Without a [champion] the front's most accurate trial (its best on the first objective) is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.spec.studies import StudySpec
from pipeline.spec.tables import METRICS, PRUNED_ON


def _signs(directions: Sequence[str]) -> list[float]:
    """Multipliers that make every objective "lower is better"."""
    return [-1.0 if d == "maximize" else 1.0 for d in directions]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    signs = _signs(directions)
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def front(records: Sequence[store.TrialRecord], directions: Sequence[str]) -> list[store.TrialRecord]:
    """The non-dominated complete feasible trials, in trial order."""
    done = [r for r in records if r.state == "COMPLETE" and r.values and r.feasible]
    return [r for r in done if not any(dominates(_values(o), _values(r), directions) for o in done if o is not r)]


def joins_front(study: optuna.Study, values: Sequence[float]) -> bool:
    """Would a feasible trial with these values be on the front of the study's complete trials so far?"""
    directions = [d.name.lower() for d in study.directions]
    done = [r for r in store.records(study, (TrialState.COMPLETE,)) if r.feasible]
    return not any(dominates(_values(r), values, directions) for r in done)


def _values(record: store.TrialRecord) -> list[float]:
    """A complete trial's objective values (a complete trial always has them)."""
    assert record.values is not None, f"trial {record.number} is complete but has no values"
    return record.values


def _measured(record: store.TrialRecord, metric: str) -> float:
    """A metric an eligible trial recorded (trials that did not record the rule's metrics are left out first)."""
    value = metric_of(record, metric)
    assert value is not None, f"trial {record.number} did not record {metric}"
    return value


def metric_of(record: store.TrialRecord, metric: str) -> float | None:
    """What a trial recorded of a metric: its best epoch's validation figures, its size, its latency."""
    if metric in PRUNED_ON:  # the per-epoch ones
        if record.best_epoch is None or not record.history:
            return None
        return record.history[record.best_epoch - 1][metric]
    return {"parameter_count": record.parameter_count, "flops_per_image": record.flops_per_image,
            "latency_ms": record.latency_ms}[metric]


@dataclass
class Choice:
    trial: store.TrialRecord | None
    reason: str  # one line: the rule and why this trial
    front: list[store.TrialRecord]
    eligible: list[store.TrialRecord]


def choose(spec: StudySpec, records: list[store.TrialRecord]) -> Choice:
    """The champion of a multi-objective study among `records`: the [champion] rule applied to their front."""
    on_front = front(records, spec.directions)
    rule = spec.pareto_choice
    prefer = rule.prefer if rule is not None else spec.metrics[0]
    eligible = [r for r in on_front if all(metric_of(r, m) is not None for m in _read(spec))]
    unmeasured = len(on_front) - len(eligible)  # e.g. trials from before the rule named latency_ms
    conditions = []
    if rule is not None:
        for metric, bound in rule.limits.items():
            eligible = [r for r in eligible if bound.excess(_measured(r, metric)) <= 0]
            conditions.append(f"{metric} {bound.describe()}")
        for metric, distance in rule.within.items():
            values = [v for v in (metric_of(r, metric) for r in on_front) if v is not None]
            if not values:
                continue
            maximize = METRICS[metric] == "maximize"
            best = max(values) if maximize else min(values)
            eligible = [r for r in eligible if abs(_measured(r, metric) - best) <= distance + 1e-12]
            conditions.append(f"{metric} within {distance:g} of the front's best {best:.4g}")
    where = f" among those with {' and '.join(conditions)}" if conditions else ""
    reading = "highest" if METRICS[prefer] == "maximize" else "lowest"
    said = f"the Pareto front's {len(on_front)} trials: {reading} {prefer}{where}"
    if unmeasured:
        said += f" ({unmeasured} of them left out: they did not record {', '.join(sorted(_read(spec)))})"
    if not eligible:
        return Choice(None, f"{said}: none qualifies; loosen [champion] or search more", on_front, [])
    sign = -1.0 if METRICS[prefer] == "maximize" else 1.0
    # Ties on the preferred metric go to the better first objective, then to the earlier trial.
    first_sign = _signs(spec.directions)[0]
    chosen = min(eligible, key=lambda r: (sign * _measured(r, prefer), first_sign * r.first_value, r.number))
    return Choice(chosen, f"{said} ({len(eligible)} qualify): trial {chosen.number}", on_front, eligible)


def decide(spec: StudySpec, study: optuna.Study) -> Choice:
    """The trial the study offers as its champion, and how: its best feasible trial (one objective; no reason
    given), or the [champion] rule's pick from the front (several)."""
    if len(spec.objectives) == 1:
        return Choice(store.leading_best(study), "", [], [])
    return choose(spec, store.records(study, (TrialState.COMPLETE,)))


def _read(spec: StudySpec) -> set[str]:
    rule = spec.pareto_choice
    return {rule.prefer, *rule.within, *rule.limits} if rule is not None else {spec.metrics[0]}
