"""The MLflow model registry: the study's best model registered as `<study file name>`, the `champion` alias
on the best of them, and reading the champion back for export.

The alias moves only to a better model measured the same way (same objective, same evaluation set:
dataset and validation split); a champion measured another way is replaced by the newer study's best.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipeline.hparams import PARAM_SPECS

CHAMPION = "champion"
ALIAS_ATTEMPTS = 3  # searches on several hosts may move the champion alias at the same moment
PARENT_TAG = "mlflow.parentRunId"


def param_value(value: Any) -> str:
    """One stable text form per value, so the UI's compare view lines trials up."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def _is_better(value: float, than: float, direction: str) -> bool:
    return value > than if direction == "maximize" else value < than


@dataclass(frozen=True)
class Candidate:
    """A trial's logged model offered for the champion."""

    model_name: str  # the registered model: the study file's name, shared by its versions
    study_name: str
    trial_number: int
    run_id: str
    model_uri: str
    metric: str
    direction: str
    value: float
    evaluation_set: str


def register_champion(client: MlflowClient, candidate: Candidate) -> str:
    """Register the candidate's model; move `champion` to it if it is better. Returns one line saying what happened."""
    c = candidate
    existing = client.search_model_versions(f"name = '{c.model_name}' and run_id = '{c.run_id}'")
    if existing:
        version = existing[0]
    else:
        tags = {"study": c.study_name, "trial_number": str(c.trial_number), "objective": c.metric,
                "direction": c.direction, "objective_value": repr(c.value), "evaluation_set": c.evaluation_set}
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints its own two lines; ours says more
            version = mlflow.register_model(c.model_uri, c.model_name, tags=tags)
    for attempt in range(ALIAS_ATTEMPTS):
        try:
            current = client.get_model_version_by_alias(c.model_name, CHAMPION)
        except MlflowException:
            current = None
        if current is not None and current.version == version.version:
            return (f"model {c.model_name!r} version {version.version} (trial {c.trial_number}) "
                    f"is already the {CHAMPION}")
        comparable = (current is not None and current.tags.get("objective") == c.metric
                      and current.tags.get("evaluation_set") == c.evaluation_set)
        if comparable and not _is_better(c.value, float(current.tags["objective_value"]), c.direction):
            return (f"model {c.model_name!r} version {version.version} (trial {c.trial_number}, {c.value:.4f}) "
                    f"registered; {CHAMPION} stays on version {current.version} "
                    f"({float(current.tags['objective_value']):.4f})")
        try:
            client.set_registered_model_alias(c.model_name, CHAMPION, version.version)
        except MlflowException:
            # Another search (another host) set the alias at the same moment: look at the champion again.
            if attempt == ALIAS_ATTEMPTS - 1:
                raise
            time.sleep(0.5 + attempt)
            continue
        return (f"model {c.model_name!r} version {version.version} (trial {c.trial_number}, {c.value:.4f}) "
                f"is the {CHAMPION}")
    raise AssertionError("unreachable")


@dataclass
class ChampionVersion:
    """The registered model version behind the `champion` alias, and where it came from."""

    model_name: str
    version: str
    study_name: str  # the Optuna study (version) that produced it, e.g. cnn-v2
    trial_number: int
    run_id: str
    parent_run_id: str | None
    model_uri: str
    run_params: dict[str, str]  # as logged by the trial's run: what the weights were trained with

    def matches(self, params: dict[str, Any], seed: int) -> bool:
        """Were these weights trained by a trial with these (resolved) params and seed?

        A parameter the run did not log did not exist when it ran (e.g. `augment_policy`), so it trained
        as that parameter's default does: it matches when the value is the default.
        """
        logged = {k: param_value(v) for k, v in params.items()} | {"trial_seed": str(seed)}
        for key, value in logged.items():
            recorded = self.run_params.get(key)
            if recorded is None and key in PARAM_SPECS:
                recorded = param_value(PARAM_SPECS[key].default)
            if recorded != value:
                return False
        return True


def champion(client: MlflowClient, model_name: str) -> ChampionVersion | None:
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:  # no such registered model, or no alias yet
        return None
    run = client.get_run(version.run_id)
    return ChampionVersion(model_name, version.version, version.tags["study"], int(version.tags["trial_number"]),
                           version.run_id, run.data.tags.get(PARENT_TAG), f"models:/{model_name}/{version.version}",
                           dict(run.data.params))


def load_state_dict(model_uri: str) -> dict[str, Any]:
    """The weights of a logged model (a torch.export program) under the original module's names."""
    return mlflow.pytorch.load_model(model_uri).state_dict()


def log_test_metrics(client: MlflowClient, run_ids: list[str], metrics: dict[str, float]) -> None:
    """Record an export's test-split figures on the champion's run and the study's parent run."""
    timestamp = int(time.time() * 1000)
    for run_id in run_ids:
        client.log_batch(run_id, metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()])
