"""The trainer's checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint holds the weights, the optimiser, every RNG and the data order's generator, plus the
trainer's progress (epoch, step, history, best epoch so far: plain values and tensors, as train.py's
`_Progress` gives them). It is resumed only by the run it belongs to: the resolved params, the seed and
the data split must match its fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.infra.fileio import write_atomic
from pipeline.spec.errors import BadInput
from pipeline.training import reproducibility

if TYPE_CHECKING:
    from pipeline.data.loading import PreparedData

CHECKPOINT_VERSION = 1


class ForeignCheckpoint(BadInput):
    """A checkpoint this run cannot continue: unreadable, or made by other params, seed or data."""


def params_fingerprint(p: dict[str, Any], seed: int, data: PreparedData) -> str:
    """What a checkpoint must match to be resumed: the resolved params, the seed and the data split."""
    identity = {"params": p, "seed": seed, "dataset": data.dataset, "split": data.split_hash}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    progress: dict[str, Any], generator: torch.Generator) -> None:
    payload = {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **progress,
        "rng": reproducibility.rng_state(),
        "data_generator": generator.get_state(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore the model, optimiser, RNGs and generator from `path`; return the progress saved with them
    (its best-epoch weights on the model's device)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ForeignCheckpoint(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from None
    if not isinstance(payload, dict):  # a weights-only file of something else (a bare tensor, a list)
        raise ForeignCheckpoint(f"{path}: not a checkpoint ({type(payload).__name__}); delete it to start over")
    if payload.get("version") != CHECKPOINT_VERSION or payload.get("fingerprint") != fingerprint:
        raise ForeignCheckpoint(f"{path}: checkpoint belongs to other parameters, seed or data; delete it to start "
                                "over")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    reproducibility.set_rng_state(payload["rng"])
    generator.set_state(payload["data_generator"])
    device = next(model.parameters()).device
    best_state = payload["best_state"]
    progress = {k: v for k, v in payload.items()
                if k not in ("version", "fingerprint", "model", "optimizer", "rng", "data_generator")}
    progress["best_state"] = {k: v.to(device) for k, v in best_state.items()} if best_state else None
    return progress
