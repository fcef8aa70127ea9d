"""The optimiser and the learning-rate schedule of a trial, from its resolved params.

The learning rate is a pure function of the optimiser step (`lr_factor`), so resuming a checkpoint
needs no scheduler object; only reduce-on-plateau carries a small state (`Plateau`), which the
checkpoint keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.training import models

# One-cycle shape, as torch's OneCycleLR defaults: start at lr/25, peak at 30%, end at lr/25e4.
ONECYCLE_PEAK_AT, ONECYCLE_START_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4


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
