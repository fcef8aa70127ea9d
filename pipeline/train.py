"""The trainer: one function, `fit`, that trains a model from a plain dict of hyperparameters.

It knows neither Optuna nor MLflow. After every epoch it calls each callback with the epoch's
`EpochMetrics`; a callback that returns True stops training (and may raise, e.g. to prune).
Everything it needs to continue bit for bit (weights, optimiser, RNG and data-order state, the
best epoch so far) goes into an atomic checkpoint at every epoch boundary.

The learning rate is a pure function of the optimiser step (`lr_factor`), so resuming needs no
scheduler object; only reduce-on-plateau carries a small state, which the checkpoint keeps.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import models, reproducibility
from pipeline.data import FeatureSplit, PreparedData, ResidentImages, make_augment
from pipeline.errors import BadInput, ParamError
from pipeline.fileio import write_atomic
from pipeline.params import Bool, Choice, Float, Int, resolve
from pipeline.sources import AUGMENT_POLICIES

TRAIN_SPECS = {
    "epochs": Int(5, 1, 10_000),
    "batch_size": Int(64, 1, 65_536),
    "grad_accum_steps": Int(1, 1, 1024, help="effective batch = batch_size x grad_accum_steps"),
    "optimizer": Choice("adamw", ("adam", "adamw", "sgd"), "sgd uses Nesterov momentum"),
    "lr": Float(3e-3, 0.0, 1e6, low_open=True),
    "momentum": Float(0.9, 0.0, 1.0, high_open=True, help="SGD momentum"),
    "weight_decay": Float(5e-4, 0.0, 1.0, help="not applied to biases and norm weights"),
    "schedule": Choice("onecycle", ("onecycle", "cosine", "step", "plateau", "none")),
    "warmup_fraction": Float(0.05, 0.0, 1.0, high_open=True, help="cosine: linear warm-up share of all steps"),
    "step_epochs": Int(2, 1, 10_000, help="step: multiply lr by lr_gamma every step_epochs"),
    "lr_gamma": Float(0.5, 0.0, 1.0, low_open=True, high_open=True, help="step and plateau decay factor"),
    "plateau_patience": Int(1, 0, 1000, help="plateau: epochs without val_loss improvement before decay"),
    "label_smoothing": Float(0.0, 0.0, 1.0, high_open=True),
    "grad_clip": Float(0.0, 0.0, 1e6, help="max gradient norm; 0: off"),
    "early_stopping_patience": Int(0, 0, 10_000, help="epochs without val_accuracy gain; 0: off"),
    "augment": Float(0.5, 0.0, 4.0, help="augmentation strength; digits 1 = 10 degrees, 10% shift, 10% zoom; "
                     "natural 1 = crop padded by 1/8, flips, 20% colour jitter; 0: off"),
    "augment_policy": Choice("auto", AUGMENT_POLICIES, "digits: affine, never flips; natural: crop, flip, jitter; "
                             "auto: digits for MNIST-like data, natural otherwise"),
    "unfreeze_epoch": Int(0, 0, 10_000, help="ResNet fine-tuning: epochs that train the head alone first"),
    "precision": Choice("auto", ("auto", "fp32", "bf16"), "auto: bf16 where the hardware has it"),
    "compile": Bool(False, "torch.compile the model (worth it on CUDA)"),
    "eval_batch_size": Int(1000, 1, 65_536),
}
PARAM_SPECS = {**models.MODEL_SPECS, **TRAIN_SPECS}

# One-cycle shape, as torch's OneCycleLR defaults: start at lr/25, peak at 30%, end at lr/25e4.
ONECYCLE_PEAK_AT, ONECYCLE_START_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4
CHECKPOINT_VERSION = 1


def resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    """All model and training keys, checked, with defaults filled; unknown keys are refused."""
    return resolve(PARAM_SPECS, params)


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
    stop_reason: str  # "completed", "early_stopping" or "callback"
    resumed_from_epoch: int = 0


# --------------------------------------------------------------------------------------------------
# Device and precision


def pick_device(requested: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless one is requested."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512-BF16: bf16 matmuls/convs run natively instead of being emulated."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def pick_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":  # GPU-only: Ampere and newer have bf16
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule


def make_optimizer(model: nn.Module, p: dict[str, Any]) -> torch.optim.Optimizer:
    groups = models.parameter_groups(model, p, p["lr"], p["weight_decay"])
    # The fused kernels update every tensor in one pass: for small models on CPU the per-tensor
    # Python loop of the default implementation costs as much as the backward pass.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if p["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=p["lr"], momentum=p["momentum"], nesterov=p["momentum"] > 0, fused=fused)
    optimizer_class = torch.optim.AdamW if p["optimizer"] == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=p["lr"], fused=fused)


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2


def lr_factor(p: dict[str, Any], step: int, total_steps: int, steps_per_epoch: int,
              plateau_scale: float = 1.0) -> float:
    """Multiplier on each group's base lr for optimiser step `step` (0-based) out of `total_steps`."""
    schedule = p["schedule"]
    if schedule == "onecycle":
        peak = max(1, int(ONECYCLE_PEAK_AT * total_steps))
        if step < peak:
            return _cosine(1 / ONECYCLE_START_DIV, 1.0, step / peak)
        final = 1 / (ONECYCLE_START_DIV * ONECYCLE_FINAL_DIV)
        return _cosine(1.0, final, (step - peak) / max(1, total_steps - 1 - peak))
    if schedule == "cosine":
        warmup = int(p["warmup_fraction"] * total_steps)
        if step < warmup:
            return (step + 1) / warmup
        return _cosine(1.0, 0.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "step":
        return p["lr_gamma"] ** ((step // steps_per_epoch) // p["step_epochs"])
    if schedule == "plateau":
        return plateau_scale
    return 1.0


@dataclass
class Plateau:
    """Reduce-on-plateau: multiply the lr by lr_gamma after `patience` epochs without a val_loss gain."""

    scale: float = 1.0
    best_loss: float = math.inf
    bad_epochs: int = 0

    def update(self, val_loss: float, patience: int, gamma: float) -> None:
        if val_loss < self.best_loss * (1 - 1e-4):
            self.best_loss, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > patience:
            self.scale *= gamma
            self.bad_epochs = 0


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, split: ResidentImages | FeatureSplit, batch_size: int, precision: str = "fp32",
             memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over a whole split, in order."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.device)
    with autocast(split.device, precision):
        for x, y in split.batches(batch_size):
            logits = model(x.contiguous(memory_format=memory_format)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return loss_sum.item() / len(split), correct.item() / len(split)


@torch.no_grad()
def backbone_features(model: models.ResNet18Classifier, split: ResidentImages, batch_size: int, precision: str,
                      memory_format: torch.memory_format) -> FeatureSplit:
    """A split's images through the frozen backbone (eval mode, in order), once: [N, 512] float32."""
    model.eval()
    with autocast(split.device, precision):
        features = [model.features(x.contiguous(memory_format=memory_format)).float() for x, _ in
                    split.batches(batch_size)]
    return FeatureSplit(torch.cat(features), split.labels)


@torch.no_grad()
def predict(model: nn.Module, split: ResidentImages, batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    """Predicted class of every image of a split, in order, on the CPU (confusion matrices, reports)."""
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if precision == "bf16" else torch.contiguous_format
    predicted = []
    with autocast(split.device, precision):
        for x, _ in split.batches(batch_size):
            predicted.append(model(x.contiguous(memory_format=memory_format)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(predicted)


def export_ready_copy(model: nn.Module) -> nn.Module:
    """A float32, contiguous, eval-mode copy on the CPU: what torch.export and a CPU user should get."""
    return copy.deepcopy(model).to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()


# --------------------------------------------------------------------------------------------------
# Checkpoints


def params_fingerprint(p: dict[str, Any], seed: int, data: PreparedData) -> str:
    """What a checkpoint must match to be resumed: the resolved params, the seed and the data split."""
    identity = {"params": p, "seed": seed, "dataset": data.dataset, "split": data.split_hash}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]


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


def save_checkpoint(path: Path, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    progress: _Progress, generator: torch.Generator) -> None:
    payload = {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": progress.epoch,
        "step": progress.step,
        "history": [m.as_dict() for m in progress.history],
        "best_epoch": progress.best_epoch,
        "best_val_accuracy": progress.best_val_accuracy,
        "best_state": progress.best_state,
        "epochs_without_gain": progress.epochs_without_gain,
        "plateau": asdict(progress.plateau),
        "rng": reproducibility.rng_state(),
        "data_generator": generator.get_state(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> _Progress:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from None
    if payload.get("version") != CHECKPOINT_VERSION or payload.get("fingerprint") != fingerprint:
        raise BadInput(f"{path}: checkpoint belongs to other parameters, seed or data; delete it to start over")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    reproducibility.set_rng_state(payload["rng"])
    generator.set_state(payload["data_generator"])
    device = next(model.parameters()).device
    best_state = payload["best_state"]
    return _Progress(
        epoch=payload["epoch"],
        step=payload["step"],
        history=[EpochMetrics(**m) for m in payload["history"]],
        best_epoch=payload["best_epoch"],
        best_val_accuracy=payload["best_val_accuracy"],
        best_state={k: v.to(device) for k, v in best_state.items()} if best_state else None,
        epochs_without_gain=payload["epochs_without_gain"],
        plateau=Plateau(**payload["plateau"]),
    )


# --------------------------------------------------------------------------------------------------
# The loop


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # CPU allocator
    )


def fit(params: dict[str, Any], data: PreparedData, device: str | torch.device | None = None,
        callbacks: Iterable[Callback] = (), seed: int = 0, checkpoint: Path | None = None,
        threads: int | None = None, on_batch: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train the model `params` describes on `data` and return the history and best-epoch model.

    `device` defaults to the data's device (they must agree). With `checkpoint`, progress is saved
    atomically after every epoch and an existing matching checkpoint is resumed. `on_batch(done,
    total)` is called after every batch (progress displays; it may raise to stop). Raises ParamError before training
    for bad params, Diverged on a non-finite loss, OutOfMemory when the device runs out of memory.
    """
    p = resolve_params(params)
    device = torch.device(device) if device is not None else data.train.device
    if device != data.train.device:
        raise ValueError(f"data lives on {data.train.device}, training asked for {device}: prepare it there")
    batch_size, accum = p["batch_size"], p["grad_accum_steps"]
    micro_batches = len(data.train) // batch_size
    if micro_batches == 0:
        raise ParamError(f"parameters: batch_size = {batch_size} exceeds the {len(data.train)} training images")
    precision = pick_precision(p["precision"], device)
    threads = reproducibility.make_deterministic(threads)
    reproducibility.seed_everything(seed)

    model = models.build_model(p, len(data.classes), data.input_shape, (data.mean, data.std))
    parameter_count, flops = models.count_parameters(model), models.flops_per_image(model, data.input_shape)
    # channels_last lets oneDNN/cuDNN pick their fast NHWC convolution kernels.
    memory_format = torch.channels_last if precision == "bf16" or device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, p)
    augment = make_augment(data.augment_policy(p["augment_policy"]), p["augment"], data.input_shape[-1])
    train_split, val_split, network, input_format = data.train, data.val, model, memory_format
    if isinstance(model, models.ResNet18Classifier) and model.mode == "feature_extract" and augment is None:
        # The frozen backbone sees the same images every epoch: run it once per split, train the head on that.
        train_split = backbone_features(model, data.train, p["eval_batch_size"], precision, memory_format)
        val_split = backbone_features(model, data.val, p["eval_batch_size"], precision, memory_format)
        network, input_format = model.head, torch.contiguous_format
    forward = torch.compile(network) if p["compile"] else network
    unfreeze = p["unfreeze_epoch"] if isinstance(model, models.ResNet18Classifier) and model.mode == "finetune" else 0

    steps_per_epoch = math.ceil(micro_batches / accum)
    total_steps = p["epochs"] * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    fingerprint = params_fingerprint(p, seed, data)
    progress = _Progress()
    if checkpoint is not None and Path(checkpoint).is_file():
        progress = load_checkpoint(Path(checkpoint), fingerprint, model, optimizer, generator)
    resumed_from = progress.epoch
    stop_reason = "completed"

    while progress.epoch < p["epochs"] and stop_reason == "completed":
        epoch = progress.epoch + 1
        started = time.perf_counter()
        if unfreeze:
            model.freeze_backbone(epoch <= unfreeze)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        try:
            for i, (x, y) in enumerate(train_split.batches(batch_size, generator, augment, drop_last=True)):
                if i % accum == 0:  # a new accumulation group: how many micro-batches it holds
                    group = min(accum, micro_batches - i)
                with autocast(device, precision):
                    logits = forward(x.contiguous(memory_format=input_format)).float()
                    loss = F.cross_entropy(logits, y, label_smoothing=p["label_smoothing"])
                if not torch.isfinite(loss):
                    raise Diverged(epoch, progress.step, loss.item())
                # Equal micro-batches, so the mean of their means is the big batch's mean.
                (loss / group).backward()
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                if i % accum == group - 1:
                    factor = lr_factor(p, progress.step, total_steps, steps_per_epoch, progress.plateau.scale)
                    for g in optimizer.param_groups:
                        g["lr"] = g["initial_lr"] * factor
                    if p["grad_clip"] > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    progress.step += 1
                if on_batch is not None:
                    on_batch(i + 1, micro_batches)
            seen = micro_batches * batch_size
            train_loss, train_accuracy = loss_sum.item() / seen, correct.item() / seen
            train_seconds = time.perf_counter() - started
            val_loss, val_accuracy = evaluate(network, val_split, p["eval_batch_size"], precision, input_format)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise OutOfMemory(batch_size, str(device), str(exc)) from exc
            raise

        metrics = EpochMetrics(
            epoch=epoch, train_loss=train_loss, train_accuracy=train_accuracy, val_loss=val_loss,
            val_accuracy=val_accuracy, lr=p["lr"] * factor, epoch_seconds=time.perf_counter() - started,
            images_per_second=seen / train_seconds,
        )
        progress.epoch = epoch
        progress.history.append(metrics)
        if val_accuracy > progress.best_val_accuracy:
            progress.best_epoch, progress.best_val_accuracy = epoch, val_accuracy
            progress.best_state = _state_copy(model)
            progress.epochs_without_gain = 0
        else:
            progress.epochs_without_gain += 1
        if p["schedule"] == "plateau":
            progress.plateau.update(val_loss, p["plateau_patience"], p["lr_gamma"])
        if checkpoint is not None:
            save_checkpoint(Path(checkpoint), fingerprint, model, optimizer, progress, generator)
        patience = p["early_stopping_patience"]
        if patience and progress.epochs_without_gain >= patience:
            stop_reason = "early_stopping"
        # Every callback sees every epoch, even when an earlier one asked to stop.
        if any([bool(callback(metrics)) for callback in callbacks]):
            stop_reason = "callback"

    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    return TrainResult(
        params=p, history=progress.history, best_epoch=progress.best_epoch,
        best_val_accuracy=progress.best_val_accuracy, model=model, device=str(device), precision=precision,
        seed=seed, threads=threads, parameter_count=parameter_count, flops_per_image=flops,
        stop_reason=stop_reason, resumed_from_epoch=resumed_from,
    )
