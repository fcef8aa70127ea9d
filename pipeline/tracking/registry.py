"""The MLflow model registry: the study's best model registered as `<study file name>`, the `champion` alias
on the best of them, and reading the champion back for export.

The alias moves only to a better model measured the same way (same objective, same evaluation set:
dataset and validation split); a champion measured another way is replaced by the newer study's best.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

from pipeline.spec.errors import BadInput
from pipeline.spec.hparams import PARAM_SPECS
from pipeline.training.models import read_state_dict

CHAMPION = "champion"
WEIGHTS_FILE = "weights.pt"  # a logged model's plain state dict, beside its program (MLflow's extra_files/)
WEIGHTS_PATH = f"extra_files/{WEIGHTS_FILE}"
REGISTER_FIX = ("register a model logged by `make search` as the champion, or pass --no-tracking to retrain the "
                "study's best trial from its record")
ALIAS_ATTEMPTS = 3  # searches on several hosts may move the champion alias at the same moment
PARENT_TAG = "mlflow.parentRunId"
CONFIRMED = "mean_over_seeds"  # `selection` tag of a champion chosen by the champion phase
PARETO = "pareto_rule"  # `selection` tag of a multi-objective study's champion, picked from the front by its rule
CONFIRMATION_TAG = "confirmation_number"


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
    value: float  # the trial's value; a confirmed configuration's mean over its seeds
    evaluation_set: str
    confirmation_number: int | None = None  # the champion phase's run whose model this is (champion.py)
    repeat: int = 0
    seeds: int = 1  # runs behind `value`
    pareto_rule: str | None = None  # a multi-objective study's choice from its Pareto front (pareto.py)

    @property
    def confirmed(self) -> bool:
        return self.confirmation_number is not None

    @property
    def decided(self) -> bool:
        """Chosen by a rule of its study (over seeds, or from the front) rather than as its single best value."""
        return self.confirmed or self.pareto_rule is not None

    def describe(self) -> str:
        if not self.confirmed:
            return f"trial {self.trial_number}, {self.value:.4f}"
        return f"trial {self.trial_number} repeat {self.repeat}, mean {self.value:.4f} over {self.seeds} seeds"


def _stays(current: Any, c: Candidate) -> bool:
    """Does the current champion stay rather than give way to candidate `c`?

    A champion measured another way (objective, evaluation set) gives way. Within one study, a choice by the study's
    rule is final: the champion phase's (it decided on more evidence than any single run) or a multi-objective
    study's pick from its Pareto front (it decided on every objective, not the first one alone); a single run does
    not displace it.
    Otherwise the better value wins: a champion-phase mean is compared with another study's mean.
    """
    comparable = current.tags.get("objective") == c.metric and current.tags.get("evaluation_set") == c.evaluation_set
    if not comparable:
        return False
    current_decided = current.tags.get("selection") in (CONFIRMED, PARETO)
    if current.tags.get("study") == c.study_name and (current_decided or c.decided):
        return not c.decided
    return not _is_better(c.value, float(current.tags["objective_value"]), c.direction)


def register_champion(client: MlflowClient, candidate: Candidate) -> str:
    """Register the candidate's model; move `champion` to it if it is better. Returns one line saying what happened."""
    c = candidate
    existing = client.search_model_versions(f"name = '{c.model_name}' and run_id = '{c.run_id}'")
    if existing:
        version = existing[0]
    else:
        tags = {"study": c.study_name, "trial_number": str(c.trial_number), "objective": c.metric,
                "direction": c.direction, "objective_value": repr(c.value), "evaluation_set": c.evaluation_set}
        if c.confirmed:
            tags |= {"selection": CONFIRMED, CONFIRMATION_TAG: str(c.confirmation_number), "repeat": str(c.repeat),
                     "seeds": str(c.seeds)}
        if c.pareto_rule is not None:
            tags |= {"selection": PARETO, "pareto_rule": c.pareto_rule[:5000]}
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints its own two lines; ours says more
            version = mlflow.register_model(c.model_uri, c.model_name, tags=tags)
    for attempt in range(ALIAS_ATTEMPTS):
        try:
            current = client.get_model_version_by_alias(c.model_name, CHAMPION)
        except MlflowException:
            current = None
        if current is not None and current.version == version.version:
            return (f"model {c.model_name!r} version {version.version} ({c.describe()}) "
                    f"is already the {CHAMPION}")
        if current is not None and _stays(current, c):
            return (f"model {c.model_name!r} version {version.version} ({c.describe()}) "
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
        return f"model {c.model_name!r} version {version.version} ({c.describe()}) is the {CHAMPION}"
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
    confirmation_number: int | None = None  # the champion phase's run that trained it (champion.py), if any

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
    if version.run_id is None:  # registered from files, not from a run: no trial behind it
        raise BadInput(f"models:/{model_name}/{version.version}: the {CHAMPION} alias names a version that no run "
                       f"logged; {REGISTER_FIX}")
    run = client.get_run(version.run_id)
    confirmation = version.tags.get(CONFIRMATION_TAG)
    return ChampionVersion(model_name, version.version, version.tags["study"], int(version.tags["trial_number"]),
                           version.run_id, run.data.tags.get(PARENT_TAG), f"models:/{model_name}/{version.version}",
                           dict(run.data.params), int(confirmation) if confirmation is not None else None)


def load_state_dict(model_uri: str) -> dict[str, Any]:
    """The weights of a logged model under the original module's names, read without running anything in it.

    A registry may hold anyone's upload, so its files are data to check, never code: a model logged with its
    plain `weights.pt` (tracking does) is read by torch's weights-only reader. One logged before holds only its
    torch.export program, which is unpickled when loaded: MLflow loads it with its pickle switch off, after
    checking that the archive holds tensors and plain data only. Anything else is refused with one line.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        weights = local / WEIGHTS_PATH
        if weights.is_file():
            return read_state_dict(weights, f"{model_uri} ({WEIGHTS_PATH})", REGISTER_FIX)
        _check_program_only(local, model_uri)
        try:
            with _pickle_switch_off():
                return mlflow.pytorch.load_model(str(local)).state_dict()
        except Exception as exc:
            detail = " ".join(str(exc).split(". ")[0].split())[:300]  # MLflow's first sentence says what it refused
            raise BadInput(f"{model_uri}: refused ({type(exc).__name__}: {detail}); {REGISTER_FIX}") from None


def _check_program_only(local: Path, model_uri: str) -> None:
    """A downloaded model is a torch.export program in data/model.pt2 and nothing MLflow would import or unpickle
    on its own: no pickled module (data/model.pth) and no code directory put on sys.path."""
    try:
        flavor = Model.load(str(local / MLMODEL_FILE_NAME)).flavors.get("pytorch") or {}
    except Exception as exc:
        raise BadInput(f"{model_uri}: its MLmodel file is unreadable ({type(exc).__name__}); {REGISTER_FIX}") from None
    if (local / "data" / "model.pth").exists():
        raise BadInput(f"{model_uri}: a pickled model (data/model.pth), which could run code when loaded, is never "
                       f"loaded; {REGISTER_FIX}")
    if flavor.get("code") or flavor.get("model_data") != "data" or not (local / "data" / "model.pt2").is_file():
        raise BadInput(f"{model_uri}: not a torch.export model as tracking logs it (data/model.pt2, no code "
                       f"directory); {REGISTER_FIX}")


@contextlib.contextmanager
def _pickle_switch_off() -> Iterator[None]:
    """MLflow's pickle switch off for one load (MLflow allows pickle by default), then as it was."""
    name = MLFLOW_ALLOW_PICKLE_DESERIALIZATION.name
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def log_test_metrics(client: MlflowClient, run_ids: list[str], metrics: dict[str, float]) -> None:
    """Record an export's test-split figures on the champion's run and the study's parent run."""
    timestamp = int(time.time() * 1000)
    for run_id in run_ids:
        client.log_batch(run_id, metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()])
