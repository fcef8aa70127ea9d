"""Every hyperparameter a trial can set: typed specs with defaults, allowed values, and one-line errors
that name the parameter.

`MODEL_SPECS` (the architecture, read by models.py) and `TRAIN_SPECS` (the trainer's, read by train.py)
together form `PARAM_SPECS`; `resolve_params` fills defaults and rejects unknown keys and bad values
before anything is built or trained. Free of torch, so that loading and checking a study file stays fast.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any

from pipeline.spec.errors import BadInput, ParamError
from pipeline.spec.sources import AUGMENT_POLICIES


@dataclass(frozen=True)
class Float:
    default: float | None
    low: float = -math.inf
    high: float = math.inf
    high_open: bool = False  # True for [low, high)
    low_open: bool = False  # True for (low, high]
    help: str = ""

    def expected(self) -> str:
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise ValueError
        return float(value)


@dataclass(frozen=True)
class Int:
    default: int | None
    low: int = 0
    high: int = 2**31 - 1
    help: str = ""

    def expected(self) -> str:
        return f"an integer in [{self.low}, {self.high}]"

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise ValueError
        return value


@dataclass(frozen=True)
class Choice:
    default: Any
    options: tuple
    help: str = ""

    def expected(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def check(self, value: Any) -> Any:
        if isinstance(value, bool) != isinstance(self.options[0], bool) or value not in self.options:
            raise ValueError
        return value


@dataclass(frozen=True)
class IntList:
    """A list of positive integers, e.g. channels per block; empty means "derive it from other keys"."""

    default: tuple[int, ...] = ()
    low: int = 1
    high: int = 4096
    help: str = ""

    def expected(self) -> str:
        return f"a list of integers in [{self.low}, {self.high}]"

    def check(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not self.low <= item <= self.high:
                raise ValueError
        return tuple(value)


def Bool(default: bool, help: str = "") -> Choice:  # noqa: N802 (reads like the other spec types)
    return Choice(default, (False, True), help)


Spec = Float | Int | Choice | IntList


def check_value(name: str, spec: Spec, value: Any, where: str = "parameters") -> Any:
    try:
        return spec.check(value)
    except ValueError:
        raise ParamError(f"{where}: {name} = {value!r} is not allowed; expected {spec.expected()}") from None


def resolve(specs: dict[str, Spec], params: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    """Defaults overlaid with `params`, every value checked; unknown keys are refused by name."""
    for name in params:
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamError(f"{where}: unknown parameter {name!r}{hint}; allowed: {', '.join(sorted(specs))}")
    resolved = {}
    for name, spec in specs.items():
        value = params.get(name, spec.default)
        resolved[name] = None if value is None else check_value(name, spec, value, where)
    return resolved


# --------------------------------------------------------------------------------------------------
# Precision

PRECISIONS = ("auto", "fp32", "bf16")
# What "auto" means can be set for the whole machine: PIPELINE_PRECISION=fp32 trains as a CPU without native bf16
# would (`make test-portable`, or a user comparing the two), bf16 as one with it. A study's own fixed value wins.
PRECISION_VARIABLE = "PIPELINE_PRECISION"


def machine_precision() -> str:
    """The machine-wide setting for "auto" (PIPELINE_PRECISION), checked: auto, fp32 or bf16."""
    chosen = os.environ.get(PRECISION_VARIABLE, "").strip().lower() or "auto"
    if chosen not in PRECISIONS:
        raise BadInput(f"{PRECISION_VARIABLE}={os.environ[PRECISION_VARIABLE]!r}: expected one of "
                       f"{', '.join(PRECISIONS)}; unset it to let the machine choose")
    return chosen


# --------------------------------------------------------------------------------------------------
# The architecture (models.py builds it)

FAMILIES = ("mlp", "cnn", "resnet18")
RESNET_MODES = ("scratch", "finetune", "feature_extract")

MODEL_SPECS: dict[str, Spec] = {
    "model": Choice("cnn", FAMILIES, "architecture family"),
    "activation": Choice("relu", ("relu", "gelu", "leaky_relu")),
    "batch_norm": Bool(True),
    "dropout": Float(0.0, 0.0, 1.0, high_open=True, help="before every fully connected layer"),
    # MLP: explicit widths, or depth x width shrinking by `mlp_taper` per layer.
    "mlp_widths": IntList((), help="hidden widths, e.g. [512, 256]; empty: from depth/width/taper"),
    "mlp_depth": Int(2, 1, 16),
    "mlp_width": Int(512, 8, 8192),
    "mlp_taper": Float(0.5, 0.0, 1.0, low_open=True, help="each hidden layer is this times the previous"),
    # CNN: blocks of 3x3 convolutions (+BatchNorm, activation), max-pooling, optional 1x1 transitions.
    "cnn_channels": IntList((), help="channels per block, e.g. [32, 64]; empty: from blocks/width/growth"),
    "cnn_blocks": Int(2, 1, 8),
    "cnn_width": Int(32, 4, 512),
    "cnn_growth": Float(2.0, 1.0, 4.0, help="channel multiplier from one block to the next"),
    "convs_per_block": Int(1, 1, 4),
    "pool": Choice("last", ("every", "alternate", "last", "none"), "which blocks end in a 2x2 max-pool"),
    "transition_ratio": Float(0.0, 0.0, 1.0, help="after each pool, a 1x1 conv to ratio x channels; 0: off"),
    "conv_dropout": Float(0.0, 0.0, 1.0, high_open=True, help="dropout after each pooled block"),
    "head": Choice("flatten", ("flatten", "gap"), "flatten + fully connected, or global average pooling"),
    "head_units": Int(128, 0, 8192, help="hidden units in the head; 0: straight to the classes"),
    # ResNet-18
    "resnet_mode": Choice("scratch", RESNET_MODES),
    "backbone_lr_scale": Float(0.1, 0.0, 1.0, low_open=True, help="fine-tuning: backbone lr = lr x this"),
    "input_size": Int(0, 0, 1024, help="ResNet-18: resize inputs to this on the device (224: the classic "
                      "ImageNet size); 0: as landed"),
}

# The classics as plain dicts: the 784-512-256-10 MLP with BatchNorm and dropout 0.5, and the two-block
# 32/64-channel CNN with a 128-unit head.
CLASSIC: dict[str, dict[str, Any]] = {
    "mlp": {"model": "mlp", "mlp_widths": [512, 256], "batch_norm": True, "dropout": 0.5},
    # Two blocks of two 3x3 convs (32 then 64 channels), each block max-pooled, flatten -> 128 -> 10.
    "cnn": {"model": "cnn", "cnn_channels": [32, 64], "convs_per_block": 2, "pool": "every", "head": "flatten",
            "head_units": 128, "conv_dropout": 0.0, "dropout": 0.25},
    "resnet18": {"model": "resnet18", "resnet_mode": "scratch"},
}


def model_params(params: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys of `params`, checked and completed with defaults."""
    return resolve(MODEL_SPECS, {k: v for k, v in params.items() if k in MODEL_SPECS}, "model parameters")


# --------------------------------------------------------------------------------------------------
# The trainer (train.py)

TRAIN_SPECS: dict[str, Spec] = {
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
    "precision": Choice("auto", PRECISIONS, "auto: bf16 where the hardware has it (PIPELINE_PRECISION sets it)"),
    "compile": Bool(False, "torch.compile the model (worth it on CUDA)"),
    # 128: a batch whose activations stay under glibc's mmap threshold (32 MiB), so evaluation reuses freed memory
    # (allocator.py) instead of faulting fresh pages in every batch: a 48-wide three-block CNN evaluated 5,000
    # images in 2.2 s at 128 against 4.2 s at 1000. Runs recorded before it evaluated at LEGACY_EVAL_BATCH_SIZE.
    "eval_batch_size": Int(128, 1, 65_536),
}
PARAM_SPECS: dict[str, Spec] = {**MODEL_SPECS, **TRAIN_SPECS}
# The evaluation batch of every run recorded before runs recorded theirs (TrialRecord.eval_batch_size): a replay
# uses it, since the batch changes the last bits of the validation loss.
LEGACY_EVAL_BATCH_SIZE = 1000


def resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    """All model and training keys, checked, with defaults filled; unknown keys are refused."""
    return resolve(PARAM_SPECS, params)
