"""Seeding and deterministic settings, applied before a model is built.

Same params + same seed -> identical metrics and weights on CPU, bit for bit. On CUDA the same holds
with deterministic algorithms, except for ops torch documents as nondeterministic without an
alternative: `use_deterministic_algorithms(True)` makes those raise instead of silently varying.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pipeline.infra.concurrency import available_cores

# cuBLAS reads this when the CUDA context starts; it must be set before any CUDA work.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_deterministic(threads: int | None = None) -> int:
    """Deterministic kernels, no cuDNN autotuning, and a fixed CPU thread count (returned).

    The thread count is fixed because CPU reductions split work by thread: a different count can
    change the last bits of a sum.
    """
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid against kernels that read memory
    # they never wrote. No kernel the trainer runs does (replays match bit for bit without it), and the fills cost
    # a sixth of a small-batch CPU training step (make bench-trainer), so they are off.
    # A property of the module (torch swaps its class); torch's stubs do not declare it.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    threads = threads or int(os.environ.get("PIPELINE_THREADS", 0)) or available_cores()
    torch.set_num_threads(threads)
    return threads


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The global torch RNG states (dropout draws from them); the trainer uses no other global RNG."""
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

