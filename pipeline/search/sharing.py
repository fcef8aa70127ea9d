"""Several small trials on one GPU, where that is faster: measured, then chosen.

A small model leaves a GPU mostly idle: its kernels are short, and the launches and the Python between them take
longer. k trials sharing the GPU (k worker processes on it) can then train nearly k times the images of one. Whether
they do on this device is measured, not assumed: k processes train the space's largest model at once, started
together after their warm-up, for each k in SHARES. The result is each trial's slowdown (its seconds per
image beside k-1 others, over its seconds alone). WORKERS=auto puts on each GPU the k whose trials together train the
most images a second (`per_device`), and the plan counts each rung-0 trial at its shared pace (`shared_rates`).
Cached beside the calibration's rates, per machine, library versions, device, precision, threads and model.

The measurement runs on any device (the tests run it on the CPU, where two 1-thread processes share two cores);
only a GPU's WORKERS=auto acts on it: on a CPU the cores are shared out by threads instead (workers.auto_count).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.data.loading import PreparedData, ResidentImages
from pipeline.search import calibration, workers
from pipeline.search.plan import Rates
from pipeline.spec.studies import StudySpec

SHARES = (1, 2, 4, 8)  # trials at once on one device, measured in turn
# More trials on a device must train this many times the images a second of fewer: each is a process with its own
# copy of the data and CUDA context, so a gain within the measurement's noise is not worth them.
SHARING_GAIN = 1.15
TIMED_BATCHES = 24  # each process's timed batches: a GPU's are short, and the processes must overlap for long
START_TIMEOUT = 300.0  # seconds for the processes to import torch, warm up and time their batches
TIMED_OUT = "timed out"


@dataclasses.dataclass(frozen=True)
class Timing:
    """One process's timed batches: when they ran (time.monotonic, one clock for every process on the host) and
    its seconds per training image."""

    pid: int
    started: float
    ended: float
    seconds_per_image: float


def per_device(slowdowns: dict[int, float]) -> int:
    """How many trials share one device: the k whose trials together train the most images a second (k / its
    slowdown), a larger k only where it beats the best smaller one by SHARING_GAIN."""
    best = 1
    for k in sorted(slowdowns):
        if k > best and k / slowdowns[k] >= SHARING_GAIN * best / slowdowns.get(best, 1.0):
            best = k
    return best


def shared_rates(alone: Rates, slowdowns: dict[int, float], sharing: int) -> Rates:
    """`alone`'s rates for a trial that shares its device with `sharing` - 1 others (the nearest k measured). Only
    its images slow down: what a trial costs beyond them (building, recording) is each process's own CPU work."""
    if sharing <= 1:
        return alone
    nearest = min(slowdowns, key=lambda k: (abs(k - sharing), -k))
    return dataclasses.replace(alone.scaled(1 / slowdowns[nearest]), trial_seconds=alone.trial_seconds)


def measured_here(spec: StudySpec, data: PreparedData, device: torch.device, threads: int | None, root: Path,
                  log: Any = None) -> dict[int, float]:
    """The slowdowns on this host's device, each process with the threads a worker would get (`threads`, else the
    cores split among all the workers of the host's GPUs)."""
    return slowdowns(spec, data, device, threads, workers.devices(device.type), root, log)


def slowdowns(spec: StudySpec, data: PreparedData, device: torch.device, threads: int | None, gpus: int, root: Path,
              log: Any = None, shares: tuple[int, ...] = SHARES) -> dict[int, float]:
    """Each k's slowdown of a trial beside k-1 others on `device` (1.0 for k = 1), measured or read from the cache.
    Measured on the space's largest model: the one the plan counts on (plan.Rates.promoted_flops), and the one
    that needs the device most. A k whose processes fail ends the measurement there (more would fail too); a
    measurement cut short by a timeout, or failing alone, is not cached (the next run measures again)."""
    params = calibration.representatives(spec, data)[-1]
    key = "shared:" + calibration.cache_key([params], data, device, threads or 0) + f":{gpus}:" + ",".join(
        map(str, shares))
    cache = root / calibration.CACHE_FILE
    found = calibration.read_cache(cache).get(key)
    if isinstance(found, dict):
        return {int(k): float(v) for k, v in found.items()}
    say = log or (lambda line: None)
    say(f"measuring how many trials share the {device.type} best: {', '.join(map(str, shares))} at once")
    pace: dict[int, float] = {}
    lasting = True
    for k in sorted({1, *shares}):
        together = timed_together(params, data, device, workers.threads_each(k * gpus, threads), k)
        if isinstance(together, str):
            say(f"{k} trials at once on the {device.type} failed ({together}): {max(pace, default=0) or 'none'} "
                "at most")
            lasting = k > 1 and not together.startswith(TIMED_OUT)
            break
        pace[k] = statistics.mean(t.seconds_per_image for t in together)
    measured = {k: seconds / pace[1] for k, seconds in pace.items()} if 1 in pace else {1: 1.0}
    if lasting:
        calibration.write_cache(cache, {**calibration.read_cache(cache), key: {str(k): v for k, v in measured.items()}})
    return measured


def timed_together(params: dict[str, Any], data: PreparedData, device: torch.device, threads: int,
                   k: int) -> list[Timing] | str:
    """`k` processes train `params` on `device` at once (`threads` threads each): their timings, started together
    once all have warmed up; or why not (the first error a process reported, one that died, or TIMED_OUT)."""
    batch = params["batch_size"]
    sample = _placed(calibration.first_images(data, TIMED_BATCHES * batch), "cpu")
    warm = _placed(calibration.first_images(data, calibration.WARM_BATCHES * batch,
                                            calibration.WARM_BATCHES * params["eval_batch_size"]), "cpu")
    # Spawned, not forked: a process forked after CUDA started cannot use it. Each gets the few images it times.
    context = multiprocessing.get_context("spawn")
    go, messages = context.Event(), context.Queue()
    processes = [context.Process(target=_timed, args=(params, sample, warm, str(device), threads, go, messages),
                                 daemon=True) for _ in range(k)]
    for process in processes:
        process.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        ready = _collect(messages, processes, "ready", deadline)
        if isinstance(ready, str):
            return ready
        go.set()
        return _collect(messages, processes, "timed", deadline)
    finally:
        go.set()  # a process still waiting goes on, and ends
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _collect(messages: Any, processes: list[Any], what: str, deadline: float) -> list[Any] | str:
    """One `what` message from each process; or the first error, a process that died, or TIMED_OUT."""
    found: list[Any] = []
    while len(found) < len(processes):
        try:
            kind, value = messages.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                return f"a process ended with exit code {dead[0].exitcode}"
            if time.monotonic() > deadline:
                return f"{TIMED_OUT} after {START_TIMEOUT:.0f} s"
            continue
        if kind == "error":
            return value
        found.append(value)
    return found


def _timed(params: dict[str, Any], sample: PreparedData, warm: PreparedData, device: str, threads: int,
           go: Any, messages: Any) -> None:
    """One of the processes: warm up, say so, wait for the word, time the batches, report (or report the error:
    the parent says it, so no traceback reaches the search's screen)."""
    from pipeline.training import train

    try:
        torch.set_num_threads(threads)
        settings = {**params, "epochs": 1, "early_stopping_patience": 0}
        sample, warm = _placed(sample, device), _placed(warm, device)
        train.train_network(train.build(settings, warm, 0, threads), warm, device)
        network = train.build(settings, sample, 0, threads)
        messages.put(("ready", os.getpid()))
        go.wait()
        started = time.monotonic()
        metrics = train.train_network(network, sample, device).history[0]
        messages.put(("timed", Timing(os.getpid(), started, time.monotonic(), 1 / metrics.images_per_second)))
    except Exception as exc:
        messages.put(("error", f"{type(exc).__name__}: {str(exc)[:200]}"))


def _placed(data: PreparedData, device: str) -> PreparedData:
    """`data`'s splits resident on `device` (the CPU for what a spawned process is sent)."""
    return dataclasses.replace(data, train=_split(data.train, device), val=_split(data.val, device))


def _split(split: ResidentImages, device: str) -> ResidentImages:
    images = split.images if split.rows is None else split.images[split.rows]
    return ResidentImages(images.cpu(), split.labels.cpu(), split.mean, split.std, device)
