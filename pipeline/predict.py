"""`make predict`: classify picture files with an export, using torch alone and the export's own files.

Each picture is prepared by `images.open_picture` as the export's config.json says (the function that
landed the training images), then scored by model.pt2 with the export's per-channel mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import verify_export
from pipeline.errors import BadInput
from pipeline.images import PictureError, Preprocessing, open_picture
from pipeline.sources import DIGITS

EVAL_BATCH = 1000


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


def predict(export_dir: Path, paths: list[Path], top_k: int = 3) -> tuple[list[Prediction], list[str]]:
    """Classify image files with an export; returns the predictions and one error line per unreadable file.

    Each picture is prepared by `images.prepare_picture`, the function that landed the training images.
    """
    config_path = export_dir / "config.json"
    if not config_path.is_file() or not (export_dir / "model.pt2").is_file():
        raise BadInput(f"{export_dir} is not an export (no config.json / model.pt2); run `make export-best "
                       "STUDY=...` first or point EXPORT= at one")
    config = json.loads(config_path.read_text())
    preprocessing = export_preprocessing(config)
    model = torch.export.load(str(export_dir / "model.pt2")).module()
    images, readable, errors = [], [], []
    for path in paths:
        try:
            images.append(open_picture(path, preprocessing))
            readable.append(path)
        except PictureError as exc:
            errors.append(f"{exc}; skipped")
    if not images:
        return [], errors
    batch = torch.from_numpy(np.stack(images))
    probabilities = verify_export.logits(model, batch, config["mean"], config["std"], EVAL_BATCH).softmax(1)
    values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    predictions = [Prediction(path, [(config["classes"][i], float(v)) for v, i in zip(vs, ix, strict=True)])
                   for path, vs, ix in zip(readable, values.tolist(), indices.tolist(), strict=True)]
    return predictions, errors
