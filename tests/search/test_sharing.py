"""Several small trials on one device (search/sharing.py): the measurement runs real processes at once (here on the
CPU, the only device every machine has); the choice and the plan it sizes are fed faked slowdowns."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_study import write_study

from pipeline.commands.search import decide_workers
from pipeline.infra import memory
from pipeline.infra.memory import GPU_WORKERS_ENV, HOST_WORKERS_ENV
from pipeline.search import calibration, plan, planned, sharing, workers
from pipeline.search.options import SearchOptions
from pipeline.search.plan import Budget, Rate, Rates
from pipeline.spec import studies
from pipeline.spec.errors import BadInput

# About one GPU's rates for the cnn space with one trial on it: 20-40 us per training image.
GPU = Rates(8, (Rate(5_000_000, 0.00002, 0.000005), Rate(60_000_000, 0.00004, 0.00001)), trial_seconds=1.0)
MNIST = Budget(minutes=30, train_images=55_000, val_images=5_000, classes=10, epochs=5, workers=1, top_k=2, seeds=3)


def test_trials_sharing_a_device_train_at_once_each_in_its_own_process(tiny, tmp_path):
    params = calibration.representatives(_tiny_spec(tmp_path), tiny)[0]
    timings = sharing.timed_together(params, tiny, torch.device("cpu"), threads=1, k=2)
    assert len({t.pid for t in timings}) == 2
    # The barrier starts their timed batches together: the two windows overlap.
    assert max(t.started for t in timings) < min(t.ended for t in timings)
    assert all(t.seconds_per_image > 0 for t in timings)


def test_a_process_that_fails_leaves_its_k_unmeasured_rather_than_hanging(tiny, tmp_path):
    params = {**calibration.representatives(_tiny_spec(tmp_path), tiny)[0], "batch_size": 10_000}  # > the images
    failed = sharing.timed_together(params, tiny, torch.device("cpu"), threads=1, k=2)
    assert isinstance(failed, str) and failed.startswith("ParamError") and "batch_size = 10000" in failed


@pytest.mark.parametrize(("failure", "measured", "cached"), [
    ({4: "OutOfMemoryError: CUDA out of memory"}, {1: 1.0, 2: 1.5}, True),  # the device's limit: kept
    ({4: f"{sharing.TIMED_OUT} after 300 s"}, {1: 1.0, 2: 1.5}, False),  # a slow start: measured again next time
    ({1: "RuntimeError: busy"}, {1: 1.0}, False),  # nothing measured: one per GPU, measured again next time
])
def test_a_k_that_fails_ends_the_measurement_and_only_a_lasting_limit_is_cached(tiny, tmp_path, monkeypatch,
                                                                                 failure, measured, cached):
    """timed_together faked (it is measured above): 2 at once take 1.5x as long each; a k in `failure` fails."""
    tried, said = [], []

    def timed(params, data, device, threads, k):
        tried.append(k)
        return failure.get(k) or [sharing.Timing(k, 0.0, 1.0, 0.001 * (1.5 if k == 2 else 1.0))] * k

    monkeypatch.setattr(sharing, "timed_together", timed)
    spec, cpu = _tiny_spec(tmp_path), torch.device("cpu")
    assert sharing.slowdowns(spec, tiny, cpu, 1, 1, tmp_path, said.append) == measured
    assert tried == [k for k in sharing.SHARES if k <= max(failure)]  # nothing after the k that failed
    assert said[-1].startswith(f"{max(failure)} trials at once on the cpu failed ({failure[max(failure)]})")
    assert (tmp_path / calibration.CACHE_FILE).is_file() == cached


def test_the_slowdowns_are_measured_once_and_then_read_from_the_machines_cache(tiny, tmp_path):
    spec, cpu = _tiny_spec(tmp_path), torch.device("cpu")
    measured = sharing.slowdowns(spec, tiny, cpu, threads=1, gpus=1, root=tmp_path, shares=(1, 2))
    assert set(measured) == {1, 2} and measured[1] == 1.0 and measured[2] > 0
    cached = json.loads((tmp_path / calibration.CACHE_FILE).read_text())
    assert [v for k, v in cached.items() if k.startswith("shared:")] == [{"1": 1.0, "2": measured[2]}]
    assert sharing.slowdowns(spec, tiny, cpu, threads=1, gpus=1, root=tmp_path, shares=(1, 2)) == measured  # cached


@pytest.mark.parametrize(("slowdowns", "chosen"), [
    ({1: 1.0, 2: 1.1, 4: 1.6, 8: 4.5}, 4),  # small models on a big GPU: 4 at once train 2.5x the images
    ({1: 1.0, 2: 1.9, 4: 3.9}, 1),  # a busy device: two at once are no faster together
    ({1: 1.0, 2: 1.05, 4: 3.8}, 2),  # four at once fall back below two
    ({1: 1.0}, 1),
])
def test_a_device_takes_more_trials_at_once_only_where_together_they_train_more_images(slowdowns, chosen):
    assert sharing.per_device(slowdowns) == chosen


def test_a_trial_sharing_its_device_is_slowed_by_the_nearest_k_measured_in_its_images_only():
    measured = {1: 1.0, 2: 1.2, 4: 2.0}
    assert sharing.shared_rates(GPU, measured, 1) == GPU
    assert sharing.shared_rates(GPU, measured, 3) == sharing.shared_rates(GPU, measured, 4)  # a tie: the larger
    shared = sharing.shared_rates(GPU, measured, 6)  # beyond the measured: the largest
    assert shared.points[0].train_seconds_per_image == pytest.approx(2.0 * GPU.points[0].train_seconds_per_image)
    assert shared.trial_seconds == GPU.trial_seconds


def test_a_gpu_shared_by_four_small_trials_plans_as_many_more_configurations_as_they_train_images():
    alone = plan.make_plan(MNIST, GPU, GPU)
    shared = plan.make_plan(Budget(**{**MNIST.__dict__, "workers": 4}),
                            sharing.shared_rates(GPU, {1: 1.0, 4: 1.6}, 4), GPU)
    first = alone.rungs[0]
    one_alone = GPU.run_seconds(first.images, first.epochs, MNIST.val_images, GPU.promoted_flops)
    one_shared = sharing.shared_rates(GPU, {1: 1.0, 4: 1.6}, 4).run_seconds(first.images, first.epochs,
                                                                           MNIST.val_images, GPU.promoted_flops)
    assert one_alone < one_shared < 1.6 * one_alone  # its images 1.6x slower, its building and recording not
    faster = 4 * one_alone / one_shared  # the trials a second of four at once, over one alone (3.5 here)
    # Rung 0's stage trains its configurations that many times as fast...
    pace = (first.seconds / first.configs) / (shared.rungs[0].seconds / shared.rungs[0].configs)
    assert pace == pytest.approx(faster, rel=0.1)
    # ...and samples more of them; fewer than `faster` times as many, since the later rungs (a third of the rung
    # below each, one at a time on the whole device) grow with it and take their share of the minutes.
    assert shared.rungs[0].configs > 1.5 * first.configs and shared.rungs[1].configs > first.configs / 3
    assert alone.rungs[0].configs >= 100  # a GPU's 30 minutes: hundreds of configurations
    assert shared.rungs[0].parallel == 4 and shared.planned_seconds <= 30 * 60


def test_workers_auto_puts_the_measured_number_of_trials_on_each_gpu(monkeypatch):
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0", "1"])
    count, why = workers.auto_count("cuda", "sqlite:///x.db", None, 1000, per_gpu=3)
    assert count == 6 and why == "WORKERS=auto: 6 workers (3 per GPU on 2 GPUs, measured faster than one each)"
    assert workers.auto_count("cuda", "sqlite:///x.db", None, 1000)[0] == 2
    assert workers.auto_count("cuda", "sqlite:///x.db", None, 4, per_gpu=3)[0] == 4  # never more than the trials


def _tiny_spec(folder, **study) -> studies.StudySpec:
    return studies.load(write_study(folder, **{"minutes": 5, "timeout_minutes": None, **study}))


def test_a_planned_search_on_a_gpu_decides_its_workers_from_the_measured_sharing(tiny_dataset, tmp_path, monkeypatch):
    """The wiring only: the device is named cuda and its measurement faked (the measurement is tested above)."""
    _, root = tiny_dataset
    spec = _tiny_spec(tmp_path, trials=100)
    heard = []
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(sharing, "measured_here", lambda *args: heard.append(args[-1]) or {1: 1.0, 2: 1.1, 4: 1.5})
    cuda = torch.device("cuda")
    journal = SearchOptions(workers=workers.AUTO, root=root, storage=str(tmp_path / "optuna.journal"))
    decided, why = decide_workers(spec, journal, cuda, print)
    assert decided.workers == 4 and "4 per GPU on 1 GPU" in why and heard == [print]
    sqlite = dataclasses.replace(journal, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert decide_workers(spec, sqlite, cuda)[0].workers == 1  # one writer on a SQLite file, as on a CPU
    counted = studies.StudySpec.model_validate({**spec.model_dump(), "minutes": None})
    assert decide_workers(counted, journal, cuda)[0].workers == 1  # a study counted in trials is not planned
    assert len(heard) == 1


def test_the_plan_of_a_shared_gpu_counts_each_rung_zero_trial_at_its_shared_pace(tiny, tmp_path, monkeypatch):
    """The wiring only, as above: the device's rates and sharing are faked, the plan is made as a search makes it."""
    spec = _tiny_spec(tmp_path)
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(calibration, "rates", lambda *args: GPU)
    monkeypatch.setattr(sharing, "measured_here", lambda *args: {1: 1.0, 2: 1.1, 4: 1.5})
    made = planned.make(spec, tiny, torch.device("cuda"), 4, None, tmp_path)
    first, shared = made.rungs[0], sharing.shared_rates(GPU, {4: 1.5}, 4)
    assert first.parallel == 4
    assert first.seconds_each == pytest.approx(shared.run_seconds(first.images, first.epochs, len(tiny.val),
                                                                 shared.promoted_flops))
    assert planned.make(spec, tiny, torch.device("cuda"), 1, None, tmp_path).rungs[0].seconds_each == pytest.approx(
        GPU.run_seconds(first.images, first.epochs, len(tiny.val), GPU.promoted_flops))
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0", "1"])
    assert planned.make(spec, tiny, torch.device("cuda"), 2, None, tmp_path).rungs[0].seconds_each == pytest.approx(
        GPU.run_seconds(first.images, first.epochs, len(tiny.val), GPU.promoted_flops))  # one on each GPU


def test_a_cpu_plan_never_measures_sharing(tiny, tmp_path, monkeypatch):
    def refuse(*args):
        raise AssertionError("a CPU's workers share its cores by threads; nothing to measure")

    monkeypatch.setattr(sharing, "measured_here", refuse)
    monkeypatch.setattr(calibration, "rates", lambda *args: GPU)
    assert planned.make(_tiny_spec(tmp_path), tiny, torch.device("cpu"), 2, None, tmp_path).rungs[0].parallel == 2


def test_each_worker_is_told_how_many_share_its_gpu():
    plans = workers.plan(3, 1, ["0", "1"])  # round robin: workers 1 and 3 on GPU 0
    told = [workers.worker_environment(p, plans, None) for p in plans]
    assert [(e["CUDA_VISIBLE_DEVICES"], e[GPU_WORKERS_ENV], e[HOST_WORKERS_ENV]) for e in told] == [
        ("0", "2", "3"), ("1", "1", "3"), ("0", "2", "3")]
    assert GPU_WORKERS_ENV not in workers.worker_environment(workers.plan(1, 1, [])[0], plans, {})


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_gpu_workers_value_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(GPU_WORKERS_ENV, value)
    with pytest.raises(BadInput) as refused:
        memory.gpu_workers()
    assert str(refused.value).startswith(f"{GPU_WORKERS_ENV}={value!r}: expected the number of worker processes on "
                                         "this GPU") and "\n" not in str(refused.value)
    monkeypatch.setenv(GPU_WORKERS_ENV, "3")
    assert memory.gpu_workers() == 3


def test_workers_sharing_a_gpu_split_its_memory_share_for_resident_data(monkeypatch):
    """loading._placement on a (named) cuda device whose free memory is faked: 2 workers each get half the share."""
    from pipeline.data import loading

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4_000_000, 8_000_000))
    monkeypatch.delenv(GPU_WORKERS_ENV, raising=False)
    assert loading._placement(1_500_000, torch.device("cuda"), None, 1)[0]  # alone: half of 4 MB
    monkeypatch.setenv(GPU_WORKERS_ENV, "2")
    fits, why = loading._placement(1_500_000, torch.device("cuda"), None, 1)
    assert not fits and why.endswith(", split among the 2 workers on it")
