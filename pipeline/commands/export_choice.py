"""Which model an export writes (`ExportedModel`): the registry's champion, else the study's champion (its best
trial, the champion phase's or the Pareto front's choice) retrained from its record, or the trial TRIAL= names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from pipeline import store
from pipeline.commands import replay
from pipeline.data.recorded import recorded_data
from pipeline.search import champion, pareto
from pipeline.spec import hparams, studies
from pipeline.spec.errors import BadInput
from pipeline.spec.studies import StudyError
from pipeline.store import Storage
from pipeline.tracking import registry
from pipeline.training import models, train
from pipeline.training.device import pick_device


@dataclass
class ExportedModel:
    """The model to export and where it came from."""

    study_name: str  # the Optuna study (version) it belongs to
    trial: store.TrialRecord
    definition: dict[str, Any]  # that study's search definition (dataset, val_size, limits, ...)
    model: torch.nn.Module  # CPU, float32, eval mode
    source: str  # one line: registry version, or retrained from the recorded trial
    run_ids: list[str]  # MLflow runs that get the test figures (champion run, parent run)
    split_hash: str  # the validation split it was judged on: recorded by the trial, or (older trials) rebuilt
    confirmed: champion.Candidate | None = None  # its configuration's runs over seeds (champion phase)
    how_chosen: str = ""  # one line for the model card: the study's rule, or the user's TRIAL=

    @property
    def trial_number(self) -> int:
        """The search trial whose configuration this is (a champion-phase run trains one again)."""
        return self.trial.confirmation_of if self.trial.confirmation_of is not None else self.trial.number

    @property
    def params(self) -> dict[str, Any]:
        """The full params it trained with, as its trial recorded them (it was retrained from them, or its
        registered weights were checked against them)."""
        if self.trial.params is None:
            raise BadInput(f"{self.describe()} of {self.study_name!r} recorded no params; it cannot be exported")
        return self.trial.params

    def describe(self) -> str:
        if self.trial.confirmation_of is None:
            return f"trial {self.trial.number}"
        return f"repeat {self.trial.repeat} of trial {self.trial.confirmation_of}"


def find_champion(spec: studies.StudySpec, storage: Storage, root: Path, client: Any | None,
                  log: Any = print, trial: int | None = None) -> ExportedModel:
    """The registry's `champion` of the study's model, else the study's champion (its best trial, the champion
    phase's or the Pareto front's choice) retrained from its record; with `trial`, that complete trial retrained."""
    study = store.find_study(spec, storage.backend)  # StudyError (exit 2) when the study was never run
    how = ""
    if trial is not None:
        best, confirmed = _complete_trial(study, trial), None
        what, why = f"trial {trial}", "TRIAL= asks for it"
        how = f"Chosen by the user (`make export-best TRIAL={trial}`), not by the study's rule"
    else:
        version = registry.champion(client, spec.name) if client is not None else None
        if version is not None:
            return _registered(spec, storage, root, version)
        decision, confirmed = pareto.decide(spec, study), None
        if decision.trial is None:
            raise BadInput(f"study {study.study_name!r} has no complete trial to export (or none its [champion] "
                           f"accepts); run `make search STUDY={spec.name}` until one completes")
        best = decision.trial
        what, why = f"trial {best.number}", f"no registered champion for {spec.name!r}"
        if spec.pareto_choice is not None:
            how = f"Chosen from {decision.reason}"
        table, companion = _phase(spec, storage, study)
        if table is not None and table.exported is not None:  # the champion phase's choice: its run nearest the mean
            exported = store.record(companion, table.exported.number) if companion is not None else None
            if exported is None:
                raise StudyError(f"the champion phase's run {table.exported.number} of {study.study_name!r} is "
                                 "missing from its store; run `make search` again to train it")
            confirmed, best = table.champion, exported
            what = f"repeat {best.repeat} of trial {best.confirmation_of} (the champion phase's choice)"
        elif champion.planned_rungs(study):  # its trials are brief rung-0 runs, no model to ship
            raise BadInput(f"study {study.study_name!r} has no champion yet: its champion phase has not all its runs; "
                           f"`make search STUDY={spec.name}` completes it (or TRIAL= exports a trial you choose)")
    definition = store.definition(study)
    log(f"{why}: retraining {what} of {study.study_name!r} from its recorded params and seed")
    prepared = recorded_data(definition, root, pick_device())

    def progress(m: train.EpochMetrics) -> None:
        log(f"  epoch {m.epoch}: val_accuracy {m.val_accuracy:.4f} ({m.epoch_seconds:.0f} s)")

    result = replay.retrain(best, prepared, progress)
    recorded = [h["val_accuracy"] for h in best.history]
    if recorded and max(recorded) != result.best_val_accuracy:
        log(f"warning: the retrained validation accuracy {result.best_val_accuracy} differs from the recorded "
            f"{max(recorded)} (another device or thread count?)")
    return ExportedModel(study.study_name, best, definition, train.export_ready_copy(result.model),
                         f"{what} retrained from its recorded params and seed ({why})", [],
                         best.split_hash or prepared.split_hash, confirmed, how)


def _complete_trial(study: optuna.Study, number: int) -> store.TrialRecord:
    record = store.record(study, number)
    if record is None or record.state != "COMPLETE":
        done = [r.number for r in store.records(study, (optuna.trial.TrialState.COMPLETE,))]
        shown = ", ".join(map(str, done[:30])) + (" ..." if len(done) > 30 else "") if done else "none"
        raise BadInput(f"TRIAL={number}: study {study.study_name!r} has no complete trial {number}; complete trials: "
                       f"{shown}")
    return record


def _phase(spec: studies.StudySpec, storage: Storage,
           study: optuna.Study) -> tuple[champion.Standings | None, optuna.Study | None]:
    """The champion phase's table (when the study file has a [champion]) and its runs' companion study, if any."""
    companion = champion.find_companion(storage.backend, study.study_name)
    table = champion.standings(spec, study, companion) if spec.confirmation is not None else None
    return table, companion


def _registered(spec: studies.StudySpec, storage: Storage, root: Path,
                version: registry.ChampionVersion) -> ExportedModel:
    """The registered champion's weights in the architecture its trial recorded, checked to be that trial's."""
    study = store.load_study(storage.backend, version.study_name)
    trial, confirmed = store.record(study, version.trial_number), None
    if version.confirmation_number is not None:  # the champion phase's run of that trial's configuration
        table, companion = _phase(spec, storage, study)
        trial = store.record(companion, version.confirmation_number) if companion is not None else None
        if table is not None:
            confirmed = next((c for c in table.candidates if c.trial.number == version.trial_number), None)
    if trial is None or trial.state != "COMPLETE" or trial.params is None or trial.seed is None:
        raise StudyError(f"trial {version.trial_number} of study {version.study_name!r} is not a complete trial")
    if not version.matches(hparams.resolve_params(trial.params), trial.seed):
        raise BadInput(f"the registered champion of {spec.name!r} (version {version.version}) was trained by "
                       f"trial {version.trial_number} of {version.study_name!r}, but that trial in the Optuna "
                       "storage has other params or seed (was the storage replaced?); point STORAGE at the "
                       "original one, or pass --no-tracking to export the study's own best trial")
    definition = store.definition(study)
    # Streamed (resident_bytes=1): only the classes, shape and statistics are needed, not the images.
    prepared = recorded_data(definition, root, resident_bytes=1)
    # A pretrained ResNet's input adapter needs the data's statistics; not its ImageNet weights, which the
    # champion's replace.
    model = models.build_model(trial.params, len(prepared.classes), prepared.input_shape,
                               (prepared.mean, prepared.std), imagenet=False)
    try:
        model.load_state_dict(registry.load_state_dict(version.model_uri))
    except RuntimeError as exc:  # the registry's files are anyone's: their weights may not fit
        detail = " ".join(str(exc).split())[:300]
        raise BadInput(f"{version.model_uri}: its weights do not fit the network trial {version.trial_number} "
                       f"describes ({detail}); {registry.REGISTER_FIX}") from None
    return ExportedModel(version.study_name, trial, definition, model.eval(),
                         f"registered model {spec.name!r} version {version.version} (alias champion)",
                         [r for r in (version.run_id, version.parent_run_id) if r],
                         trial.split_hash or prepared.split_hash, confirmed)
