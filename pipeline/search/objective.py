"""Optuna's side of a trial: the objective, which turns a trial into a trained model and its objective values.

Each trial turns its suggestions into a plain params dict, resolves it once, builds its model once (its size is
recorded, and a size constraint checked, before any training), trains it with `train.train_network`, reports the
objective every epoch (the pruner may stop it) and records its seed, params and per-epoch history
(store.TrialRecord), so any finished trial can be replayed bit for bit. What happens is told to a listener
(events.py); this module knows neither the console nor MLflow.

A search trial and a champion-phase run differ in a few rules: which trials are one too many, whether several
objectives prune, which models are kept. The objective takes them as a `Role`: `SearchTrials` here, the
phase's in seeds.py. The failure policy is failures.py's, the checkpoint files trial_files.py's.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.data.loading import PreparedData
from pipeline.infra.concurrency import process_identity
from pipeline.search import pareto, pruning
from pipeline.search.clock import TrialClock
from pipeline.search.events import Listener, TrialStarted
from pipeline.search.failures import failing_trial, record_failure
from pipeline.search.fidelity import Fidelity
from pipeline.search.stopping import OutOfTime, StopRequest, SurplusTrial
from pipeline.search.trial_files import adopt_unkeyed, checkpoint_path, remove_checkpoint
from pipeline.spec import hparams, space, studies, tables
from pipeline.spec.studies import StudySpec
from pipeline.store import samplers
from pipeline.training import latency, models, train
from pipeline.training.checkpoints import ForeignCheckpoint

HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # not timings
SURPLUS = "surplus"

Reporter = Callable[[train.EpochMetrics], None]


def history_record(metrics: train.EpochMetrics) -> dict[str, float]:
    return {k: getattr(metrics, k) for k in HISTORY_KEYS}


class Role(Protocol):
    """What differs between the trials of a search and the runs of the champion phase (seeds.ChampionRuns)."""

    @property
    def prunes(self) -> bool:
        """Whether a trial of several objectives may be pruned on the median of the others' histories."""

    def surplus(self, trial: optuna.Trial) -> str:
        """Why this trial must not train ('' when it may)."""

    def keep_model(self, trial: optuna.Trial, values: list[float], feasible: bool, model: train.TrainedModel,
                   listener: Listener) -> None:
        """Hand a trained model to the listener when it is worth keeping (raising fails the trial)."""


@dataclass(frozen=True)
class SearchTrials:
    """A search's trials: `spec.trial_budget` of them, pruned by the study's pruner, and a model kept when it is a
    feasible new best (one objective) or joins the Pareto front (several)."""

    spec: StudySpec
    trials: int | None = None  # a planned search's rung 0: this many; None: the study's trial budget

    @property
    def prunes(self) -> bool:
        return self.spec.pruner != "none" and not self.spec.planned

    def surplus(self, trial: optuna.Trial) -> str:
        return surplus_trial(self.spec, trial, self.trials)

    def keep_model(self, trial: optuna.Trial, values: list[float], feasible: bool, model: train.TrainedModel,
                   listener: Listener) -> None:
        if self.spec.planned:  # a rung's brief run is no model to keep: the champion phase trains those
            return
        if _worth_keeping(trial.study, values, feasible):
            failing_trial(trial, lambda: listener.new_best(trial.number, values[0], model),
                          "the best model could not be logged to MLflow")



@dataclass
class Objective:
    """Optuna objective: suggestions -> params -> the model, built once -> trained -> objective value(s)."""

    spec: StudySpec
    data: PreparedData
    role: Role  # the search's trials (SearchTrials) or the champion phase's runs (seeds.ChampionRuns)
    listener: Listener = field(default_factory=Listener)
    threads: int | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    running: int | None = None  # the number of the trial in progress, for the interrupt handler
    checkpoints: Path | None = None  # the study's checkpoint folder; None: trials keep no checkpoints
    fidelity: Fidelity | None = None  # a planned search's sampled trials' rung (a queued run carries its own)
    clock: TrialClock | None = None  # a planned search's: a run that cannot end in time does not start
    # A rung's subset, drawn once per process: every configuration of the rung trains on the same images
    subsets: dict[Fidelity, PreparedData] = field(default_factory=dict)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        surplus = self.role.surplus(trial)
        if surplus:
            store.note(trial, store.TrialNotes(fail_reason=SURPLUS))
            raise SurplusTrial(f"trial {trial.number}: {surplus}")
        self.running = trial.number
        fidelity = self._fidelity(trial)
        params = space.suggest(self.spec, trial)
        if fidelity is not None:
            params = fidelity.params(params)
        data = self._data(fidelity)
        first, seed = store.first_attempt(trial)  # a retry continues its first attempt: same seed, same checkpoint
        seed = studies.derive_seed(self.spec.seed, trial.number) if seed is None else seed
        # history and resumed_from_epoch start afresh: Optuna's heartbeat retry copies the failed trial's record
        # (on another host, without its checkpoint, this attempt starts over); a resume sets them again.
        store.note(trial, store.TrialNotes(seed=seed, first_attempt=first, params=params,
                   owner={"host": socket.gethostname(), "pid": os.getpid(), **process_identity()},
                   split_hash=data.split_hash, dataset_digest=data.checksum, history=[],
                   resumed_from_epoch=0, fidelity=fidelity.as_dict() if fidelity is not None else None))
        checkpoint = checkpoint_path(self.checkpoints, first) if self.checkpoints is not None else None
        if checkpoint is not None:
            adopt_unkeyed(checkpoint)
        try:
            values = self._run(trial, hparams.resolve_params(params), seed, checkpoint, data)
        except Exception:  # pruned or failed for good: no retry will resume it (an interrupt keeps it)
            remove_checkpoint(checkpoint)
            raise
        remove_checkpoint(checkpoint)
        return values

    def _data(self, fidelity: Fidelity | None) -> PreparedData:
        """The data a trial of `fidelity` trains on: the whole split, or its rung's subset (made once)."""
        if fidelity is None:
            return self.data
        if fidelity not in self.subsets:
            self.subsets[fidelity] = fidelity.data(self.data)
        return self.subsets[fidelity]

    def _fidelity(self, trial: optuna.Trial) -> Fidelity | None:
        """The rung this trial trains at: a queued run's own, else the sampled trials' (None: unplanned)."""
        recorded = trial.user_attrs.get("fidelity")
        return Fidelity.from_dict(recorded) if recorded is not None else self.fidelity

    def _run(self, trial: optuna.Trial, p: dict[str, Any], seed: int, checkpoint: Path | None,
             data: PreparedData) -> float | list[float]:
        """Train the trial of resolved params `p` on `data`: its size first (a trial outside a size constraint is
        pruned untrained, one that cannot end in the time left is not started), then the model, its metrics and
        the objective values."""
        network, size = self._build(p, seed, data)
        # A pruned or failed trial is still tagged with its size.
        store.note(trial, store.TrialNotes(parameter_count=size.get("parameter_count"),
                                           flops_per_image=size.get("flops_per_image")))
        rung = (trial.user_attrs.get("fidelity") or {}).get("rung")
        started = TrialStarted(trial.number, p, seed, size.get("parameter_count", -1), data,
                               trial.user_attrs.get("confirmation_of"), trial.user_attrs.get("repeat", 0),
                               rung if rung is not None and rung > 0 else None)
        failing_trial(trial, lambda: self.listener.trial_started(started), "the trial could not be started")
        # Size is known before training: a trial already outside a size constraint is not worth training.
        missed = constrain(trial, self.spec, size)
        if missed:
            store.note(trial, store.TrialNotes(fail_reason="infeasible", fail_detail=missed))
            raise optuna.TrialPruned(f"infeasible before training: {missed}")
        if self.clock is not None:
            flops = network.flops_per_image if isinstance(network, train.Network) else None
            try:
                self.clock.check_start(len(data.train), p["epochs"], flops, f"trial {trial.number}")
            except OutOfTime as exc:
                store.note(trial, store.TrialNotes(fail_reason=exc.reason, fail_detail=str(exc)))
                raise
        result = self._train(trial, p, seed, network, checkpoint, data)
        store.note(trial, store.TrialNotes(best_epoch=result.best_epoch, precision=result.precision,
                                           memory_format=result.memory_format, eval_batch_size=p["eval_batch_size"],
                                           threads=result.threads, device=result.device,
                                           parameter_count=result.parameter_count,
                                           flops_per_image=result.flops_per_image, stop_reason=result.stop_reason))
        model = train.TrainedModel(result.model, data, result.precision, result.memory_format)
        latency_ms = None
        if self.spec.measures_latency:
            latency_ms = latency.trial_latency_ms(model.cpu_copy(), data.input_shape)
            store.note(trial, store.TrialNotes(latency_ms=latency_ms, latency_threads=latency.LATENCY_THREADS))
        metrics = trial_metrics(result, latency_ms)
        # Each constraint once (Optuna keeps the first value): what was not known before training.
        missed = constrain(trial, self.spec, {k: v for k, v in metrics.items() if k not in size})
        values = objective_values(self.spec, metrics)
        # Inside the trial, so that a model that cannot be saved (disk full) fails this trial, not the study.
        self.role.keep_model(trial, values, not missed, model, self.listener)
        return values[0] if len(values) == 1 else values

    def _build(self, p: dict[str, Any], seed: int,
               data: PreparedData) -> tuple[train.Network | Exception, dict[str, int]]:
        """The trial's model, built once (it is the one trained), and the size recorded before training:
        `parameter_count`, and `flops_per_image` only for a study with a FLOPs constraint (a trial that ends
        before training records its FLOPs only then, as it always has; a trained one records them with its
        result). A model that cannot be built comes back as its error, raised when the trial trains (where it is
        recorded), with the size of its architecture alone when that builds (missing ImageNet weights)."""
        flops = "flops_per_image" in self.spec.constraints
        try:
            network = train.build(p, data, seed, self.threads)  # counts its FLOPs, recorded or not
        except Exception as exc:
            return exc, architecture_size(p, data, flops)
        size = {"parameter_count": network.parameter_count, "flops_per_image": network.flops_per_image}
        return network, size if flops else {"parameter_count": network.parameter_count}

    def _train(self, trial: optuna.Trial, p: dict[str, Any], seed: int, network: train.Network | Exception,
               checkpoint: Path | None, data: PreparedData) -> train.TrainResult:
        """Training, with its failures recorded: pruned when it diverged or ran out of memory, failed otherwise."""
        report, resumed = self._reporter(trial)
        try:
            return self._fit(trial, p, seed, network, checkpoint, report, resumed, data)
        except train.Diverged as exc:
            store.note(trial, store.TrialNotes(fail_reason="diverged", fail_detail=str(exc)))
            raise optuna.TrialPruned(f"diverged: {exc}") from exc
        except train.OutOfMemory as exc:
            store.note(trial, store.TrialNotes(fail_reason="oom", fail_detail=str(exc)))
            raise optuna.TrialPruned(f"oom: batch_size {exc.batch_size}") from exc
        except optuna.TrialPruned:
            raise
        except OutOfTime as exc:
            store.note(trial, store.TrialNotes(fail_reason=exc.reason, fail_detail=str(exc)))
            raise
        except KeyboardInterrupt:
            store.note(trial, store.TrialNotes(fail_reason="interrupted"))
            raise
        except Exception as exc:
            record_failure(trial, exc)
            raise

    def _fit(self, trial: optuna.Trial, p: dict[str, Any], seed: int, network: train.Network | Exception,
             checkpoint: Path | None, report: Reporter,
             resumed: Callable[[list[train.EpochMetrics]], None], data: PreparedData) -> train.TrainResult:
        def fit(built: train.Network | Exception) -> train.TrainResult:
            if isinstance(built, Exception):
                raise built
            return train.train_network(built, data, callbacks=[report], checkpoint=checkpoint,
                                       on_batch=self._on_batch, on_resume=resumed)

        try:
            return fit(network)
        except ForeignCheckpoint as exc:
            # Left by something else (a damaged file, code that resolves the params differently): the trial's
            # parameters still deserve a run, from the start. Nothing was trained yet: the check comes first.
            self.listener.warning(f"trial {trial.number}: {exc}; it is removed and the trial trains from the start")
            remove_checkpoint(checkpoint)
            return fit(train.build(p, data, seed, self.threads))  # seeded and built again, as a new run starts

    def _on_batch(self, done: int, total: int) -> None:
        self.stop.check()
        if self.clock is not None:
            self.clock.check_running(f"trial {self.running}")
        self.listener.batch_done(done, total)

    def _reporter(self, trial: optuna.Trial) -> tuple[Reporter, Callable[[list[train.EpochMetrics]], None]]:
        """The per-epoch callback (record the history, tell the listener, report to the pruner), and the
        one that records a resumed checkpoint's epochs the same way, so the record and the pruner see every
        epoch of the trial."""
        history: list[dict[str, float]] = []
        metric = pruning.pruned_metric(self.spec.metrics)
        # Optuna's pruner takes one objective, and only a per-epoch one (a size has no epochs)
        single = len(self.spec.objectives) == 1 and metric in tables.PRUNED_ON
        several_pruned = not single and self.role.prunes

        def record(metrics: train.EpochMetrics) -> None:
            history.append(history_record(metrics))
            store.note_epoch(trial, len(history), history[-1])
            self.listener.epoch_ended(trial.number, metrics)
            if single:
                trial.report(getattr(metrics, self.spec.metrics[0]), step=metrics.epoch)

        def report(metrics: train.EpochMetrics) -> None:
            self.stop.check()
            record(metrics)
            reason = None
            if single and metric is not None and trial.should_prune():
                reason = pruning.explain(trial.study, trial, metrics.epoch, metric) or pruning.PruneReason(
                    metrics.epoch, metric, getattr(metrics, metric), math.nan, self.spec.pruner)
            elif several_pruned and metric is not None:  # spec/checks.py: a pruned study has a validation metric
                maximize = self.spec.directions[self.spec.metrics.index(metric)] == "maximize"
                first = samplers.first_pruned_epoch(self.spec.epochs)
                reason = pruning.median_from_histories(trial.study, history, metric, maximize, first)
            if reason is not None:
                store.note(trial, store.TrialNotes(fail_reason="pruned", fail_detail=reason.line(),
                                                   prune_reason=reason.as_dict()))
                raise optuna.TrialPruned(f"pruned at {reason.line()}")

        def resumed(done: list[train.EpochMetrics]) -> None:
            store.note(trial, store.TrialNotes(resumed_from_epoch=len(done)))
            for metrics in done:
                record(metrics)

        return report, resumed


def surplus_trial(spec: StudySpec, trial: optuna.Trial, budget: int | None = None) -> str:
    """Why this new trial is one too many (empty: it is not). Workers check the budget before asking for a
    trial, but two may ask at the same moment. Trial numbers are handed out in order by the storage, so the trial whose
    earlier-numbered finished or running trials already fill the budget is the surplus one, and exactly
    one of two racing workers finds that. A surplus trial taken from the queue (a baseline, a retry) is
    queued again, so its parameters still run if a running trial fails."""
    others = trial.study.get_trials(deepcopy=False, states=(*store.FINISHED, TrialState.RUNNING))
    taken = sum(t.state in store.FINISHED or t.number < trial.number for t in others)
    budget = spec.trial_budget if budget is None else budget
    if taken < budget:
        return ""
    store.requeue_if_queued(trial)
    return f"the study's {budget} trials are all taken"


def _worth_keeping(study: optuna.Study, values: list[float], feasible: bool) -> bool:
    """Is this trial's model logged? One objective: a feasible new best. Several: a feasible trial that no earlier
    one dominates (every trial of the final Pareto front was such a trial when it ended, so any may be chosen)."""
    if len(values) == 1:
        return feasible and store.beats_best(study, values[0])
    return feasible and pareto.joins_front(study, values)


def architecture_size(p: dict[str, Any], data: PreparedData, flops: bool) -> dict[str, int]:
    """`parameter_count` (and with `flops`, `flops_per_image`: one more forward pass) of the architecture alone, for
    a model that could not be built with its ImageNet weights (missing on this machine): its failed trial is still
    tagged with its size. {} when the params cannot build at all."""
    try:
        model = models.build_model(p, len(data.classes), data.input_shape, imagenet=False)
        counted = {"parameter_count": models.count_parameters(model)}
        return counted | ({"flops_per_image": models.flops_per_image(model, data.input_shape)} if flops else {})
    except Exception:  # bad params: training reports those properly
        return {}


def constrain(trial: optuna.Trial, spec: StudySpec, metrics: Mapping[str, float]) -> str:
    """Give Optuna the study's constraints on these metrics; return which are missed ('' when none)."""
    missed = []
    for metric, bound in spec.constraints.items():
        if metric in metrics:
            excess = bound.excess(metrics[metric])
            trial.set_constraint(metric, excess)
            if excess > 0:
                missed.append(f"{metric} {metrics[metric]:g} is not {bound.describe()}")
    return "; ".join(missed)


def trial_metrics(result: train.TrainResult, latency_ms: float | None = None) -> dict[str, float]:
    """Every metric a trained trial is judged by (objectives, constraints, the champion's choice): the validation
    ones from its best epoch; latency_ms when it was measured."""
    best = result.history[result.best_epoch - 1]
    found = {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
             "parameter_count": float(result.parameter_count), "flops_per_image": float(result.flops_per_image)}
    return found | ({"latency_ms": latency_ms} if latency_ms is not None else {})


def objective_values(spec: StudySpec, metrics: dict[str, float]) -> list[float]:
    return [metrics[metric] for metric in spec.metrics]
