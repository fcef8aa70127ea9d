"""The optimiser and the learning-rate schedules of schedule.py: their factors at the first, middle and last step
against torch's own schedulers, warm-up, reduce-on-plateau, and the lr the trainer reports at the end of each
epoch when gradient accumulation groups several batches into one optimiser step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.spec import hparams
from pipeline.training import schedule, train

ONECYCLE_START = 1 / schedule.ONECYCLE_START_DIV
ONECYCLE_FINAL = 1 / (schedule.ONECYCLE_START_DIV * schedule.ONECYCLE_FINAL_DIV)


def _params(**overrides) -> dict:
    return hparams.resolve_params(overrides)


def _factors(p: dict, total_steps: int, steps_per_epoch: int) -> list[float]:
    return [schedule.lr_factor(p, step, total_steps, steps_per_epoch) for step in range(total_steps)]


def _torch_lrs(make_scheduler, lr: float, steps: int) -> list[float]:
    """The lr torch's scheduler gives at each of `steps` optimiser steps (stepped once after each)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# --------------------------------------------------------------------------------------------------
# The factors, step by step


def test_onecycle_starts_and_ends_where_torchs_onecycle_does_and_peaks_at_30_percent():
    p, total = _params(schedule="onecycle"), 101  # the peak at step 30, then 70 steps down to the last
    factors = _factors(p, total, steps_per_epoch=10)
    reference = _torch_lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total),
                           1.0, total)
    assert factors[0] == pytest.approx(reference[0]) == pytest.approx(ONECYCLE_START)
    assert factors[-1] == pytest.approx(reference[-1]) == pytest.approx(ONECYCLE_FINAL)
    peak = int(schedule.ONECYCLE_PEAK_AT * total)
    assert factors[peak] == 1.0 and max(factors) == 1.0
    assert all(a < b for a, b in zip(factors[:peak], factors[1:peak + 1], strict=True))  # rises to the peak...
    assert all(a > b for a, b in zip(factors[peak:-1], factors[peak + 1:], strict=True))  # ...then only falls
    # Halfway down, a cosine is halfway between the peak and the end.
    assert (peak, total - 1 - peak) == (30, 70)
    assert factors[peak + 35] == pytest.approx(ONECYCLE_FINAL + (1 - ONECYCLE_FINAL) / 2)


def test_cosine_without_warmup_is_torchs_cosine_annealing():
    p, total = _params(schedule="cosine", warmup_fraction=0.0), 40
    reference = _torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), 1.0, total)
    assert _factors(p, total, steps_per_epoch=8) == pytest.approx(reference, abs=1e-12)
    assert schedule.lr_factor(p, 0, total, 8) == 1.0 and schedule.lr_factor(p, total // 2, total, 8) == 0.5


def test_cosine_warms_up_linearly_from_its_first_step_then_decays_without_reaching_zero():
    p, total = _params(schedule="cosine", warmup_fraction=0.1), 100
    warmup = 10
    factors = _factors(p, total, steps_per_epoch=10)
    # Warm-up: 1/10, 2/10, ... 10/10: the first step already moves the weights, the last reaches the full lr.
    assert factors[:warmup] == pytest.approx([(step + 1) / warmup for step in range(warmup)])
    assert factors[warmup] == 1.0  # the cosine starts at the top
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5)
    assert factors[-1] == pytest.approx((1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))) / 2)
    assert 0 < factors[-1] < 1e-3  # the last step still takes a (tiny) step


def test_a_warmup_shorter_than_one_step_is_no_warmup():
    p = _params(schedule="cosine", warmup_fraction=0.05)
    assert schedule.lr_factor(p, 0, total_steps=10, steps_per_epoch=5) == 1.0  # int(0.5) steps: none


@pytest.mark.parametrize("step_epochs", [1, 3])
def test_step_schedule_is_torchs_step_lr_counted_in_optimiser_steps(step_epochs):
    p, steps_per_epoch, total = _params(schedule="step", step_epochs=step_epochs, lr_gamma=0.3), 7, 70
    reference = _torch_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=steps_per_epoch * step_epochs,
                                                                       gamma=0.3), 1.0, total)
    factors = _factors(p, total, steps_per_epoch)
    assert factors == pytest.approx(reference, rel=1e-12)
    assert factors[steps_per_epoch * step_epochs - 1] == 1.0  # the whole first period at the full lr
    assert factors[steps_per_epoch * step_epochs] == pytest.approx(0.3)  # the decay lands on a period's first step


def test_plateau_factor_is_the_plateau_scale_and_none_is_always_one():
    plateau, constant = _params(schedule="plateau"), _params(schedule="none")
    assert schedule.lr_factor(plateau, 5, 10, 2) == 1.0
    assert schedule.lr_factor(plateau, 5, 10, 2, plateau_scale=0.25) == 0.25
    assert {schedule.lr_factor(constant, s, 10, 2, plateau_scale=0.25) for s in range(10)} == {1.0}


@pytest.mark.parametrize("name", hparams.TRAIN_SPECS["schedule"].options)
@pytest.mark.parametrize("total", [1, 2, 3, 7])
def test_very_short_runs_give_finite_positive_factors(name, total):
    """A run of one or two optimiser steps (tiny data, big batches) must not divide by zero or stop the lr at 0."""
    p = _params(schedule=name, warmup_fraction=0.5)
    for step in range(total):
        factor = schedule.lr_factor(p, step, total, steps_per_epoch=1)
        assert math.isfinite(factor) and 0 < factor <= 1


# --------------------------------------------------------------------------------------------------
# Reduce on plateau


def test_plateau_decays_only_after_more_than_patience_epochs_without_a_real_gain():
    plateau = schedule.Plateau()
    plateau.update(1.0, patience=2, gamma=0.5)
    assert (plateau.scale, plateau.best_loss, plateau.bad_epochs) == (1.0, 1.0, 0)
    plateau.update(0.99995, patience=2, gamma=0.5)  # a gain under 1e-4 of the best counts as none
    plateau.update(1.2, patience=2, gamma=0.5)
    assert (plateau.scale, plateau.best_loss, plateau.bad_epochs) == (1.0, 1.0, 2)
    plateau.update(1.0, patience=2, gamma=0.5)  # the third bad epoch: more than patience
    assert (plateau.scale, plateau.bad_epochs) == (0.5, 0)
    for _ in range(3):  # the count starts over after a decay; decays compound
        plateau.update(1.1, patience=2, gamma=0.5)
    assert plateau.scale == 0.25
    plateau.update(0.5, patience=2, gamma=0.5)  # a gain resets the count but never raises the lr again
    assert (plateau.scale, plateau.best_loss, plateau.bad_epochs) == (0.25, 0.5, 0)


def test_plateau_with_zero_patience_decays_at_the_first_bad_epoch():
    plateau = schedule.Plateau()
    plateau.update(2.0, patience=0, gamma=0.1)
    plateau.update(2.0, patience=0, gamma=0.1)
    assert plateau.scale == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------------
# The optimiser


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("name", hparams.TRAIN_SPECS["optimizer"].options)
def test_make_optimizer_builds_the_named_optimizer_with_weight_decay_on_matrices_only(name):
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    model = _tiny_model()
    p = _params(optimizer=name, lr=0.02, weight_decay=0.01)
    optimizer = schedule.make_optimizer(model, p)
    assert type(optimizer) is kind
    assert optimizer.defaults["fused"] is True  # CPU: one fused pass over all tensors
    decayed = {id(t) for g in optimizer.param_groups if g["weight_decay"] == 0.01 for t in g["params"]}
    assert decayed == {id(t) for t in model.parameters() if t.ndim > 1}  # not the biases, not the norm weights
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert all(g["lr"] == g["initial_lr"] == 0.02 for g in optimizer.param_groups)


def test_sgd_uses_nesterov_momentum_only_when_it_has_momentum():
    with_momentum = schedule.make_optimizer(_tiny_model(), _params(optimizer="sgd", momentum=0.8))
    assert with_momentum.defaults["momentum"] == 0.8 and with_momentum.defaults["nesterov"] is True
    plain = schedule.make_optimizer(_tiny_model(), _params(optimizer="sgd", momentum=0.0))  # torch refuses nesterov
    assert plain.defaults["momentum"] == 0.0 and plain.defaults["nesterov"] is False


def test_each_step_moves_the_weights_by_base_lr_times_that_steps_factor():
    """The lr is set from `initial_lr` at every step (as the trainer does), so factors never compound."""
    weight = nn.Linear(3, 1, bias=False)
    p = _params(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.5, schedule="onecycle")
    optimizer = schedule.make_optimizer(weight, p)
    total = 10
    for step in range(total):
        factor = schedule.lr_factor(p, step, total, steps_per_epoch=5)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        before = weight.weight.detach().clone()
        weight.weight.sum().backward()  # gradient 1 everywhere: the step is exactly -lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(before - weight.weight.detach(), torch.full_like(before, 0.5 * factor))
    assert optimizer.param_groups[0]["initial_lr"] == 0.5


# --------------------------------------------------------------------------------------------------
# What the trainer reports: the lr of each epoch's last optimiser step

# 500 training images in batches of 50: 10 batches an epoch; 3 accumulated per step: steps of 3, 3, 3 and 1
# batches, so 4 optimiser steps an epoch and 12 in 3 epochs.
ACCUMULATED = {"model": "mlp", "mlp_widths": [16], "batch_norm": False, "dropout": 0.0, "augment": 0.0,
               "precision": "fp32", "batch_size": 50, "grad_accum_steps": 3, "epochs": 3, "lr": 0.01,
               "eval_batch_size": 500}
STEPS_PER_EPOCH, TOTAL_STEPS = 4, 12


def _epoch_lrs(tiny, **overrides) -> list[float]:
    return [m.lr for m in train.fit(dict(ACCUMULATED, **overrides), tiny, seed=0).history]


def test_step_schedule_counts_optimiser_steps_not_batches_under_accumulation(tiny):
    # Counted in batches (10 an epoch), the decay would come in epoch 3 instead of at the start of each epoch.
    assert _epoch_lrs(tiny, schedule="step", step_epochs=1, lr_gamma=0.5) == [0.01, 0.005, 0.0025]
    assert _epoch_lrs(tiny, schedule="step", step_epochs=2, lr_gamma=0.5) == [0.01, 0.01, 0.005]


def test_onecycle_peaks_in_the_first_epoch_and_ends_training_at_its_final_lr(tiny):
    first, _, last = _epoch_lrs(tiny, schedule="onecycle")
    assert int(schedule.ONECYCLE_PEAK_AT * TOTAL_STEPS) == STEPS_PER_EPOCH - 1  # the peak is epoch 1's last step
    assert first == pytest.approx(0.01)
    assert last == pytest.approx(0.01 * ONECYCLE_FINAL)  # the run's last step is the schedule's last


def test_cosine_ends_training_one_step_short_of_zero(tiny):
    lrs = _epoch_lrs(tiny, schedule="cosine", warmup_fraction=0.25)  # 3 warm-up steps
    warmup = int(0.25 * TOTAL_STEPS)
    assert lrs[0] == pytest.approx(0.01)  # step 3: the cosine's start
    progress = (TOTAL_STEPS - 1 - warmup) / (TOTAL_STEPS - warmup)
    assert lrs[-1] == pytest.approx(0.01 * (1 + math.cos(math.pi * progress)) / 2)


def test_constant_lr_is_the_lr_every_epoch(tiny):
    assert _epoch_lrs(tiny, schedule="none") == [0.01] * 3


def test_plateau_lowers_the_lr_from_the_epoch_after_the_one_without_gain(tiny):
    # A learning rate far too small to move the validation loss by 1e-4: every epoch after the first is no gain.
    lrs = _epoch_lrs(tiny, schedule="plateau", plateau_patience=0, lr_gamma=0.5, lr=1e-9)
    assert lrs == pytest.approx([1e-9, 1e-9, 0.5e-9], rel=1e-12)
