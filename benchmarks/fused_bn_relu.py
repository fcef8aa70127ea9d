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
from pathlib import Path

import torch
from torch import nn
from torch.utils import cpp_extension

from pipeline import allocator, data, datasets, hparams, reproducibility, train

BATCH = 64
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


def median_ms(function, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def compare_layers(fused_class: type[nn.Module]) -> None:
    print(f"{'layer pair (fwd + bwd)':24} {'largest diff y':>15} {'dx':>9} {'dweight':>9} {'dbias':>9} "
          f"{'torch ms':>9} {'fused ms':>9} {'fused/torch':>12}")
    for shape in LAYER_SHAPES:
        print(layer_row(shape, fused_class))


def layer_row(shape: tuple[int, int, int, int], fused_class: type[nn.Module]) -> str:
    """One layer pair: how far the fused outputs and gradients are from torch's (relative to the largest value),
    and the median milliseconds of a forward + backward of each, interleaved."""
    torch.manual_seed(0)
    norms = [nn.BatchNorm2d(shape[1]) for _ in range(2)]
    nn.init.uniform_(norms[0].weight, 0.5, 1.5)
    nn.init.uniform_(norms[0].bias, -0.2, 0.2)
    norms[1].load_state_dict(norms[0].state_dict())
    x = (torch.randn(shape) * 2 + 0.5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = fused_class(norms[1])
    y_torch, y_fused = torch.relu(norms[0](theirs)), fused(ours)
    y_torch.backward(grad)
    y_fused.backward(grad)

    def diff(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{((a.float() - b.float()).abs().max() / b.float().abs().max()).item():.1e}"

    diffs = [diff(y_fused, y_torch), diff(ours.grad, theirs.grad), diff(norms[1].weight.grad, norms[0].weight.grad),
             diff(norms[1].bias.grad, norms[0].bias.grad)]
    steps = {"torch": lambda: torch.relu_(norms[0](theirs)).backward(grad), "fused": lambda: fused(ours).backward(grad)}
    rounds: dict[str, list[float]] = {"torch": [], "fused": []}
    for round_ in range(6):
        for name in sorted(steps, reverse=round_ % 2 == 1):  # each goes first in half the rounds
            rounds[name].append(median_ms(steps[name], 40))
    native, fused_ms = statistics.median(rounds["torch"]), statistics.median(rounds["fused"])
    label = "x".join(map(str, shape))
    return (f"{label:24} {diffs[0]:>15} {diffs[1]:>9} {diffs[2]:>9} {diffs[3]:>9} {native:9.2f} {fused_ms:9.2f} "
            f"{fused_ms / native:12.2f}")


def compare_steps(prepared: data.PreparedData, fused_class: type[nn.Module], steps: int, rounds: int) -> None:
    params = hparams.resolve_params(dict(hparams.CLASSIC["cnn"], epochs=1, batch_size=BATCH, optimizer="adam",
                                         lr=1e-3, weight_decay=0.0, schedule="none", augment=1.0, precision="auto"))
    device = torch.device("cpu")
    precision = train.pick_precision("auto", device)
    images, labels = prepared.train.images, prepared.train.labels
    runs = {}
    for name in ("torch", "fused"):
        run = train._build(params, prepared, device, precision, micro_batches=steps)
        if name == "fused":
            run.model = run.network = run.forward = with_fused_pairs(run.model, fused_class)
        # An epoch of exactly `steps` batches and one batch of evaluation: the timing is of training steps.
        run.train_split = data.ResidentImages(images[:steps * BATCH], labels[:steps * BATCH], prepared.mean,
                                              prepared.std)
        run.val_split = data.ResidentImages(images[:BATCH], labels[:BATCH], prepared.mean, prepared.std)
        runs[name] = run
    per_step = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # the first round warms up: kernel choice, first allocations
        for name in sorted(runs, reverse=round_ % 2 == 1):  # each goes first in half the rounds
            run = runs[name]
            metrics = train._train_epoch(run, train._Progress(), torch.Generator().manual_seed(round_), None)
            if round_:
                per_step[name].append(BATCH / metrics.images_per_second * 1000)
    native, fused = (statistics.median(per_step[name]) for name in ("torch", "fused"))
    epoch_steps = len(prepared.train) // BATCH
    print(f"trainer step, classic CNN, batch {BATCH}, {precision}, augmentation: median of {rounds} rounds of "
          f"{steps} steps")
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
          f"{time.perf_counter() - started:.0f} s; CPU, {threads} threads, native bf16: {train.cpu_has_native_bf16()}")
    compare_layers(fused_class)
    if not train.cpu_has_native_bf16():  # the trainer would train in fp32, which the kernel does not take
        print("trainer step: skipped, this CPU has no native bf16 (the trainer's step would run in fp32)")
        return
    datasets.land("mnist")
    compare_steps(data.prepare("mnist"), fused_class, args.steps, args.rounds)


if __name__ == "__main__":
    main()
