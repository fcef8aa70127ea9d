"""The trainer on a tiny synthetic dataset: determinism, checkpoints, accumulation, failures, precision."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.cli import main
from pipeline.data import loading
from pipeline.spec import hparams
from pipeline.spec.errors import BadInput, ParamError
from pipeline.training import device, train

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

SMALL_CNN = {"model": "cnn", "cnn_channels": [8, 16], "pool": "every", "head_units": 32, "dropout": 0.2,
             "conv_dropout": 0.1, "batch_size": 50, "augment": 1.0}


def _metrics(result: train.TrainResult) -> list[tuple]:
    """Per-epoch metrics without the wall-clock ones."""
    return [(m.epoch, m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, m.lr) for m in result.history]


def _weights(result: train.TrainResult) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_bitwise_identical_metrics_and_weights(tiny):
    params = dict(SMALL_CNN, epochs=2)
    first, second = train.fit(params, tiny, seed=5), train.fit(params, tiny, seed=5)
    assert _metrics(first) == _metrics(second)
    assert _same_weights(_weights(first), _weights(second))
    other = train.fit(params, tiny, seed=6)
    assert _metrics(other) != _metrics(first)


def test_callbacks_see_every_epoch_and_can_stop(tiny):
    seen: list[train.EpochMetrics] = []
    result = train.fit(dict(SMALL_CNN, epochs=3), tiny, callbacks=[seen.append, lambda m: m.epoch == 2])
    assert [m.epoch for m in seen] == [1, 2] and result.stop_reason == "callback"
    first = seen[0]
    assert 0 <= first.train_accuracy <= 1 and 0 <= first.val_accuracy <= 1
    assert first.train_loss > 0 and first.val_loss > 0 and first.lr > 0
    assert first.epoch_seconds > 0 and first.images_per_second > 0


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny, tmp_path):
    params = dict(SMALL_CNN, epochs=3, schedule="plateau")
    uninterrupted = train.fit(params, tiny, seed=3)
    checkpoint = tmp_path / "checkpoints" / "trial.ckpt"
    stopped = train.fit(params, tiny, seed=3, checkpoint=checkpoint, callbacks=[lambda m: m.epoch == 1])
    assert len(stopped.history) == 1 and checkpoint.is_file()
    resumed = train.fit(params, tiny, seed=3, checkpoint=checkpoint)
    assert resumed.resumed_from_epoch == 1
    assert _metrics(resumed) == _metrics(uninterrupted)
    assert _same_weights(_weights(resumed), _weights(uninterrupted))
    assert [p.name for p in checkpoint.parent.iterdir()] == ["trial.ckpt"]  # no temporary files left behind


def test_checkpoint_of_other_params_is_refused(tiny, tmp_path):
    checkpoint = tmp_path / "trial.ckpt"
    train.fit(dict(SMALL_CNN, epochs=1), tiny, checkpoint=checkpoint)
    with pytest.raises(BadInput, match="belongs to other parameters"):
        train.fit(dict(SMALL_CNN, epochs=1, lr=0.1), tiny, checkpoint=checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short
    with pytest.raises(BadInput, match="unreadable checkpoint"):
        train.fit(dict(SMALL_CNN, epochs=1), tiny, checkpoint=checkpoint)


def test_gradient_accumulation_matches_big_batch(tiny):
    """Without BatchNorm or dropout, 2 x 25 accumulated equals one batch of 50 to float tolerance."""
    params = {"model": "mlp", "mlp_widths": [64], "batch_norm": False, "dropout": 0.0, "precision": "fp32",
              "epochs": 2, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine"}
    big = train.fit(dict(params, batch_size=50), tiny, seed=1)
    accumulated = train.fit(dict(params, batch_size=25, grad_accum_steps=2), tiny, seed=1)
    for a, b in zip(big.history, accumulated.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)
    for name, weight in _weights(big).items():
        torch.testing.assert_close(weight, _weights(accumulated)[name], rtol=1e-5, atol=1e-6)
    # ...and it is not trivially so: without accumulation the small batch takes other steps.
    small = train.fit(dict(params, batch_size=25), tiny, seed=1)
    assert small.history[-1].train_loss != pytest.approx(big.history[-1].train_loss, rel=1e-5)


def test_huge_learning_rate_raises_diverged(tiny):
    params = {"model": "mlp", "batch_norm": False, "lr": 1e4, "optimizer": "sgd", "schedule": "none",
              "epochs": 3, "batch_size": 50}
    with pytest.raises(train.Diverged) as err:
        train.fit(params, tiny)
    assert err.value.epoch >= 1 and err.value.step >= 0
    assert "loss became" in str(err.value)


def test_early_stopping_keeps_best_epoch_weights(tiny):
    # A learning rate too small to change predictions: no epoch beats the first.
    params = dict(SMALL_CNN, epochs=6, lr=1e-9, schedule="none", early_stopping_patience=2, dropout=0.0,
                  conv_dropout=0.0, augment=0.0)
    result = train.fit(params, tiny)
    assert result.stop_reason == "early_stopping"
    assert len(result.history) == 3 and result.best_epoch == 1
    val_loss, val_accuracy = train.evaluate(result.model, tiny.val, 1000, result.precision)
    assert val_accuracy == result.history[0].val_accuracy


def test_out_of_memory_becomes_typed_error_with_batch_size(tiny):
    def exhausted(module, inputs):
        if module.training:  # only the training step, not the FLOP count taken before it
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(exhausted)
    try:
        with pytest.raises(train.OutOfMemory) as err:
            train.fit(dict(SMALL_CNN, epochs=1, batch_size=25), tiny)
    finally:
        handle.remove()
    assert err.value.batch_size == 25 and "batch_size 25" in str(err.value)


@pytest.mark.parametrize(
    "params, fragment",
    [({"activation": "swishy"}, "activation"), ({"dropout": -0.5}, "dropout"), ({"learning_rate": 0.1}, "lr"),
     ({"batch_size": 0}, "batch_size"), ({"optimizer": "lion"}, "optimizer")],
)
def test_bad_parameter_fails_before_training(tiny, params, fragment):
    epochs_seen = []
    with pytest.raises(ParamError) as err:
        train.fit(dict(SMALL_CNN, **params), tiny, callbacks=[epochs_seen.append])
    assert fragment in str(err.value) and not epochs_seen


def test_batch_larger_than_training_set_is_refused(tiny):
    with pytest.raises(ParamError, match="batch_size = 5000 exceeds the 500 training images"):
        train.fit(dict(SMALL_CNN, batch_size=5000), tiny)


@pytest.mark.parametrize("optimizer", hparams.TRAIN_SPECS["optimizer"].options)
def test_every_optimizer_learns(tiny, optimizer):
    lr = {"sgd": 0.05}.get(optimizer, 3e-3)
    result = train.fit(dict(SMALL_CNN, epochs=2, optimizer=optimizer, lr=lr, label_smoothing=0.1, grad_clip=1.0), tiny)
    assert result.best_val_accuracy > 0.5  # 10 classes: chance is 0.1


def test_bf16_reaches_fp32_accuracy(tiny):
    """bf16 autocast (+ channels_last) trains as well as fp32: both converge on the tiny set."""
    params = dict(SMALL_CNN, epochs=4, lr=3e-3, augment=0.5)
    fp32 = train.fit(dict(params, precision="fp32"), tiny, seed=2)
    bf16 = train.fit(dict(params, precision="bf16"), tiny, seed=2)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert fp32.best_val_accuracy > 0.9
    assert abs(bf16.best_val_accuracy - fp32.best_val_accuracy) <= 0.03


@pytest.mark.data
def test_bf16_reaches_fp32_accuracy_on_mnist_subset():
    """The same on 5,000 real MNIST images, 1 epoch of the classic CNN: within 1.5 points."""
    from conftest import require_real_dataset

    require_real_dataset("mnist")
    prepared = loading.prepare("mnist", train_limit=5000, val_limit=1000)
    params = dict(hparams.CLASSIC["cnn"], epochs=1)
    fp32 = train.fit(dict(params, precision="fp32"), prepared, seed=0)
    bf16 = train.fit(dict(params, precision="bf16"), prepared, seed=0)
    assert fp32.best_val_accuracy > 0.9
    assert abs(bf16.best_val_accuracy - fp32.best_val_accuracy) <= 0.015


def test_trained_model_gives_a_listener_cpu_copies_predictions_and_inputs(tiny):
    result = train.fit(dict(SMALL_CNN, epochs=1), tiny, seed=1)
    trained = train.TrainedModel(result.model, tiny, result.precision)
    copy = trained.cpu_copy()
    assert copy is not result.model and not copy.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in copy.parameters())
    assert _same_weights(copy.state_dict(), _weights(result))
    predicted = trained.val_predictions()
    assert predicted.device.type == "cpu" and predicted.shape == (len(tiny.val),)
    _, accuracy = train.evaluate(result.model, tiny.val, 512, result.precision)  # predict's batch size
    assert int((predicted == tiny.val.labels.cpu()).sum()) / len(tiny.val) == accuracy
    inputs = trained.example_inputs(3)
    first_batch, _ = next(tiny.val.batches(3))
    assert inputs.device.type == "cpu" and torch.equal(inputs, first_batch.cpu())  # normalised, in order
    assert copy(inputs).shape == (3, 10)


def test_auto_precision_follows_the_hardware(tiny, monkeypatch):
    monkeypatch.delenv("PIPELINE_PRECISION", raising=False)  # the machine chooses (make test-portable sets fp32)
    result = train.fit(dict(SMALL_CNN, epochs=1), tiny)
    assert result.precision == ("bf16" if device.cpu_has_native_bf16() else "fp32")
    assert result.device == "cpu" and result.threads >= 1
    # The model that trained is the one counted: its parameters, and the FLOPs of a forward pass.
    assert result.parameter_count == sum(p.numel() for p in result.model.parameters())
    assert result.flops_per_image > result.parameter_count  # convolutions reuse each weight over the map


@pytest.mark.parametrize("setting", ["fp32", "bf16", " FP32 "])
def test_the_machine_precision_setting_decides_auto_and_a_study_fixed_value_wins(setting, monkeypatch):
    monkeypatch.setenv("PIPELINE_PRECISION", setting)
    cpu = torch.device("cpu")
    assert device.pick_precision("auto", cpu) == setting.strip().lower()
    assert device.pick_precision("fp32", cpu) == "fp32" and device.pick_precision("bf16", cpu) == "bf16"


def test_a_misspelt_machine_precision_stops_the_command_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_PRECISION", "fp16")
    assert main(["train", "--model", "mlp", "--dataset", "mnist"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "PIPELINE_PRECISION='fp16': expected one of auto, fp32, bf16; unset it to let the machine choose" in err


# --------------------------------------------------------------------------------------------------
# Transfer learning: cached backbone features, unfreezing, ImageNet input


RESNET_HEAD = {"model": "resnet18", "batch_size": 50, "epochs": 2, "precision": "fp32", "lr": 1e-2, "dropout": 0.3,
               "eval_batch_size": 50}


def test_feature_extraction_without_augmentation_trains_the_head_on_cached_features(tiny, imagenet_weights):
    """The frozen backbone runs once per split; the result matches the full forward pass every step."""
    cached_params = dict(RESNET_HEAD, resnet_mode="feature_extract", augment=0.0)
    calls = []
    cached = train.fit(cached_params, tiny, seed=4, callbacks=[lambda m: calls.append(m.epoch)])
    full = _fit_without_feature_cache(cached_params, tiny, seed=4)
    for ours, reference in zip(cached.history, full.history, strict=True):
        assert ours.val_accuracy == reference.val_accuracy
        assert ours.train_accuracy == reference.train_accuracy
        assert abs(ours.train_loss - reference.train_loss) < 1e-4 and abs(ours.val_loss - reference.val_loss) < 1e-4
    assert calls == [1, 2]
    backbone = {k: v for k, v in cached.model.state_dict().items() if k.startswith("backbone.")}
    assert all(torch.equal(v, imagenet_weights[k.removeprefix("backbone.")]) for k, v in backbone.items()
               if k.removeprefix("backbone.") in imagenet_weights)  # frozen: ImageNet's weights unchanged


def _fit_without_feature_cache(params, prepared, seed):
    """train.fit with the feature cache turned off: the backbone runs on every batch, as without the cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "backbone_features", lambda model, split, *args: _PassThrough(model, split))
        return train.fit(params, prepared, seed=seed)


class _PassThrough:
    """A 'feature split' that runs the backbone on each batch (what the trainer did before the cache)."""

    def __init__(self, model, split):
        self.model, self.split, self.labels, self.device = model, split, split.labels, split.device

    def __len__(self):
        return len(self.split)

    def batches(self, batch_size, generator=None, augment=None, drop_last=False):
        for x, y in self.split.batches(batch_size, generator, augment, drop_last):
            was = self.model.backbone.training
            self.model.backbone.eval()
            with torch.no_grad():
                features = self.model.features(x)
            self.model.backbone.train(was)
            yield features, y


def test_unfreeze_epoch_trains_the_head_alone_first(tiny, imagenet_weights, monkeypatch):
    params = dict(RESNET_HEAD, resnet_mode="finetune", unfreeze_epoch=1, augment=0.0, epochs=2)
    built, snapshots = [], []
    build = train.models.build_model
    monkeypatch.setattr(train.models, "build_model", lambda *args: built.append(build(*args)) or built[-1])
    train.fit(params, tiny, seed=2,
              callbacks=[lambda m: snapshots.append(built[0].backbone.layer1[0].conv1.weight.detach().clone())])
    pretrained = imagenet_weights["layer1.0.conv1.weight"]
    assert torch.equal(snapshots[0], pretrained)  # epoch 1: head only
    assert not torch.equal(snapshots[1], pretrained)  # epoch 2: the whole network


def test_natural_policy_trains_and_is_deterministic(tiny):
    params = dict(SMALL_CNN, epochs=1, augment_policy="natural")
    first, second = train.fit(params, tiny, seed=1), train.fit(params, tiny, seed=1)
    assert _metrics(first) == _metrics(second)
    digits = train.fit(dict(params, augment_policy="digits"), tiny, seed=1)
    assert _metrics(digits) != _metrics(first)
    assert _metrics(train.fit(dict(params, augment_policy="auto"), tiny, seed=1)) == _metrics(digits)  # tiny: IDX


PAGE_FAULTS_OF_EVALUATION = """
import resource, sys, torch
from pipeline.training import allocator
from pipeline.spec import hparams
from pipeline.training import models
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
torch.set_num_threads(1)
model = models.build_model(hparams.CLASSIC["cnn"]).eval()
x = torch.randn(256, 1, 28, 28)
with torch.no_grad():
    model(x)  # warm-up: the first pass may fault in everything once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        model(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_are_kept_so_repeated_steps_stop_faulting_pages_in():
    """Evaluation-sized activations (megabytes) are mapped afresh and zeroed by the kernel on every pass unless
    malloc keeps them (allocator.keep_freed_memory, which fit calls): counted page faults, not timed."""
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_EVALUATION, mode], capture_output=True, text=True,
                              check=True)
        faults[mode] = int(done.stdout.split()[-1])
    assert faults["keep"] * 5 < faults["default"], faults


def test_fit_turns_off_deterministic_modes_nan_fill_of_new_tensors(tiny):
    """A debugging aid that costs a sixth of a small CPU step; runs stay bit for bit the same without it
    (test_same_seed_bitwise_identical_metrics_and_weights)."""
    train.fit(dict(SMALL_CNN, epochs=1), tiny)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def test_fp32_trains_channels_last_and_a_run_recorded_before_replays_in_its_own_layout(tiny):
    """fp32 on the CPU now trains in channels_last (faster convolutions); a run recorded before the layout was
    recorded trained NCHW, and its replay must use NCHW to match it bit for bit."""
    from datetime import datetime

    from pipeline import store
    from pipeline.commands import replay
    from pipeline.search.objective import history_record

    params = {"model": "cnn", "cnn_channels": [8, 16], "epochs": 2, "batch_size": 50, "precision": "fp32",
              "lr": 0.01}
    today = train.fit(params, tiny, seed=3, threads=1)
    assert today.memory_format == "channels_last"
    before = train.fit(params, tiny, seed=3, threads=1, memory_format="contiguous")
    history = [history_record(m) for m in before.history]
    assert history != [history_record(m) for m in today.history]  # the layout changes the arithmetic's last bits
    legacy = store.TrialRecord(4, "COMPLETE", [before.best_val_accuracy], {}, 1.0, datetime.now(), seed=3,
                               params=before.params, history=history, precision="fp32", threads=1, device="cpu")
    assert replay.compare(legacy, tiny).differences == []


def test_a_run_recorded_before_its_evaluation_batch_was_replays_at_the_batch_of_then(tiny_dataset):
    """Validation now runs in batches of 128 (no fresh pages faulted in per batch); a run recorded before evaluated
    in batches of 1000, which changes the validation loss's last bits, so its replay must evaluate at 1000 to match
    it bit for bit, and a run that recorded its batch replays at that one."""
    import dataclasses
    from datetime import datetime

    from pipeline import store
    from pipeline.commands import replay
    from pipeline.search.objective import history_record

    _, root = tiny_dataset
    data = loading.prepare("tiny", root, val_size=300)  # three batches of 128 or less, one of 1000
    params = {"model": "cnn", "cnn_channels": [8, 16], "epochs": 1, "batch_size": 50, "precision": "fp32"}
    today = train.fit(params, data, seed=3, threads=1)
    before = train.fit(params | {"eval_batch_size": hparams.LEGACY_EVAL_BATCH_SIZE}, data, seed=3, threads=1)
    history_today, history_before = ([history_record(m) for m in run.history] for run in (today, before))
    assert history_before != history_today
    legacy = store.TrialRecord(4, "COMPLETE", [before.best_val_accuracy], {}, 1.0, datetime.now(), seed=3,
                               params=params, history=history_before, precision="fp32", threads=1, device="cpu",
                               memory_format="channels_last")
    assert replay.compare(legacy, data).differences == []
    # A batch that is neither the default nor the legacy one: the replay takes it from the record.
    other = train.fit(params | {"eval_batch_size": 64}, data, seed=3, threads=1)
    recorded = dataclasses.replace(legacy, history=[history_record(m) for m in other.history], eval_batch_size=64)
    assert replay.compare(recorded, data).differences == []
