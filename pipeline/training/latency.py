"""CPU latency per image at batch 1: the `latency_ms` objective of a search and the export's figure, with the
export's throughput at batch 256.

The median of repeated forward passes after a warm-up (the first calls choose kernels), on a float32 CPU copy
in eval mode, on a fixed number of threads: latencies measured by one-thread workers and by a two-thread process
would not be comparable otherwise. The thread count travels with the figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

WARMUP_RUNS = 10
SEARCH_RUNS = 50  # per trial: about 0.1 s for a small CNN; the median of 50 moves by a few percent at most
LATENCY_THREADS = 1  # batch 1 on a CPU: what a deployed single-image classifier typically gets
EXPORT_RUNS = 200  # the export's latency figure: the median of this many
THROUGHPUT_BATCH = 256
THROUGHPUT_RUNS = 10


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_seconds(model: torch.nn.Module, example: torch.Tensor, runs: int,
                   threads: int = LATENCY_THREADS) -> float:
    """Median seconds of `model(example[:1])` over `runs` timed calls, on `threads` CPU threads."""
    single = example[:1]
    with torch.no_grad(), _threads(threads):
        for _ in range(WARMUP_RUNS):
            model(single)
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            model(single)
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def trial_latency_ms(cpu_model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """A trained trial's latency_ms: a zero image of the data's shape (the time does not depend on the pixels)."""
    return 1000 * median_seconds(cpu_model, torch.zeros(1, *input_shape), SEARCH_RUNS)


def export_speed(model: torch.nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """Median seconds per image at batch 1, and images per second at batch 256, on the CPU's current threads."""
    latency = median_seconds(model, example, EXPORT_RUNS, torch.get_num_threads())
    many = example[:1].expand(THROUGHPUT_BATCH, -1, -1, -1).contiguous()
    with torch.no_grad():
        model(many)
        started = time.perf_counter()
        for _ in range(THROUGHPUT_RUNS):
            model(many)
        throughput = THROUGHPUT_BATCH * THROUGHPUT_RUNS / (time.perf_counter() - started)
    return latency, throughput
