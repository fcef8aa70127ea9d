"""The trainer: `fit` trains a model from a plain dict of hyperparameters (`build`, then `train_network`).

It knows neither Optuna nor MLflow. After every epoch it calls each callback with the epoch's `EpochMetrics`; a
callback that returns True stops training (and may raise, e.g. to prune). Everything it needs to continue bit for
bit (weights, optimiser, RNG and data-order state, the best epoch so far) goes into an atomic checkpoint at every
epoch boundary.

A search calls `build` itself (seeded, its size counted) to know a trial's size before `train_network` trains it.
The optimiser and the learning-rate schedule are schedule.py's, the device and precision device.py's, the
checkpoint files checkpoints.py's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.augment import Augment, NaturalAugment, make_augment
from pipeline.data.loading import FeatureSplit, PreparedData, ResidentImages
from pipeline.spec.errors import ParamError
from pipeline.spec.hparams import resolve_params
from pipeline.spec.stop_reason import StopReason
from pipeline.training import allocator, models, reproducibility
from pipeline.training.checkpoints import load_checkpoint, params_fingerprint, save_checkpoint
from pipeline.training.device import (
    CHANNELS_LAST,
    MEMORY_FORMATS,
    autocast,
    is_out_of_memory,
    pick_memory_format,
    pick_precision,
)
from pipeline.training.evaluation import backbone_features, evaluate, export_ready_copy, predict
from pipeline.training.schedule import Plateau, lr_factor, make_optimizer


class Diverged(Exception):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class OutOfMemory(Exception):
    """The device ran out of memory; a smaller batch_size may fit."""

    def __init__(self, batch_size: int, device: str, detail: str):
        super().__init__(f"out of memory on {device} with batch_size {batch_size}: {detail.splitlines()[0]}")
        self.batch_size, self.device = batch_size, device


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


Callback = Callable[[EpochMetrics], bool | None]
Resumed = Callable[[list[EpochMetrics]], None]  # told the epochs a resumed checkpoint holds


@dataclass
class TrainResult:
    params: dict[str, Any]  # resolved: every key with its value
    history: list[EpochMetrics]
    best_epoch: int
    best_val_accuracy: float
    model: nn.Module  # holds the best epoch's weights
    device: str
    precision: str
    seed: int
    threads: int
    parameter_count: int
    flops_per_image: int
    stop_reason: StopReason  # COMPLETED, EARLY_STOPPING or CALLBACK
    resumed_from_epoch: int = 0
    memory_format: str = CHANNELS_LAST  # how the images and weights were laid out (the arithmetic depends on it)


@dataclass
class TrainedModel:
    """A finished trial's model, with what a listener (MLflow) may ask of it, computed only when asked."""

    model: nn.Module
    data: PreparedData  # what it trained on
    precision: str  # what it trained in
    memory_format: str = CHANNELS_LAST  # ...and in what layout

    def cpu_copy(self) -> nn.Module:
        """A float32, eval-mode copy on the CPU (`export_ready_copy`)."""
        return export_ready_copy(self.model)

    def val_predictions(self) -> torch.Tensor:
        """The predicted class of every validation image, in order, on the CPU."""
        return predict(self.model, self.data.val, precision=self.precision, memory_format=self.memory_format)

    def example_inputs(self, count: int) -> torch.Tensor:
        """The first `count` validation images as the model takes them (normalised float32), on the CPU."""
        return self.data.val.inputs(slice(0, count), None, None).cpu()


# --------------------------------------------------------------------------------------------------
# The loop


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class _Progress:
    """What changes from epoch to epoch, all of it saved in the checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_gain: int = 0
    plateau: Plateau = field(default_factory=Plateau)

    def record(self, metrics: EpochMetrics, model: nn.Module, p: dict[str, Any]) -> None:
        """An epoch is done: its metrics join the history, its weights are kept if it is the best so far,
        and reduce-on-plateau sees its val_loss."""
        self.epoch = metrics.epoch
        self.history.append(metrics)
        if metrics.val_accuracy > self.best_val_accuracy:
            self.best_epoch, self.best_val_accuracy = metrics.epoch, metrics.val_accuracy
            self.best_state = _state_copy(model)
            self.epochs_without_gain = 0
        else:
            self.epochs_without_gain += 1
        if p["schedule"] == "plateau":
            self.plateau.update(metrics.val_loss, p["plateau_patience"], p["lr_gamma"])

    def checkpoint_state(self) -> dict[str, Any]:
        """The progress as checkpoints.save_checkpoint stores it: plain values and tensors, in field order."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return dict(state, history=[m.as_dict() for m in self.history], plateau=asdict(self.plateau))

    @classmethod
    def from_checkpoint_state(cls, state: dict[str, Any]) -> _Progress:
        history, plateau = [EpochMetrics(**m) for m in state["history"]], Plateau(**state["plateau"])
        return cls(**dict(state, history=history, plateau=plateau))


@dataclass
class _Run:
    """What one fit trains and how: fixed from the first epoch to the last."""

    p: dict[str, Any]  # the resolved params
    device: torch.device
    precision: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    augment: Augment | NaturalAugment | None
    train_split: ResidentImages | FeatureSplit
    val_split: ResidentImages | FeatureSplit
    network: nn.Module  # what the splits feed: the model, or its head when they hold the backbone's features
    forward: Callable[[torch.Tensor], torch.Tensor]  # the network, compiled when asked
    input_format: torch.memory_format
    unfreeze: int  # fine-tuning: the epochs that train the head alone; 0: nothing is frozen by epoch
    micro_batches: int  # batches per epoch
    steps_per_epoch: int  # optimiser steps per epoch
    total_steps: int


@dataclass
class Network:
    """A run's model as `build` made it: its initial weights drawn from the run's seed, its size counted. Built before
    the rest of the run so that a search can tell a trial's size (and check a size constraint) before training it."""

    p: dict[str, Any]  # the resolved params
    model: nn.Module  # on the CPU, untrained
    seed: int
    threads: int  # the CPU threads the run is deterministic on
    parameter_count: int
    flops_per_image: int


def build(p: dict[str, Any], data: PreparedData, seed: int = 0, threads: int | None = None) -> Network:
    """The model the resolved params `p` describe for `data`, built as a reproducible run starts: deterministic
    kernels on a fixed thread count, every RNG seeded, then the model (its initial weights are the first draws).
    `train_network` trains it; nothing in between may draw from torch's RNG."""
    threads = reproducibility.make_deterministic(threads)
    reproducibility.seed_everything(seed)
    model = models.build_model(p, len(data.classes), data.input_shape, (data.mean, data.std))
    count, flops = models.count_parameters(model), models.flops_per_image(model, data.input_shape)
    return Network(p, model, seed, threads, count, flops)


def _build(network: Network, data: PreparedData, device: torch.device, precision: str, micro_batches: int,
           layout: str = CHANNELS_LAST) -> _Run:
    """The built model on its device (in `layout`: pick_memory_format), its optimiser and what it trains on."""
    p, model = network.p, network.model
    memory_format = MEMORY_FORMATS[layout]
    model = model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # as in export_ready_copy
    optimizer = make_optimizer(model, p)
    augment = make_augment(data.augment_policy(p["augment_policy"]), p["augment"], data.input_shape[-1])
    train_split: ResidentImages | FeatureSplit = data.train
    val_split: ResidentImages | FeatureSplit = data.val
    network_fed, input_format = model, memory_format
    if isinstance(model, models.ResNet18Classifier) and model.mode == "feature_extract" and augment is None:
        # The frozen backbone sees the same images every epoch: run it once per split, train the head on that.
        train_split = backbone_features(model, data.train, p["eval_batch_size"], precision, memory_format)
        val_split = backbone_features(model, data.val, p["eval_batch_size"], precision, memory_format)
        network_fed, input_format = model.head, torch.contiguous_format
    forward = torch.compile(network_fed) if p["compile"] else network_fed
    unfreeze = p["unfreeze_epoch"] if isinstance(model, models.ResNet18Classifier) and model.mode == "finetune" else 0
    steps_per_epoch = math.ceil(micro_batches / p["grad_accum_steps"])
    return _Run(p, device, precision, model, optimizer, augment, train_split, val_split, network_fed, forward,
                input_format, unfreeze, micro_batches, steps_per_epoch, p["epochs"] * steps_per_epoch)


def _optimizer_step(run: _Run, progress: _Progress) -> float:
    """One optimiser step at the schedule's learning rate; returns the lr factor it used."""
    p = run.p
    factor = lr_factor(p, progress.step, run.total_steps, run.steps_per_epoch, progress.plateau.scale)
    for g in run.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    if p["grad_clip"] > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), p["grad_clip"])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    return factor


def _train_epoch(run: _Run, progress: _Progress, generator: torch.Generator,
                 on_batch: Callable[[int, int], None] | None) -> EpochMetrics:
    """One epoch: every full batch of the training split (a step every grad_accum_steps of them), then
    the validation split. Raises Diverged on a non-finite loss, OutOfMemory when the device runs out."""
    p, device, precision = run.p, run.device, run.precision
    batch_size, accum = p["batch_size"], p["grad_accum_steps"]
    epoch = progress.epoch + 1
    started = time.perf_counter()
    if run.unfreeze and isinstance(run.model, models.ResNet18Classifier):
        run.model.freeze_backbone(epoch <= run.unfreeze)
    run.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for i, (x, y) in enumerate(run.train_split.batches(batch_size, generator, run.augment, drop_last=True)):
            if i % accum == 0:  # a new accumulation group: how many micro-batches it holds
                group = min(accum, run.micro_batches - i)
            with autocast(device, precision):
                logits = run.forward(x.contiguous(memory_format=run.input_format)).float()
                loss = F.cross_entropy(logits, y, label_smoothing=p["label_smoothing"])
            if not torch.isfinite(loss):
                raise Diverged(epoch, progress.step, loss.item())
            # Equal micro-batches, so the mean of their means is the big batch's mean.
            (loss / group).backward()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if i % accum == group - 1:
                factor = _optimizer_step(run, progress)
            if on_batch is not None:
                on_batch(i + 1, run.micro_batches)
        seen = run.micro_batches * batch_size
        train_loss, train_accuracy = loss_sum.item() / seen, correct.item() / seen
        train_seconds = time.perf_counter() - started
        val_loss, val_accuracy = evaluate(run.network, run.val_split, p["eval_batch_size"], precision, run.input_format)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemory(batch_size, str(device), str(exc)) from exc
        raise
    return EpochMetrics(
        epoch=epoch, train_loss=train_loss, train_accuracy=train_accuracy, val_loss=val_loss,
        val_accuracy=val_accuracy, lr=p["lr"] * factor, epoch_seconds=time.perf_counter() - started,
        images_per_second=seen / train_seconds,
    )


def _stop_reason(p: dict[str, Any], progress: _Progress, metrics: EpochMetrics,
                 callbacks: Iterable[Callback]) -> StopReason:
    """Why training stops after this epoch: COMPLETED when nothing stops it early."""
    patience = p["early_stopping_patience"]
    early = patience and progress.epochs_without_gain >= patience
    stop_reason = StopReason.EARLY_STOPPING if early else StopReason.COMPLETED
    # Every callback sees every epoch, even when an earlier one asked to stop.
    return StopReason.CALLBACK if any([bool(callback(metrics)) for callback in callbacks]) else stop_reason


def fit(params: dict[str, Any], data: PreparedData, device: str | torch.device | None = None,
        callbacks: Iterable[Callback] = (), seed: int = 0, checkpoint: Path | None = None, threads: int | None = None,
        on_batch: Callable[[int, int], None] | None = None, on_resume: Resumed | None = None,
        memory_format: str | None = None) -> TrainResult:
    """`build` the model `params` describes (seeded, on `threads` CPU threads), then `train_network` it on `data`."""
    network = build(resolve_params(params), data, seed, threads)
    return train_network(network, data, device, callbacks, checkpoint, on_batch, on_resume, memory_format)


def train_network(network: Network, data: PreparedData, device: str | torch.device | None = None,
                  callbacks: Iterable[Callback] = (), checkpoint: Path | None = None,
                  on_batch: Callable[[int, int], None] | None = None, on_resume: Resumed | None = None,
                  memory_format: str | None = None) -> TrainResult:
    """Train the model `build` made (its params, seed and threads) on `data`: the history, the best-epoch model.

    `device` defaults to the data's (they must agree). With `checkpoint`, progress is saved atomically after every
    epoch and a matching checkpoint is resumed: `on_resume(history)` is told the epochs it holds (callbacks see
    only the epochs trained now). `on_batch(done, total)` follows every batch (it may raise to stop). Raises
    ParamError for a batch larger than the data, Diverged on a non-finite loss, OutOfMemory when the device runs out.
    """
    p, seed = network.p, network.seed
    device = torch.device(device) if device is not None else data.train.device
    if device != data.train.device:
        raise ValueError(f"data lives on {data.train.device}, training asked for {device}: prepare it there")
    micro_batches = len(data.train) // p["batch_size"]
    if micro_batches == 0:
        raise ParamError(f"parameters: batch_size = {p['batch_size']} exceeds the {len(data.train)} training images")
    precision = pick_precision(p["precision"], device)
    allocator.keep_freed_memory()
    layout = pick_memory_format(memory_format, device)
    run = _build(network, data, device, precision, micro_batches, layout)

    generator = torch.Generator().manual_seed(seed)
    fingerprint = params_fingerprint(p, seed, data)
    progress = _Progress()
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(Path(checkpoint), fingerprint, run.model, run.optimizer, generator)
        progress = _Progress.from_checkpoint_state(state)
        if on_resume is not None:
            on_resume(list(progress.history))
    resumed_from = progress.epoch
    stop_reason = StopReason.COMPLETED
    while progress.epoch < p["epochs"] and stop_reason == StopReason.COMPLETED:
        metrics = _train_epoch(run, progress, generator, on_batch)
        progress.record(metrics, run.model, p)
        if checkpoint is not None:
            save_checkpoint(Path(checkpoint), fingerprint, run.model, run.optimizer, progress.checkpoint_state(),
                            generator)
        stop_reason = _stop_reason(p, progress, metrics, callbacks)

    if progress.best_state is not None:
        run.model.load_state_dict(progress.best_state)
    return TrainResult(
        params=p, history=progress.history, best_epoch=progress.best_epoch,
        best_val_accuracy=progress.best_val_accuracy, model=run.model, device=str(device), precision=precision,
        seed=seed, threads=network.threads, parameter_count=network.parameter_count,
        flops_per_image=network.flops_per_image, stop_reason=stop_reason, resumed_from_epoch=resumed_from,
        memory_format=layout,
    )
