"""Seconds per epoch: the reference MNIST script vs our trainer, same architectures, same data, one run.

    .venv/bin/python benchmarks/trainer_vs_baseline.py [--train-images 55000] [--models cnn mlp]

Reference (the usual tutorial script): `torchvision.datasets.MNIST` + `DataLoader(batch_size=64,
shuffle=True)` with per-sample PIL `RandomRotation(10)` (CNN only), `ToTensor`, `Normalize`, Adam 1e-3,
fp32, then a validation pass. Ours: `train.fit` for one epoch at batch 64, Adam 1e-3, no schedule,
resident data, augmentation on for the CNN (our affine also shifts and zooms, so it does more work),
in bf16 (only where the CPU runs it natively: what `precision=auto` picks there), in fp32 channels_last (what fp32
trains in now) and in fp32 NCHW (what it trained in before), each row labelled by the path it took, so the levers
(resident data, bf16, the layout) are seen apart. Both sides train the identical network built by
`models.build_model`, on the same training subset and the same 5,000 validation images.

Beside each of our figures, the CPU's ceiling: the epoch's FLOPs (3x the forward FLOPs per training image, for the
forward and backward passes, plus one forward per validation image) at this CPU's measured matmul rate in the
precision used (a 2048x2048 matmul, timed here on the same threads). ours/ceiling is how far the trainer is from
what the arithmetic alone would take.
"""

from __future__ import annotations

import argparse
import time

import torch
from reference_loop import correct_count, mnist_subsets, train_epoch
from torch.utils.data import DataLoader

from pipeline.data import landing, loading, splits
from pipeline.data.arrays import load_arrays
from pipeline.spec import hparams
from pipeline.training import device as devices
from pipeline.training import models, reproducibility, train

BATCH = 64
LR = 1e-3


def reference_epoch(family: str, train_idx: torch.Tensor, val_idx: torch.Tensor, mean: tuple[float, ...],
                    std: tuple[float, ...], rotate: bool) -> float:
    train_set, val_set = mnist_subsets(train_idx, val_idx, mean, std, rotate)
    train_loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=1000)
    torch.manual_seed(0)
    model = models.build_model(hparams.CLASSIC[family])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    started = time.perf_counter()
    train_epoch(model, optimizer, train_loader)
    correct_count(model, val_loader)
    return time.perf_counter() - started


MATMUL_SIZE = 2048
MATMUL_RUNS = 10


def matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in `dtype` on this process's CPU threads."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    for _ in range(3):  # warm-up: kernel choice, page faults
        a @ b
    started = time.perf_counter()
    for _ in range(MATMUL_RUNS):
        a @ b
    return MATMUL_RUNS * 2 * MATMUL_SIZE**3 / (time.perf_counter() - started)


def epoch_flops(family: str, prepared: loading.PreparedData) -> float:
    """Training FLOPs of one epoch: forward + backward (3 forwards) per training image, a forward per validation
    image."""
    forward = models.flops_per_image(models.build_model(hparams.CLASSIC[family]), prepared.input_shape)
    return forward * (3 * len(prepared.train) + len(prepared.val))


def our_params(family: str, precision: str, augment: float) -> dict:
    """Our trainer's side of the comparison: the classic network, one epoch, batch 64, plain Adam, no schedule."""
    return dict(hparams.CLASSIC[family], epochs=1, batch_size=BATCH, optimizer="adam", lr=LR, weight_decay=0.0,
                schedule="none", augment=augment, precision=precision)


def our_epoch(family: str, prepared: loading.PreparedData, precision: str, augment: float,
              layout: str) -> tuple[float, str, str]:
    result = train.fit(our_params(family, precision, augment), prepared, seed=0, memory_format=layout)
    return result.history[0].epoch_seconds, result.precision, result.memory_format


def our_paths() -> list[tuple[str, str]]:
    """(precision, layout) of each of our rows: bf16 only where `precision=auto` picks it (the CPU runs it natively,
    and PIPELINE_PRECISION does not say fp32)."""
    native = [("bf16", "channels_last")] if devices.pick_precision("auto", torch.device("cpu")) == "bf16" else []
    return [*native, ("fp32", "channels_last"), ("fp32", "contiguous")]


# Where a training step's time goes: profiler op names (self time) by the part of the step they belong to.
STEP_PARTS = (  # the first part whose key an op's name holds takes it: backward before forward
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("mkldnn_convolution", "aten::convolution", "_convolution")),
    ("BatchNorm", ("batch_norm",)),
    ("ReLU", ("relu", "clamp_min", "threshold_backward")),
    ("max-pool", ("max_pool",)),
    ("linear head", ("addmm", "aten::mm", "aten::linear")),
    ("augmentation", ("grid_sampler", "affine_grid")),
    ("optimizer", ("adam", "foreach", "zero_grad")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
)


def step_run(prepared: loading.PreparedData, steps: int) -> train._Run:
    """Our trainer's run of the classic CNN (batch 64, precision auto, augmentation on) over an epoch of exactly
    `steps` batches and one batch of evaluation: `train._train_epoch` on it times training steps."""
    params = hparams.resolve_params(our_params("cnn", "auto", augment=1.0))
    device = torch.device("cpu")
    run = train._build(train.build(params, prepared), prepared, device, devices.pick_precision("auto", device),
                      micro_batches=steps)
    images, labels = prepared.train.images, prepared.train.labels
    run.train_split = loading.ResidentImages(images[:steps * BATCH], labels[:steps * BATCH], prepared.mean,
                                             prepared.std)
    run.val_split = loading.ResidentImages(images[:BATCH], labels[:BATCH], prepared.mean, prepared.std)
    return run


def profile_step(prepared: loading.PreparedData, steps: int) -> None:
    """torch.profiler over `steps` of our bf16 training steps (classic CNN, batch 64, augmentation on): each part's
    milliseconds per step, its share, and the rest (casts, copies, allocation, Python, autograd bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    steps = min(steps, len(prepared.train) // BATCH)
    run = step_run(prepared, steps)
    precision = run.precision
    generator = torch.Generator().manual_seed(0)
    train._train_epoch(run, train._Progress(), generator, None)  # warm-up: kernel choice, first allocations
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train._train_epoch(run, train._Progress(), generator, None)
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    parts = dict.fromkeys([name for name, _ in STEP_PARTS] + ["the rest"], 0.0)
    for event in events:
        part = next((name for name, keys in STEP_PARTS if any(k in event.key.lower() for k in keys)), "the rest")
        parts[part] += event.self_cpu_time_total
    print(f"profile of {steps} training steps, ours {precision}, classic CNN, batch {BATCH} (self CPU time):")
    for name, micros in parts.items():
        print(f"  {name:22} {micros / steps / 1000:6.2f} ms/step {micros / total:6.1%}")
    print(f"  {'all':22} {total / steps / 1000:6.2f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=55000, help="training images per epoch")
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead: profile this many of our bf16 training steps of the classic CNN, by part")
    args = parser.parse_args()
    threads = reproducibility.make_deterministic()  # same thread count on both sides

    landing.land("mnist")
    limit = args.train_images if args.train_images < 55000 else None
    prepared = loading.prepare("mnist", train_limit=limit)
    if args.profile:
        profile_step(prepared, args.profile)
        return
    split = splits.stratified_split(load_arrays("mnist").train_labels)
    train_idx = splits.seeded_subset(split.train_indices, limit, splits.DEFAULT_SPLIT_SEED + 1)

    print(f"MNIST, {len(prepared.train):,} train + {len(prepared.val):,} val images per epoch, batch {BATCH}, "
          f"Adam {LR}, CPU, {threads} threads, native bf16: {devices.cpu_has_native_bf16()}, precision auto means "
          f"{devices.pick_precision('auto', torch.device('cpu'))} here")
    rates = {"fp32": matmul_rate(torch.float32)}
    if any(precision == "bf16" for precision, _ in our_paths()):  # emulated bf16 is no path anything takes
        rates["bf16"] = matmul_rate(torch.bfloat16)
    print("matmul rate on these threads: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    print(f"{'model, our path':40} {'reference s/epoch':>18} {'ours s/epoch':>13} {'ours/reference':>15} "
          f"{'ceiling s/epoch':>16} {'ours/ceiling':>13}")
    for family in args.models:
        rotate = family == "cnn"  # the reference CNN script rotates; the MLP one does not
        flops = epoch_flops(family, prepared)
        reference = reference_epoch(family, train_idx, split.val_indices, prepared.mean, prepared.std, rotate)
        for precision, layout in our_paths():
            ours, used, laid = our_epoch(family, prepared, precision, 1.0 if rotate else 0.0, layout)
            ceiling = flops / rates[used]
            label = f"{family}{' + rotation' if rotate else ''}, ours {used} {'NCHW' if laid == 'contiguous' else laid}"
            print(f"{label:40} {reference:18.1f} {ours:13.1f} {ours / reference:15.2f} {ceiling:16.1f} "
                  f"{ours / ceiling:13.2f}", flush=True)
        print(f"  {family}: {flops / 1e12:.2f} TFLOP per epoch", flush=True)


if __name__ == "__main__":
    main()
