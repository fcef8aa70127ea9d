"""`make train`: one training run of a params dict on a dataset, no study (`train_one`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.data import loading
from pipeline.spec import paths
from pipeline.spec.sources import DEFAULT_VAL_SIZE
from pipeline.training import train
from pipeline.training.device import pick_device, pick_precision


@dataclass(frozen=True)
class TrainOptions:
    dataset: Any  # a dataset name or a sources.FolderSource
    root: Path = paths.DATA_ROOT
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    val_size: int | None = DEFAULT_VAL_SIZE
    train_limit: int | None = None
    val_limit: int | None = None
    checkpoint: Path | None = None  # saved every epoch; resumed when it exists


class TrainView(Protocol):
    def header(self, text: str) -> None: ...
    def batch_done(self, done: int, total: int) -> None: ...
    def epoch_ended(self, metrics: train.EpochMetrics) -> None: ...


def train_one(params: dict[str, Any], options: TrainOptions, view: TrainView) -> train.TrainResult:
    """`make train`: train the resolved params (hparams.resolve_params: bad parameters stop before the data is
    loaded) once on the dataset and return the result (history, best epoch, model)."""
    device = pick_device(options.device)
    prepared = loading.prepare(options.dataset, options.root, device, val_size=options.val_size,
                               train_limit=options.train_limit, val_limit=options.val_limit)
    view.header(f"{params['model']} on {prepared.dataset} ({len(prepared.train):,} train / "
                f"{len(prepared.val):,} val, {'x'.join(map(str, prepared.input_shape))} {prepared.placement}, split "
                f"{prepared.split_hash}), {device}, precision {pick_precision(params['precision'], device)}, "
                f"seed {options.seed}")
    network = train.build(params, prepared, options.seed, options.threads)
    return train.train_network(network, prepared, device, callbacks=[view.epoch_ended], checkpoint=options.checkpoint,
                               on_batch=view.batch_done)
