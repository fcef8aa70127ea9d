"""What fusing BatchNorm and ReLU into one CPU kernel would save the trainer: torch's ops vs the fused kernel.

    .venv/bin/python benchmarks/fused_bn_relu.py [--steps 100] [--rounds 8]      (make bench-fusion)

BatchNorm, ReLU and their backward passes are the largest part of a bf16 training step of the classic CNN
that is not a convolution (`make bench-trainer PROFILE=200`). torch runs them as separate passes over the
activations; `kernels/bn_relu.cpp` does BatchNorm with the batch's statistics and ReLU in one forward and one
backward (fewer passes), built here with torch's C++ extension loader (needs g++ and ninja). This prints:

- how far the fused kernel's outputs and gradients are from torch's (they cannot agree bit for bit: the sums
  run in another order), for the classic CNN's two activation shapes;
- milliseconds per forward + backward of each layer pair, torch vs fused, interleaved in one process;
- milliseconds per training step of the trainer itself (classic CNN, batch 64, bf16, augmentation), the
  network as built vs the same network with its BatchNorm + ReLU pairs fused, interleaved round by round;
  the median of each and what it would save an epoch.

A measurement, not a trainer option: fused kernels would change every trial's arithmetic, so a recorded trial
could only be replayed by the kernel it was trained with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils import cpp_extension
from trainer_vs_baseline import BATCH, step_run

from pipeline.data import landing, loading
from pipeline.training import allocator, reproducibility, train
from pipeline.training.device import cpu_has_native_bf16

KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "bn_relu.cpp"
LAYER_SHAPES = ((BATCH, 32, 28, 28), (BATCH, 64, 14, 14))  # the classic CNN's activations before each pool


def build_kernel():
    # torch's loader runs `ninja` from PATH; the dev extras install it beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return cpp_extension.load("bn_relu_fused", [str(KERNEL_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"])


def fused_bn_relu_class(kernel) -> type[nn.Module]:
    class FusedFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
            y, mean, invstd = kernel.forward(x, weight, bias, running_mean, running_var, momentum, eps)
            ctx.save_for_backward(x, y, mean, invstd, weight)
            return y

        @staticmethod
        def backward(ctx, grad):
            x, y, mean, invstd, weight = ctx.saved_tensors
            grad_input, grad_weight, grad_bias = kernel.backward(grad, x, y, mean, invstd, weight)
            return grad_input, grad_weight, grad_bias, None, None, None, None

    class FusedBatchNormReLU(nn.Module):
        """A BatchNorm2d then ReLU: fused while training, torch's own ops in evaluation (running statistics)."""

        def __init__(self, norm: nn.BatchNorm2d):
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.norm
            if not self.training or n.momentum is None:  # the kernel updates running statistics by a momentum
                return torch.relu(n(x))
            n.num_batches_tracked += 1
            return FusedFunction.apply(x, n.weight, n.bias, n.running_mean, n.running_var, n.momentum, n.eps)

    return FusedBatchNormReLU


def with_fused_pairs(model: nn.Sequential, fused_class: type[nn.Module]) -> nn.Sequential:
    """The same modules (the same parameters) with every BatchNorm2d + ReLU pair replaced by one fused module."""
    layers, out = list(model), []
    while layers:
        layer = layers.pop(0)
        if isinstance(layer, nn.BatchNorm2d) and layers and isinstance(layers[0], nn.ReLU):
            layers.pop(0)
            layer = fused_class(layer)
        out.append(layer)
    return nn.Sequential(*out)


def median_ms(function: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def alternating_medians(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each timer's median over `rounds` rounds (a timer returns the milliseconds it measured), interleaved and
    each going first in half of them, so a drift of the machine's speed falls on both sides alike."""
    measured: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(rounds):
        for name in sorted(timers, reverse=round_ % 2 == 1):
            measured[name].append(timers[name]())
    return {name: statistics.median(times) for name, times in measured.items()}


def compare_layers(fused_class: type[nn.Module]) -> None:
    print(f"{'layer pair (fwd + bwd)':24} {'largest diff y':>15} {'dx':>9} {'dweight':>9} {'dbias':>9} "
          f"{'torch ms':>9} {'fused ms':>9} {'fused/torch':>12}")
    for shape in LAYER_SHAPES:
        print(layer_row(shape, fused_class))


@dataclass
class PairRun:
    """One forward + backward of the same bf16 input through torch's BatchNorm2d + ReLU and through the fused
    module, from the same initial state (affine weights drawn away from 1 and 0, so they matter)."""

    norm: nn.BatchNorm2d  # torch's side
    fused: nn.Module  # wraps a copy of `norm` as it was
    x: torch.Tensor
    grad: torch.Tensor  # the gradient both outputs were given
    theirs: torch.Tensor  # the input torch's side saw; .grad its gradient
    ours: torch.Tensor
    y_torch: torch.Tensor
    y_fused: torch.Tensor

    @classmethod
    def run(cls, shape: tuple[int, int, int, int], fused_class: type[nn.Module]) -> PairRun:
        torch.manual_seed(0)
        norm, copy = nn.BatchNorm2d(shape[1]), nn.BatchNorm2d(shape[1])
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.2, 0.2)
        copy.load_state_dict(norm.state_dict())
        x = (torch.randn(shape) * 2 + 0.5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        theirs, ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused = fused_class(copy)
        y_torch, y_fused = torch.relu(norm(theirs)), fused(ours)
        y_torch.backward(grad)
        y_fused.backward(grad)
        return cls(norm, fused, x, grad, theirs, ours, y_torch, y_fused)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of `a` from `b`, relative to `b`'s largest value."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def layer_row(shape: tuple[int, int, int, int], fused_class: type[nn.Module]) -> str:
    """One layer pair: how far the fused outputs and gradients are from torch's (relative to the largest value),
    and the median milliseconds of a forward + backward of each, interleaved."""
    pair = PairRun.run(shape, fused_class)
    norm, fused, theirs, ours, grad = pair.norm, pair.fused, pair.theirs, pair.ours, pair.grad
    diffs = [f"{relative_difference(a, b):.1e}" for a, b in (
        (pair.y_fused, pair.y_torch), (ours.grad, theirs.grad), (fused.norm.weight.grad, norm.weight.grad),
        (fused.norm.bias.grad, norm.bias.grad))]
    ms = alternating_medians({"torch": lambda: median_ms(lambda: torch.relu_(norm(theirs)).backward(grad), 40),
                              "fused": lambda: median_ms(lambda: fused(ours).backward(grad), 40)}, rounds=6)
    native, fused_ms = ms["torch"], ms["fused"]
    label = "x".join(map(str, shape))
    return (f"{label:24} {diffs[0]:>15} {diffs[1]:>9} {diffs[2]:>9} {diffs[3]:>9} {native:9.2f} {fused_ms:9.2f} "
            f"{fused_ms / native:12.2f}")


def compare_steps(prepared: loading.PreparedData, fused_class: type[nn.Module], steps: int, rounds: int) -> None:
    runs = {"torch": step_run(prepared, steps), "fused": step_run(prepared, steps)}
    fused_run = runs["fused"]
    fused_run.model = fused_run.network = fused_run.forward = with_fused_pairs(fused_run.model, fused_class)

    def timer(run: train._Run) -> Callable[[], float]:
        def ms_per_step() -> float:
            metrics = train._train_epoch(run, train._Progress(), torch.Generator().manual_seed(0), None)
            return BATCH / metrics.images_per_second * 1000
        return ms_per_step

    timers = {name: timer(run) for name, run in runs.items()}
    for ms_per_step in timers.values():  # warm-up: kernel choice, first allocations
        ms_per_step()
    ms = alternating_medians(timers, rounds)
    native, fused = ms["torch"], ms["fused"]
    epoch_steps = len(prepared.train) // BATCH
    print(f"trainer step, classic CNN, batch {BATCH}, {fused_run.precision}, augmentation: median of {rounds} rounds "
          f"of {steps} steps")
    print(f"  torch's ops {native:.2f} ms/step, fused BN+ReLU {fused:.2f} ms/step, fused/torch {fused / native:.3f}; "
          f"an epoch of {epoch_steps} steps: {(native - fused) * epoch_steps / 1000:+.1f} s saved")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each, interleaved")
    args = parser.parse_args()
    threads = reproducibility.make_deterministic()
    allocator.keep_freed_memory()
    started = time.perf_counter()
    fused_class = fused_bn_relu_class(build_kernel())
    print(f"fused BatchNorm + ReLU kernel ({KERNEL_SOURCE.name}) built or loaded in "
          f"{time.perf_counter() - started:.0f} s; CPU, {threads} threads, native bf16: {cpu_has_native_bf16()}")
    compare_layers(fused_class)
    if not cpu_has_native_bf16():  # the trainer would train in fp32, which the kernel does not take
        print("trainer step: skipped, this CPU has no native bf16 (the trainer's step would run in fp32)")
        return
    landing.land("mnist")
    compare_steps(loading.prepare("mnist"), fused_class, args.steps, args.rounds)


if __name__ == "__main__":
    main()
