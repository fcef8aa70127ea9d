"""`make predict`: classify picture files with an export, reading only its data files.

The network is rebuilt from config.json (`params`, classes, input shape, mean/std) and its weights read
from weights.pt with torch's weights-only reader: nothing in an export, which may come from anyone, runs
code here. model.pt2 is not loaded: a torch.export archive is unpickled when loaded, so it is a program,
for deployments that trust its source. Each picture is prepared by `images.open_picture` as config.json
says (the function that landed the training images) and scored with the export's per-channel mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.commands import verify_export
from pipeline.data.images import PictureError, Preprocessing, open_picture
from pipeline.spec import hparams
from pipeline.spec.errors import BadInput
from pipeline.spec.sources import DIGITS
from pipeline.training import models

# Pictures above this are refused from their header, before decoding: a 50 MP picture (the largest phone
# cameras') decodes to 150 MB of RGB, while one of hundreds of megapixels would take gigabytes.
MAX_MEGAPIXELS = 50
CAP_HINT = f"predict reads pictures up to {MAX_MEGAPIXELS} megapixels"
REEXPORT = "export it again with `make export-best STUDY=...`"


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), best first


def export_preprocessing(config: dict) -> Preprocessing:
    """How this export's pictures are prepared: from config.json, or, for exports written before it was
    recorded (MNIST-like data only), the 28x28 gray preparation of the dataset they were trained on."""
    if "preprocessing" in config:
        return Preprocessing(**config["preprocessing"])
    dataset = config["dataset"]
    return Preprocessing(28, "gray", dataset if dataset in DIGITS else "photo")


def _per_channel(value: float | list[float], channels: int) -> tuple[float, ...]:
    """config.json's mean or std, one value per channel (exports before per-channel statistics hold one number)."""
    values = tuple(float(v) for v in value) if isinstance(value, list) else (float(value),) * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} values for {channels} channels")
    return values


def load_export(export_dir: Path) -> tuple[torch.nn.Module, dict, Preprocessing]:
    """The export's network (eval mode, CPU) rebuilt from config.json with weights.pt's weights; its config and
    how its pictures are prepared."""
    config_path, weights = export_dir / "config.json", export_dir / "weights.pt"
    if not config_path.is_file() or not weights.is_file():
        raise BadInput(f"{export_dir} is not an export that predict reads (no config.json / weights.pt); run "
                       "`make export-best STUDY=...` first or point EXPORT= at one")
    try:
        config = json.loads(config_path.read_text())
        preprocessing = export_preprocessing(config)
        input_shape = tuple(config.get("input_shape") or preprocessing.shape)
        classes = config["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes must be a list of names")
        stats = (_per_channel(config["mean"], input_shape[0]), _per_channel(config["std"], input_shape[0]))
        model = models.build_model(hparams.resolve_params(config["params"]), len(classes), input_shape, stats,
                                   imagenet=False)
    except Exception as exc:  # a file from elsewhere: anything in it may be missing or malformed
        detail = " ".join(str(exc).split())[:300]
        raise BadInput(f"{config_path}: does not describe a network predict can build ({type(exc).__name__}: "
                       f"{detail}); {REEXPORT}") from None
    state = models.read_state_dict(weights, str(weights), REEXPORT)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise BadInput(f"{weights}: does not fit the network config.json describes ({detail}); {REEXPORT}") from None
    return model.eval(), config, preprocessing


def predict(export_dir: Path, paths: list[Path], top_k: int = 3) -> tuple[list[Prediction], list[str]]:
    """Classify image files with an export; returns the predictions and one error line per unusable file.

    Each picture is prepared by `images.prepare_picture`, the function that landed the training images.
    """
    model, config, preprocessing = load_export(export_dir)
    images, readable, errors = [], [], []
    for path in paths:
        try:
            images.append(open_picture(path, preprocessing, MAX_MEGAPIXELS, CAP_HINT))
            readable.append(path)
        except PictureError as exc:
            errors.append(f"{exc}; skipped")
    if not images:
        return [], errors
    batch = torch.from_numpy(np.stack(images))
    scores = verify_export.logits(model, batch, config["mean"], config["std"], verify_export.EVAL_BATCH)
    probabilities = scores.softmax(1)
    values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    predictions = [Prediction(path, [(config["classes"][i], float(v)) for v, i in zip(vs, ix, strict=True)])
                   for path, vs, ix in zip(readable, values.tolist(), indices.tolist(), strict=True)]
    return predictions, errors
