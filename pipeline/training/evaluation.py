"""Evaluation: a split's loss and accuracy, its predictions, a frozen backbone's features, and a model made ready for
export (float32, NCHW, eval mode, on the CPU)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.loading import FeatureSplit, ResidentImages
from pipeline.training import models
from pipeline.training.device import CONTIGUOUS, MEMORY_FORMATS, autocast


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
def predict(model: nn.Module, split: ResidentImages, batch_size: int = 512, precision: str = "fp32",
            memory_format: str = CONTIGUOUS) -> torch.Tensor:
    """Predicted class of every image of a split, in order, on the CPU (confusion matrices, reports)."""
    was_training = model.training
    model.eval()
    layout = MEMORY_FORMATS[memory_format]
    predicted = []
    with autocast(split.device, precision):
        for x, _ in split.batches(batch_size):
            predicted.append(model(x.contiguous(memory_format=layout)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(predicted)


def export_ready_copy(model: nn.Module) -> nn.Module:
    """A float32, contiguous, eval-mode copy on the CPU: what torch.export and a CPU user should get."""
    copied = copy.deepcopy(model).to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # torch's stubs lack memory_format beside a device
    return copied.eval()
