"""MLflow: one experiment and one parent run per study, one child run per trial.

With connection.py (which store, and where its artifacts go), registry.py (the champion) and commands/server.py
(the UI), the only modules that import MLflow. It knows nothing of Optuna: `StudyRun` is a listener (events.py)
that the search tells what happens, in plain values.

- Parent run: one per study, created on the first invocation and reopened by later ones (its id is
  kept in the study's user attributes). It carries the study report at the end of each invocation.
- Child run: one per trial, opened when the trial starts so a running trial is visible live; params
  under stable names, the dataset as a run input (name, digest, source, images per split, classes,
  image size: the UI's Dataset column), one batched metrics call per epoch (`step=epoch`), and the end
  status FINISHED / KILLED / FAILED for COMPLETE / PRUNED / FAIL.
- Best model: only a trial that becomes the study's best logs its model (torch.export `pt2`, which
  loads with torch alone, and its weights as a plain `weights.pt` that loads without unpickling code),
  so disk grows with improvements, not with trials. The best trial's model
  is registered as model `<study file name>` with alias `champion` (registry.py).
- Champion phase (champion.py): each run is a child run too, tagged `role=confirmation`, `confirmation_of`,
  `repeat` (its number in the companion study under `confirmation_number`), and logs its model, since the
  phase's choice may be any of them; the parent gets the phase's table and the champion's mean and interval.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.types import Schema, TensorSpec

from pipeline.infra import fileio, revision
from pipeline.infra.text import masked_text
from pipeline.reports import plots
from pipeline.search.events import Listener, TrialEnded, TrialStarted
from pipeline.tracking import registry
from pipeline.tracking.connection import artifact_root

if TYPE_CHECKING:  # annotations only: tracking never trains or predicts itself
    from pipeline.data.loading import PreparedData
    from pipeline.search.champion import Standings
    from pipeline.training.train import EpochMetrics, TrainedModel

DATASET_ATTEMPTS = 3  # workers may record the same dataset at the same moment
PARENT_TAG = registry.PARENT_TAG
RUN_NAME_TAG = "mlflow.runName"
CONFIRMATION_TAG = registry.CONFIRMATION_TAG  # a champion-phase run's number in the companion study
# MLflow 3's UI opens an experiment on its GenAI overview unless it is marked as model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "images_per_second")
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
INPUT_EXAMPLE_IMAGES = 4  # > 1, so torch.export keeps the batch dimension dynamic


# --------------------------------------------------------------------------------------------------
# Provenance logged with every trial


def provenance(data: PreparedData) -> dict[str, str]:
    """What every trial's run records besides its hyperparameters: data identity, code and versions."""
    return {
        "dataset": data.dataset,
        "dataset_checksum": data.checksum,  # the name results have always been recorded under
        "dataset_digest": data.checksum,  # the name of the trial's Optuna attribute and its MLflow dataset input
        "split_hash": data.split_hash,
        "train_images": str(len(data.train)),
        "val_images": str(len(data.val)),
        "git_commit": revision.git_commit(),
        "torch_version": torch.__version__,
        "optuna_version": importlib.metadata.version("optuna"),
        "mlflow_version": mlflow.__version__,
    }


def dataset_input(data: PreparedData) -> DatasetInput:
    """The trial's dataset as an MLflow run input: metadata only (no image is copied), identified by its digest.

    The UI shows `name (digest)` in the runs table's Dataset column; its drawer shows the profile (images
    per split, classes, image size, preprocessing) and the schema (uint8 image tensors, int64 labels).
    """
    channels, height, width = data.input_shape
    profile = {
        "train_images": len(data.train),
        "val_images": len(data.val),
        "test_images": data.test_count,
        "num_classes": len(data.classes),
        "classes": list(data.classes),
        "image_size": f"{channels}x{height}x{width}",
        "preprocessing": data.preprocessing.as_dict(),
        "split_hash": data.split_hash,
    }
    schema = TensorDatasetSchema(features=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, height, width),
                                                             "image")]),
                                 targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]))
    dataset = Dataset(name=data.dataset, digest=data.checksum, source_type="local",
                      source=json.dumps({"uri": data.source or data.dataset}), schema=json.dumps(schema.to_dict()),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


# --------------------------------------------------------------------------------------------------
# The study's parent run and its trials' child runs


class StudyRun(Listener):
    """The MLflow side of one study: its experiment, parent run and child runs; it listens to the search's events."""

    def __init__(self, client: MlflowClient, study_name: str, model_name: str, metric: str, direction: str,
                 parent_run_id: str | None, description: str = ""):
        self.client = client
        self.study_name = study_name
        self.model_name = model_name  # the registered model: the study file's name, shared by its versions
        self.metric, self.direction = metric, direction
        self.experiment_id = self._experiment(study_name)
        mlflow.set_experiment(experiment_id=self.experiment_id)  # logged models follow the fluent experiment
        self.parent_run_id = self._parent(parent_run_id, description)
        self.children: dict[int, str] = {}  # this process's open runs by trial number
        self.number_tag = "trial_number"  # the tag a run's trial number is found by
        self._provenance: dict[str, str] | None = None
        self._dataset: DatasetInput | None = None

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            root = artifact_root(self.client.tracking_uri)
            location = (root.resolve() / name).as_uri() if root is not None else None
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except MlflowException:  # another worker created it a moment ago
                raced = self.client.get_experiment_by_name(name)
                if raced is None:  # no: the store refused it for another reason
                    raise
                experiment_id = raced.experiment_id
            return experiment_id
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            self.client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return experiment.experiment_id

    def _parent(self, run_id: str | None, description: str) -> str:
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    self.client.update_run(run_id, status="RUNNING")
                    return run_id
            except MlflowException:
                pass  # the tracking store was replaced: start a new parent in it
        tags = {RUN_NAME_TAG: self.study_name, "study": self.study_name, "role": "study",
                "mlflow.note.content": description}
        return self.client.create_run(self.experiment_id, tags=tags).info.run_id

    def adopt_parent(self, run_id: str) -> None:
        """Another process's parent run won the race: delete ours (it has no children yet) and use theirs."""
        self.client.delete_run(self.parent_run_id)
        self.parent_run_id = self._parent(run_id, "")

    def confirmations(self) -> StudyRun:
        """The same experiment and parent for the champion phase's runs (champion.py): their own open runs, by
        the companion study's trial numbers, found by their `confirmation_number` tag."""
        twin = copy.copy(self)
        twin.children, twin.number_tag = {}, CONFIRMATION_TAG
        return twin

    # ---- trials ------------------------------------------------------------------------------------

    def trial_started(self, trial: TrialStarted) -> None:
        """Open the trial's child run (so a running trial is visible live) with its params and dataset."""
        assert trial.data is not None, "a trial's run is opened in the process that trains it, with its data"
        # The same data for every trial of this process, but for a planned search's rungs (their own subsets)
        if self._provenance is None or self._dataset is None or self._provenance["split_hash"] != trial.data.split_hash:
            self._provenance = provenance(trial.data)
            self._dataset = dataset_input(trial.data)
        number, of = trial.number, trial.confirmation_of
        tags = {PARENT_TAG: self.parent_run_id, RUN_NAME_TAG: f"trial-{number:04d}", "study": self.study_name,
                self.number_tag: str(number), "optuna_state": "RUNNING", "parameter_count": str(trial.parameter_count)}
        logged = {k: registry.param_value(v) for k, v in trial.params.items()}
        logged |= {"trial_number": str(number), "trial_seed": str(trial.seed), **self._provenance}
        if of is not None and trial.rung is not None:  # a planned search's run of trial `of` at a later rung
            tags |= {RUN_NAME_TAG: f"trial-{of:04d}-rung-{trial.rung}", "role": "rung", "rung": str(trial.rung),
                     "confirmation_of": str(of)}
            logged |= {"trial_number": str(of), "rung": str(trial.rung), CONFIRMATION_TAG: str(number)}
        elif of is not None:  # a champion-phase run: trial `of`'s configuration, with repeat `repeat`'s seed
            tags |= {RUN_NAME_TAG: f"trial-{of:04d}-repeat-{trial.repeat}", "role": "confirmation",
                     "confirmation_of": str(of), "repeat": str(trial.repeat)}
            logged |= {"trial_number": str(of), "repeat": str(trial.repeat), CONFIRMATION_TAG: str(number)}
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(logged.items())])
        self._log_dataset(run_id, self._dataset)
        self.children[number] = run_id

    def _log_dataset(self, run_id: str, dataset: DatasetInput) -> None:
        """The dataset as the run's input. Workers starting their first trials at once may each find the dataset
        unrecorded and each insert it: the store's unique key refuses the second insert, and a second try finds
        the first one's record."""
        for attempt in range(DATASET_ATTEMPTS):
            try:
                self.client.log_inputs(run_id, datasets=[dataset])
                return
            except MlflowException:
                if attempt == DATASET_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 + attempt)

    def epoch_ended(self, number: int, metrics: EpochMetrics) -> None:
        timestamp = int(time.time() * 1000)
        values = metrics.as_dict()
        self.client.log_batch(self.children[number], metrics=[
            Metric(key, float(values[key]), timestamp, metrics.epoch) for key in EPOCH_METRICS])

    def trial_ended(self, trial: TrialEnded) -> None:
        run_id = self.children.pop(trial.number, None)
        if run_id is not None:
            self._close(run_id, trial)

    def interrupted(self, reason: str) -> None:
        """Close the child runs of trials cut short (Ctrl-C, SIGTERM) as FAILED with the reason."""
        for number in list(self.children):
            self.trial_ended(TrialEnded(number, "FAIL", None, fail_reason=reason))

    def _close(self, run_id: str, outcome: TrialEnded) -> None:
        """Record a trial's outcome on its run and end the run with the matching status."""
        tags = {"optuna_state": outcome.state}
        if outcome.fail_reason:
            tags["fail_reason"] = outcome.fail_reason
        if outcome.fail_detail:
            tags["fail_detail"] = masked_text(outcome.fail_detail)[:5000]  # records made before masking too
        for key, value in (outcome.prune_reason or {}).items():  # why it was pruned, one tag per part
            tags[f"prune_{key}"] = str(value)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if outcome.traceback:
            self.client.log_text(run_id, masked_text(outcome.traceback), "traceback.txt")
        if outcome.state == "COMPLETE" and outcome.values:
            self.client.log_metric(run_id, f"objective_{self.metric}", outcome.values[0])
        self.client.set_terminated(run_id, RUN_STATUS.get(outcome.state, "FAILED"))

    def close_orphans(self, ended: dict[int, TrialEnded]) -> int:
        """Close child runs still RUNNING although Optuna says their trial has ended.

        A killed process leaves its trial's run open (the trial is then failed as stale), and a tracking
        store that was unreachable at a trial's end leaves that run open too. Each gets the outcome Optuna
        recorded, which is the same whoever closes it, so a worker still busy with its trial's end is no
        problem. This process's own open trials are left alone.
        """
        closed = 0
        for run in self._children("attributes.status = 'RUNNING'"):
            number = int(run.data.tags.get(self.number_tag, -1))
            if number in ended and number not in self.children:
                self._close(run.info.run_id, ended[number])
                closed += 1
        return closed

    def _children(self, extra_filter: str = "") -> list[Any]:
        query = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'" + (f" and {extra_filter}" if extra_filter else "")
        return list(self.client.search_runs([self.experiment_id], query, max_results=10000))

    def child_of_trial(self, number: int) -> Any | None:
        runs = self._children(f"tags.{self.number_tag} = '{number}'")
        return max(runs, key=lambda r: r.info.start_time) if runs else None

    # ---- the best model ----------------------------------------------------------------------------

    def new_best(self, number: int, value: float, model: TrainedModel) -> None:
        """Log a new best trial's model (pt2, with its plain weights.pt) and its validation confusion matrix."""
        self._log_model(number, model)
        self.client.log_metric(self.parent_run_id, f"best_{self.metric}_so_far", value, step=number)

    def confirmation_model(self, number: int, value: float, model: TrainedModel) -> None:
        self._log_model(number, model)

    def _log_model(self, number: int, model: TrainedModel) -> None:
        run_id, data = self.children[number], model.data
        cpu_model = model.cpu_copy()
        # torch's zip writer aborts the whole process (a C++ exception in a destructor) when a file write fails, so a
        # full disk must be found before it writes; a logged model is written twice (its program, its plain weights).
        # An `mlflow server` stores the artifacts (artifact_root None): its disk, its errors.
        size = sum(t.numel() * t.element_size() for t in cpu_model.state_dict().values()) * 11 // 10 + (1 << 20)
        fileio.ensure_room(size, [Path(tempfile.gettempdir()), artifact_root(self.client.tracking_uri)], copies=2)
        example = model.example_inputs(INPUT_EXAMPLE_IMAGES).numpy()
        with torch.no_grad():
            output = cpu_model(torch.from_numpy(example)).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            # The plain state dict travels with the program (extra_files/weights.pt): export reads the weights
            # from it with torch's weights-only reader instead of loading the program, which unpickles.
            weights = Path(tmp) / registry.WEIGHTS_FILE
            buffer = io.BytesIO()  # serialised in memory, written by Python: torch's writer aborts on a full disk
            torch.save(cpu_model.state_dict(), buffer)
            weights.write_bytes(buffer.getvalue())
            info = mlflow.pytorch.log_model(
                cpu_model, name="model", run_id=run_id, extra_files=[str(weights)],
                signature=mlflow.models.infer_signature(example, output), input_example=example,
                # Stated, which skips MLflow's slow requirement probe.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"dataset": data.dataset, "dataset_digest": data.checksum, "classes": list(data.classes),
                          "mean": list(data.mean), "std": list(data.std), "input_shape": list(data.input_shape),
                          "preprocessing": data.preprocessing.as_dict(), "study": self.study_name,
                          "trial_number": number},
            )
            path = Path(tmp) / "confusion_matrix.png"
            plots.confusion_matrix(data.val.labels.cpu().numpy(), model.val_predictions().numpy(), data.classes,
                                   path, title=f"{self.study_name} trial {number}: validation")
            self.client.log_artifact(run_id, str(path))
        self.client.set_tag(run_id, "model_uri", info.model_uri)

    def register_champion(self, number: int, value: float, evaluation_set: str, rule: str | None = None) -> str:
        """Offer trial `number`'s logged model for the champion (registry.register_champion); `rule`: the
        multi-objective study's [champion] choice that picked it from the Pareto front."""
        run = self.child_of_trial(number)
        model_uri = run.data.tags.get("model_uri") if run is not None else None
        if run is None or model_uri is None:
            return f"trial {number} has no logged model (it ran without tracking): nothing registered"
        return registry.register_champion(self.client, registry.Candidate(
            self.model_name, self.study_name, number, run.info.run_id, model_uri, self.metric, self.direction,
            value, evaluation_set, pareto_rule=rule))

    def register_confirmed(self, standings: Standings, evaluation_set: str) -> str:
        """Offer the champion phase's choice for the champion: its run closest to the mean, valued at the mean."""
        chosen, run = standings.champion, standings.exported
        if chosen is None or run is None:
            return "the champion phase has not chosen yet: nothing registered"
        found = self.confirmations().child_of_trial(run.number)
        model_uri = found.data.tags.get("model_uri") if found is not None else None
        if found is None or model_uri is None:
            return (f"champion-phase run {run.number} has no logged model (it ran without tracking): nothing "
                    "registered")
        return registry.register_champion(self.client, registry.Candidate(
            self.model_name, self.study_name, chosen.trial.number, found.info.run_id, model_uri, self.metric,
            self.direction, chosen.summary.mean, evaluation_set, confirmation_number=run.number, repeat=run.repeat,
            seeds=chosen.summary.n))

    def champion_standings(self, standings: Standings, report_dir: Path) -> None:
        """The phase's table (champion.md, champion.json) into the report folder; its figures on the parent run."""
        (report_dir / "champion.md").write_text(standings.markdown())
        (report_dir / "champion.json").write_text(json.dumps(standings.as_dict(), indent=2, default=str))
        chosen = standings.champion
        if chosen is None:
            return
        s = chosen.summary  # the interval and std exist together, from two runs on
        if s.ci_low is None or s.ci_high is None or s.std is None:
            return
        metrics = {"champion_val_mean": s.mean, "champion_val_ci_low": s.ci_low, "champion_val_ci_high": s.ci_high,
                   "champion_val_std": s.std}
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, timestamp, 0) for k, v in metrics.items()])
        self.client.set_tag(self.parent_run_id, "champion_trial", str(chosen.trial.number))

    # ---- the end of an invocation ------------------------------------------------------------------

    def finish(self, report_dir: Path, best_number: int | None, best_value: float | None, counts: dict[str, int],
               status: str = "FINISHED") -> None:
        """Refresh the parent's report artifacts and summary metrics, then close it with `status`."""
        self.client.log_artifacts(self.parent_run_id, str(report_dir))
        metrics = {f"trials_{state.lower()}": float(n) for state, n in counts.items()}
        if best_value is not None and math.isfinite(best_value):
            metrics[f"best_{self.metric}"] = best_value
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, timestamp, 0) for k, v in metrics.items()])
        if best_number is not None:
            self.client.set_tag(self.parent_run_id, "best_trial", str(best_number))
            self._copy_confusion_matrix(best_number)
        self.client.set_terminated(self.parent_run_id, status)

    def _copy_confusion_matrix(self, number: int) -> None:
        run = self.child_of_trial(number)
        if run is None or "model_uri" not in run.data.tags:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="confusion_matrix.png",
                                                       dst_path=tmp)
            self.client.log_artifact(self.parent_run_id, path)
