"""A study's search space as a trial samples it: the order parameters are drawn in, a trial's full params
(fixed values, sampled ones, the model and its epochs) and a baseline in the form Optuna queues it. The trial is
Optuna's (or a FixedTrial): nothing here imports Optuna."""

from __future__ import annotations

import json
from typing import Any

from pipeline.spec.studies import StudySpec
from pipeline.spec.tables import CategoricalParam, FloatParam, IntParam, active


def sampling_order(spec: StudySpec) -> list[str]:
    """Unconditional parameters first, then conditional ones, each group in file order."""
    plain = [k for k, p in spec.space.items() if not p.when]
    return plain + [k for k, p in spec.space.items() if p.when]


def suggest(spec: StudySpec, trial: Any) -> dict[str, Any]:
    """Sample the search space through an Optuna trial (or FixedTrial) into a full params dict."""
    chosen: dict[str, Any] = {}
    for key in sampling_order(spec):
        param = spec.space[key]
        if not active(param, chosen):
            continue
        if isinstance(param, FloatParam):
            chosen[key] = trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, IntParam):
            chosen[key] = trial.suggest_int(key, param.low, param.high, log=param.log, step=param.step)
        else:
            # Optuna's categorical choices must be scalars: list choices (channel lists) go by index.
            if any(isinstance(c, list) for c in param.choices):
                labels = [json.dumps(c) for c in param.choices]
                chosen[key] = json.loads(trial.suggest_categorical(key, labels))
            else:
                chosen[key] = trial.suggest_categorical(key, param.choices)
    return trial_params(spec, chosen)


def trial_params(spec: StudySpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """Fixed values, then sampled ones, plus the study-level model and epoch budget."""
    return {"model": spec.model, "epochs": spec.epochs, **spec.fixed, **sampled}


def enqueue_form(spec: StudySpec, baseline: dict[str, Any]) -> dict[str, Any]:
    """A baseline as Optuna's enqueue_trial wants it (list choices as their JSON labels)."""
    form = {}
    for key, value in baseline.items():
        param = spec.space[key]
        is_list_choice = isinstance(param, CategoricalParam) and any(isinstance(c, list) for c in param.choices)
        form[key] = json.dumps(value) if is_list_choice else value
    return form
