"""Several search workers on one host: start them, share out GPUs and CPU threads, relay their events.

A worker is an ordinary search process (`search ... --worker`) on the shared Optuna storage; instead
of drawing its own progress view it prints one JSON event per line on stdout, and the coordinating
process draws one view of the whole study. Which trial each worker runs is decided by Optuna's
storage alone; nothing here schedules trials.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.concurrency import stop_with_parent

EVENT_PREFIX = "@event "  # marks a worker's event lines; anything else it prints is passed on as text


@dataclass(frozen=True)
class WorkerPlan:
    index: int  # 1-based, as shown to the user
    threads: int  # torch CPU threads of this worker
    gpu: str | None  # its CUDA_VISIBLE_DEVICES entry; None without CUDA


def plan(workers: int, threads: int | None, gpus: list[str]) -> list[WorkerPlan]:
    """GPUs round robin (worker i gets gpus[i % len]); CPU threads split so the workers together use each
    core once (at least one thread each), unless `threads` says how many each gets."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    each = threads or max(1, cores // workers)
    return [WorkerPlan(i + 1, each, gpus[i % len(gpus)] if gpus else None) for i in range(workers)]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def emit(event: str, **fields: Any) -> None:
    """In a worker: one event line for the coordinator."""
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}, default=str), flush=True)


class Workers:
    """The running worker processes and the one queue their output lines arrive on."""

    def __init__(self, command: list[str], plans: list[WorkerPlan]):
        self.plans = plans
        self.lines: queue.Queue[tuple[int, dict[str, Any] | str | None]] = queue.Queue()
        self.processes: dict[int, subprocess.Popen] = {}
        for p in plans:
            env = dict(os.environ, OMP_NUM_THREADS=str(p.threads), MKL_NUM_THREADS=str(p.threads),
                       PYTHONUNBUFFERED="1")
            if p.gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = p.gpu
            # Its own session: a Ctrl-C reaches the coordinator, which passes one SIGINT on to each worker
            # (a terminal would signal them all at once, and a second signal means "stop now").
            process = subprocess.Popen([*command, "--threads", str(p.threads), "--worker", str(p.index)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True, preexec_fn=stop_with_parent)
            self.processes[p.index] = process
            threading.Thread(target=self._read, args=(p.index, process), daemon=True).start()

    def _read(self, index: int, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                self.lines.put((index, json.loads(line.removeprefix(EVENT_PREFIX))))
            elif line.strip():
                self.lines.put((index, line))
        self.lines.put((index, None))  # its output ended: it has exited or is about to

    def events(self, poll_seconds: float = 0.5) -> Iterator[tuple[int, dict[str, Any] | str | None]]:
        """(worker, event dict | text line | None when it ended), until every worker has ended;
        (0, None) every `poll_seconds` when nothing arrived, so the caller can refresh its view."""
        open_ = set(self.processes)
        while open_:
            try:
                index, item = self.lines.get(timeout=poll_seconds)
            except queue.Empty:
                yield 0, None
                continue
            if item is None:
                open_.discard(index)
                self.processes[index].wait()
            yield index, item

    def signal_all(self, signal_number: int) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal_number)

    def exit_codes(self) -> dict[int, int | None]:
        return {index: p.poll() for index, p in self.processes.items()}

