"""Where, in what precision and in what layout a run trains: the device (cuda, then mps, then cpu, unless one is
asked for), the precision "auto" means on it (bf16 where the hardware runs it natively), the autocast context for it,
the memory layout of its images and weights, and whether an error is the device running out of memory."""

from __future__ import annotations

import contextlib

import torch

from pipeline.spec.errors import BadInput
from pipeline.spec.hparams import machine_precision


def pick_device(requested: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless one is requested."""
    if requested and requested != "auto":
        device = torch.device(requested)
        cuda_missing = not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
        missing = ((device.type == "cuda" and cuda_missing)
                   or (device.type == "mps" and not torch.backends.mps.is_available()))
        if missing:
            raise BadInput(f"--device {requested}: this machine has no such device; use --device auto (or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512-BF16: bf16 matmuls/convs run natively instead of being emulated."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def pick_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        requested = machine_precision()  # PIPELINE_PRECISION: what "auto" means on this machine
    if requested != "auto":
        return requested
    if device.type == "cuda":  # GPU-only: Ampere and newer have bf16
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_out_of_memory(exc: BaseException) -> bool:
    """Did the device (or the CPU allocator) run out of memory?"""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # CPU allocator
    )


CHANNELS_LAST, CONTIGUOUS = "channels_last", "contiguous"
MEMORY_FORMATS = {CHANNELS_LAST: torch.channels_last, CONTIGUOUS: torch.contiguous_format}


def legacy_memory_format(precision: str, device: str) -> str:
    """The layout runs recorded before the layout was: channels_last only in bf16 or on CUDA (fp32 on the CPU and MPS
    ran NCHW). A replay of such a run uses it, so it stays bit for bit."""
    return CHANNELS_LAST if precision == "bf16" or device.startswith("cuda") else CONTIGUOUS


def pick_memory_format(requested: str | None, device: torch.device) -> str:
    """channels_last (NHWC) unless asked otherwise: oneDNN's and cuDNN's fast convolutions are NHWC ones, in fp32 as
    in bf16 (make bench-trainer: 12-20% less time per fp32 step on the CPU than NCHW). MPS keeps NCHW."""
    if requested is not None:
        return requested
    return CONTIGUOUS if device.type == "mps" else CHANNELS_LAST
