"""Measure this machine before planning: seconds per training and per validation image of the space's smallest,
typical and largest models, on the device, precision and thread count the trials will use.

The models are picked by FLOPs per image among configurations drawn from the study's space (seeded), and each is
timed by the trainer itself (`train.train_network`) on a few batches: a run of two batches to warm the kernels up,
then one of TIMED_BATCHES timed. A few seconds in all; the rates are cached per machine, library versions, device,
precision, threads and models (`<data root>/calibration.json`, plain JSON), so a second plan is instant.
PIPELINE_RATE_SCALE=<factor> makes the measured device that many times as fast (the tests' faked devices; 0.5 halves
it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from pipeline.data.loading import PreparedData
from pipeline.infra.fileio import write_atomic
from pipeline.search.plan import Rate, Rates
from pipeline.spec import hparams, space
from pipeline.spec.studies import StudySpec
from pipeline.training import models, train
from pipeline.training.device import pick_precision

DRAWN = 24  # configurations drawn from the space to find its smallest, typical and largest models
TIMED_BATCHES = 8
VAL_IMAGES = 2048  # fewer were measured at half the time per image a whole validation split takes
WARM_BATCHES = 2  # the warm-up's training and validation batches: the shapes the timed run uses, a quarter the cost
BOOKKEEPING_SECONDS = 0.3  # a trial's store writes and events beyond its training (measured: 0.1-0.3 s)
CACHE_FILE = "calibration.json"
SCALE_ENV = "PIPELINE_RATE_SCALE"


def representatives(spec: StudySpec, data: PreparedData) -> list[dict[str, Any]]:
    """Resolved params of the space's smallest, typical (median) and largest models by FLOPs per image."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed), direction="maximize")
    sized = []
    for _ in range(DRAWN if spec.space else 1):
        trial = study.ask()
        p = hparams.resolve_params(space.suggest(spec, trial))
        study.tell(trial, 0.0)
        try:
            model = models.build_model(p, len(data.classes), data.input_shape, imagenet=False)
        except Exception:  # a configuration that cannot build is the trial's problem, not the plan's
            continue
        sized.append((models.flops_per_image(model, data.input_shape), p))
    if not sized:
        return [hparams.resolve_params(space.trial_params(spec, {}))]
    sized.sort(key=lambda item: item[0])
    picked = [sized[0], sized[len(sized) // 2], sized[-1]]
    return [p for _, p in dict((flops, (flops, p)) for flops, p in picked).values()]


def rates(spec: StudySpec, data: PreparedData, device: torch.device, threads: int, root: Path,
          log: Any = None) -> Rates:
    """The rates of this study's models here (cached); PIPELINE_RATE_SCALE applied."""
    chosen = representatives(spec, data)
    key = cache_key(chosen, data, device, threads)
    cache = root / CACHE_FILE
    found = read_cache(cache).get(key)
    if found is not None:
        measured = Rates.from_dict(found)
    else:
        if log is not None:
            log(f"measuring this machine: {len(chosen)} models x {TIMED_BATCHES} batches on {threads} thread(s)")
        measured = measure(chosen, data, device, threads)
        write_cache(cache, {**read_cache(cache), key: measured.as_dict()})
    return measured.scaled(float(os.environ.get(SCALE_ENV, "1") or 1))


def measure(chosen: list[dict[str, Any]], data: PreparedData, device: torch.device, threads: int) -> Rates:
    """Time each model's training and validation images with the trainer on `threads` threads."""
    points, overheads = [], []
    for p in chosen:
        batch = p["batch_size"]
        images = min(TIMED_BATCHES * batch, len(data.train))
        sample = first_images(data, images)
        settings = {**p, "epochs": 1, "early_stopping_patience": 0}
        warm = first_images(data, WARM_BATCHES * batch, WARM_BATCHES * p["eval_batch_size"])
        train.train_network(train.build(settings, warm, 0, threads), warm, device)  # the kernels for these shapes
        started = time.perf_counter()
        network = train.build(settings, sample, 0, threads)
        built = time.perf_counter()
        metrics = train.train_network(network, sample, device).history[0]
        train_seconds = (images // batch) * batch / metrics.images_per_second
        eval_seconds = max(metrics.epoch_seconds - train_seconds, 0.0)
        points.append(Rate(network.flops_per_image, train_seconds / ((images // batch) * batch),
                           eval_seconds / len(sample.val)))
        overheads.append(built - started)
    return Rates(threads, tuple(sorted(points, key=lambda r: r.flops)),
                 max(overheads) + BOOKKEEPING_SECONDS)


def first_images(data: PreparedData, images: int, val_images: int = VAL_IMAGES) -> PreparedData:
    """The first `images` training and `val_images` validation images: enough to time, too few to cost."""
    return dataclasses.replace(data, train=data.train.subset(torch.arange(min(images, len(data.train)))),
                               val=data.val.subset(torch.arange(min(val_images, len(data.val)))))


def cache_key(chosen: list[dict[str, Any]], data: PreparedData, device: torch.device, threads: int) -> str:
    precision = pick_precision(chosen[0]["precision"], device)
    what = {"cpu": _cpu_name(), "torch": torch.__version__, "device": _device_name(device), "precision": precision,
            "threads": threads, "shape": list(data.input_shape), "models": chosen}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def read_cache(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write_cache(path: Path, cache: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cache, indent=1).encode())
    except OSError:
        pass  # a cache that cannot be written costs a few seconds next time, nothing else
