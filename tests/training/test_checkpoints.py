"""checkpoints.py on a tiny model trained by hand: a checkpoint taken mid-training continues bit for bit (weights,
optimiser, schedule position, global RNG, data order); a checkpoint of another run, a damaged file or a file that
is not a checkpoint is refused with ForeignCheckpoint and leaves the run untouched; nothing in the file is ever
executed; a write never leaves a partial file."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.data import loading
from pipeline.spec import hparams
from pipeline.spec.errors import BadInput
from pipeline.training import checkpoints, schedule
from pipeline.training.checkpoints import ForeignCheckpoint

PARAMS = hparams.resolve_params({"optimizer": "adamw", "lr": 0.05, "schedule": "onecycle"})
FINGERPRINT = "0123456789abcdef"
INPUTS = torch.linspace(-1, 1, 64 * 6).reshape(64, 6)
LABELS = torch.arange(64) % 3
BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 4, 4


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))  # dropout draws on the RNG


def _train_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, epochs: range,
                  step: int) -> tuple[list[torch.Tensor], int]:
    """Train `epochs` epochs from optimiser step `step`: data order from `generator`, dropout from the global RNG,
    the lr from the schedule's step. Returns every batch's loss and the step reached."""
    losses = []
    total = EPOCHS * STEPS_PER_EPOCH
    for _ in epochs:
        order = torch.randperm(len(INPUTS), generator=generator)
        for batch in order.split(BATCH):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * schedule.lr_factor(PARAMS, step, total, STEPS_PER_EPOCH)
            loss = nn.functional.cross_entropy(model(INPUTS[batch]), LABELS[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            step += 1
    return losses, step


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _progress(step: int, best: dict | None) -> dict:
    """Progress as the trainer hands it over: plain values and tensors."""
    return {"epoch": 2, "step": step, "history": [{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.7}],
            "best_epoch": 2, "best_val_accuracy": 0.75, "best_state": best, "epochs_without_gain": 0,
            "plateau": asdict(schedule.Plateau(scale=0.5, best_loss=0.7, bad_epochs=1))}


@pytest.fixture
def halfway(tmp_path):
    """Two epochs trained and checkpointed, then two more trained without stopping: the reference."""
    model = _model(seed=1)
    optimizer = schedule.make_optimizer(model, PARAMS)
    generator = torch.Generator().manual_seed(7)
    _, step = _train_epochs(model, optimizer, generator, range(2), step=0)
    path = tmp_path / "run" / "trial.pt"
    saved = _progress(step, _state(model))
    checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, saved, generator)
    rest, _ = _train_epochs(model, optimizer, generator, range(2, EPOCHS), step)
    return path, saved, rest, _state(model), optimizer.state_dict()


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """Another run's starting point: other weights, a fresh optimiser, another data order, a moved global RNG."""
    model = _model(seed=99)
    torch.rand(1000)
    return model, schedule.make_optimizer(model, PARAMS), torch.Generator().manual_seed(123)


# --------------------------------------------------------------------------------------------------
# Resuming


def test_a_resumed_run_continues_bit_for_bit(halfway):
    path, saved, reference_losses, reference_weights, reference_optimizer = halfway
    model, optimizer, generator = _fresh()
    progress = checkpoints.load_checkpoint(path, FINGERPRINT, model, optimizer, generator)
    losses, _ = _train_epochs(model, optimizer, generator, range(2, EPOCHS), progress["step"])
    assert all(torch.equal(a, b) for a, b in zip(losses, reference_losses, strict=True))
    assert _same(_state(model), reference_weights)
    moments = optimizer.state_dict()["state"]
    assert all(_same(moments[i], reference_optimizer["state"][i]) for i in reference_optimizer["state"])


def test_without_the_saved_rng_the_same_resume_differs(halfway):
    """The check above can fail: restoring everything but the global RNG (dropout's) gives other losses."""
    path, _, reference_losses, _, _ = halfway
    model, optimizer, generator = _fresh()
    progress = checkpoints.load_checkpoint(path, FINGERPRINT, model, optimizer, generator)
    torch.manual_seed(5)
    losses, _ = _train_epochs(model, optimizer, generator, range(2, EPOCHS), progress["step"])
    assert not all(torch.equal(a, b) for a, b in zip(losses, reference_losses, strict=True))


def test_loading_restores_the_global_rng_and_the_data_generator_as_they_were_when_saved(tmp_path):
    model = _model(seed=1)
    optimizer = schedule.make_optimizer(model, PARAMS)
    generator = torch.Generator().manual_seed(3)
    torch.randperm(10, generator=generator)
    path = tmp_path / "trial.pt"
    checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, _progress(0, None), generator)
    next_draw, next_order = torch.rand(5), torch.randperm(10, generator=generator)
    model, optimizer, generator = _fresh()
    checkpoints.load_checkpoint(path, FINGERPRINT, model, optimizer, generator)
    assert torch.equal(torch.rand(5), next_draw)
    assert torch.equal(torch.randperm(10, generator=generator), next_order)


def test_loading_gives_back_the_progress_saved_and_nothing_else(halfway):
    path, saved, *_ = halfway
    model, optimizer, generator = _fresh()
    progress = checkpoints.load_checkpoint(path, FINGERPRINT, model, optimizer, generator)
    assert progress.keys() == saved.keys()
    assert _same(progress["best_state"], saved["best_state"])
    assert {k: v for k, v in progress.items() if k != "best_state"} == {k: v for k, v in saved.items()
                                                                       if k != "best_state"}
    assert schedule.Plateau(**progress["plateau"]) == schedule.Plateau(scale=0.5, best_loss=0.7, bad_epochs=1)


def test_no_best_state_yet_loads_as_none(tmp_path):
    model, optimizer, generator = _fresh()
    path = tmp_path / "trial.pt"
    checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, _progress(0, None), generator)
    assert checkpoints.load_checkpoint(path, FINGERPRINT, *_fresh())["best_state"] is None


# --------------------------------------------------------------------------------------------------
# Refusals: another run's checkpoint, a damaged file, something else


def _refused(path: Path, fingerprint: str = FINGERPRINT) -> str:
    """Load `path` into a fresh run, expecting a refusal that leaves the run as it was; the refusal's message."""
    model, optimizer, generator = _fresh()
    weights, rng, order = _state(model), torch.get_rng_state(), generator.get_state()
    with pytest.raises(ForeignCheckpoint) as refused:
        checkpoints.load_checkpoint(path, fingerprint, model, optimizer, generator)
    assert isinstance(refused.value, BadInput)  # the CLI's one-message exit 2, not a crash
    assert _same(_state(model), weights) and optimizer.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), order)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and message.endswith("; delete it to start over")
    return message


def test_a_checkpoint_of_another_run_is_refused(halfway):
    path, *_ = halfway
    assert "belongs to other parameters, seed or data" in _refused(path, fingerprint="fedcba9876543210")


def test_a_checkpoint_of_another_format_version_is_refused(halfway):
    path, *_ = halfway
    payload = torch.load(path, weights_only=True)
    torch.save(dict(payload, version=checkpoints.CHECKPOINT_VERSION + 1), path)
    assert "belongs to other parameters, seed or data" in _refused(path)


@pytest.mark.parametrize("keep", [0, 10, 1000, 0.5, -1], ids=["empty", "10 bytes", "1000 bytes", "half", "all but 1"])
def test_a_truncated_checkpoint_is_refused_as_unreadable(halfway, keep):
    path, *_ = halfway
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    assert "unreadable checkpoint" in _refused(path)


def test_a_checkpoint_with_flipped_bytes_is_refused_as_unreadable(halfway):
    path, *_ = halfway
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)  # the zip archive's first header gone
    path.write_bytes(bytes(data))
    assert "unreadable checkpoint" in _refused(path)


@pytest.mark.parametrize("content, kind", [(torch.zeros(3), "Tensor"), ([1, 2], "list")])
def test_a_loadable_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path, content, kind):
    path = tmp_path / "trial.pt"
    torch.save(content, path)
    assert f"not a checkpoint ({kind})" in _refused(path)


class _Touch:
    """Pickles as a call of Path.touch: loading it with full unpickling creates the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "trial.pt", tmp_path / "ran"
    torch.save({"version": checkpoints.CHECKPOINT_VERSION, "fingerprint": FINGERPRINT, "model": _Touch(marker)}, path)
    assert "unreadable checkpoint" in _refused(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does run code when fully unpickled: the test above can fail
    assert marker.exists()


def test_a_plain_pickle_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "trial.pt", tmp_path / "ran"
    path.write_bytes(pickle.dumps(_Touch(marker), protocol=2))  # the protocol torch writes
    assert "unreadable checkpoint" in _refused(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Writing


def test_saving_replaces_the_checkpoint_whole_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "new" / "folder"  # made on the first save
    path = folder / "trial.pt"
    model, optimizer, generator = _fresh()
    checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, _progress(1, None), generator)
    checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, _progress(2, None), generator)
    assert os.listdir(folder) == ["trial.pt"]
    assert path.stat().st_mode & 0o777 == 0o644
    assert checkpoints.load_checkpoint(path, FINGERPRINT, *_fresh())["step"] == 2


def test_a_save_that_fails_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "trial.pt"
    model, optimizer, generator = _fresh()
    checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, _progress(1, None), generator)
    before = path.read_bytes()
    unsaveable = dict(_progress(2, None), history=[lambda: None])  # a lambda cannot be pickled
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        checkpoints.save_checkpoint(path, FINGERPRINT, model, optimizer, unsaveable, generator)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["trial.pt"]


def test_a_killed_writers_temporary_file_is_swept_by_the_next_save(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    leftover = tmp_path / f".trial.pt.{int(done.stdout)}.abcd1234.tmp"  # as write_atomic names it
    leftover.write_bytes(b"half a checkpoint")
    model, optimizer, generator = _fresh()
    checkpoints.save_checkpoint(tmp_path / "trial.pt", FINGERPRINT, model, optimizer, _progress(1, None), generator)
    assert os.listdir(tmp_path) == ["trial.pt"]


# --------------------------------------------------------------------------------------------------
# The fingerprint


def test_the_fingerprint_changes_with_the_params_the_seed_and_the_data_and_nothing_else(tiny, tiny_dataset):
    fingerprint = checkpoints.params_fingerprint(PARAMS, 0, tiny)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    reordered = dict(reversed(list(PARAMS.items())))
    assert checkpoints.params_fingerprint(reordered, 0, tiny) == fingerprint  # key order is no difference
    assert checkpoints.params_fingerprint(PARAMS, 0, loading.prepare("tiny", tiny_dataset[1], val_size=100)) \
        == fingerprint  # the same data prepared again
    others = {
        checkpoints.params_fingerprint(dict(PARAMS, lr=0.051), 0, tiny),
        checkpoints.params_fingerprint(dict(PARAMS, cnn_channels=(8, 16)), 0, tiny),  # tuples, as resolve gives them
        checkpoints.params_fingerprint(PARAMS, 1, tiny),
        checkpoints.params_fingerprint(PARAMS, 0, loading.prepare("tiny", tiny_dataset[1], val_size=150)),
        checkpoints.params_fingerprint(PARAMS, 0, dataclasses.replace(tiny, dataset="other")),
    }
    assert fingerprint not in others and len(others) == 5
