"""The champion out of the pipeline: `exports/<study>/`, verified by a fresh process (predict.py uses it).

An export holds everything needed to use the model with torch alone:

    model.pt2            torch.export program (CPU, float32, any batch size); loading one unpickles it, so it
                         is code to trust like any program (predict.py does not load it)
    weights.pt           plain state dict: torch.load(..., weights_only=True)
    config.json          architecture params, input shape, per-channel mean/std, how pictures are prepared
                         (`preprocessing`), classes, dataset digest, provenance, versions
    metrics.json         validation accuracy as recorded, test accuracy measured now, per class,
                         parameters, FLOPs, CPU latency (batch 1) and throughput (batch 256)
    model_card.md        what it is, how it was found, the figures, its limits
    confusion_matrix.png, misclassified.png   on the test split
    verify.py            re-evaluates model.pt2 on the test split with torch alone
    test_rows.npy        (datasets read from the image cache: CIFAR, folders) which cache rows are the
                         test split, for verify.py

The directory is written under a temporary name; a fresh process then runs verify.py, and only if its
test accuracy equals metrics.json exactly is the directory renamed into place. Otherwise the partial
directory is removed and the export fails (exit 1). The test split is read here and nowhere else.

What an export-best killed outright leaves (`.<study>.partial-<pid>`, `.<study>.replaced-<pid>`) is put right
by the next export-best of that study, before anything else (`_tidy`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import store
from pipeline.commands import verify_export
from pipeline.commands.export_choice import ExportedModel, find_champion
from pipeline.commands.model_card import model_card
from pipeline.commands.verify_export import TEST_ROWS
from pipeline.data import imagecache, loading
from pipeline.data.arrays import Arrays
from pipeline.data.recorded import recorded_test_split
from pipeline.infra import fileio, revision
from pipeline.reports import plots
from pipeline.search import champion
from pipeline.spec import hparams, paths, sources, studies
from pipeline.spec.errors import BadInput
from pipeline.tracking import registry
from pipeline.training import latency, models


class ExportFailed(Exception):
    """The written export did not reproduce its own figures; nothing was left behind."""


def export_best(spec: studies.StudySpec, storage_override: str | None = None, root: Path = paths.DATA_ROOT,
                client: Any | None = None, out_dir: Path = paths.EXPORTS_DIR, force: bool = False,
                threads: int | None = None, log: Any = print, trial: int | None = None) -> Path:
    """`make export-best`: write the champion to `out_dir/<study>/`, verified by a fresh process, and log its
    test accuracy to its MLflow runs (with `client`: an MLflow client, whose registry is asked first). With
    `trial` (TRIAL=n), that complete trial instead, to `out_dir/<study>-trial-<n>/`: the champion's export stays."""
    destination = out_dir / (spec.name if trial is None else f"{spec.name}-trial-{trial}")
    _tidy(destination, log)
    if destination.exists() and not force:
        raise BadInput(f"{destination} already exists; pass FORCE=1 (make export-best) or --force to replace it")
    chosen = find_champion(spec, store.open_storage(storage_override, spec.name), root, client, log, trial)
    log(f"exporting {chosen.source}: {chosen.describe()} of {chosen.study_name!r}")
    threads = threads or torch.get_num_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        metrics = write_export(chosen, spec, root, partial, threads)
        verified = verify(partial, root)
        if verified["correct"] != metrics["test_correct"] or verified["project_code_loaded"]:
            raise ExportFailed(f"a fresh process scored model.pt2 {verified['correct']}/{verified['total']} on the "
                               f"test split, metrics.json says {metrics['test_correct']}/{metrics['test_images']}")
        _move_into_place(partial, destination, force)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if client is not None and chosen.run_ids:
        registry.log_test_metrics(client, chosen.run_ids, {"test_accuracy": metrics["test_accuracy"]})
    return destination


def _move_into_place(partial: Path, destination: Path, force: bool) -> None:
    """Rename the verified export into place; with `force`, the previous one goes only once the new one is there.

    The new export is whole on disk before the first rename, so a swap cut short (a kill, a power loss) can be
    finished by the next export-best (`_tidy`), and the renames are flushed to disk before this returns.
    """
    fileio.sync_tree(partial)
    if not destination.exists():
        try:
            fileio.rename_durably(partial, destination)
            return
        except OSError:  # it appeared meanwhile (another export): treat it as existing
            pass
    if not force:
        raise BadInput(f"{destination} already exists; pass FORCE=1 (make export-best) or --force to replace it")
    previous = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
    os.rename(destination, previous)
    try:
        fileio.rename_durably(partial, destination)
    except OSError:
        if not destination.exists():  # another export did not take its place meanwhile: put it back
            fileio.rename_durably(previous, destination)
        raise
    shutil.rmtree(previous)


def _tidy(destination: Path, log: Any) -> None:
    """Put right what an export-best of this study that was killed outright left beside `destination`.

    Killed while writing or verifying: a `.partial-<pid>`, removed. Killed between the swap's two renames: a
    `.replaced-<pid>` (the previous export) and no export in place; the `.partial-<pid>` of the same process
    was verified (the swap starts only then), so it is moved into place, or, if it is not there, the previous
    export is restored. Killed after the renames: a `.replaced-<pid>`, removed. Leftovers of processes still
    running (another export-best of the study) are left alone.
    """
    pattern = re.compile(rf"^\.{re.escape(destination.name)}\.(?P<kind>partial|replaced)-(?P<pid>\d+)$")
    found = fileio.dead_leftovers(destination.parent, pattern)
    for path in sorted(found, key=lambda p: ".partial-" in p.name):  # the .replaced- ones first
        pid = path.name.rsplit("-", 1)[1]
        partial = destination.parent / f".{destination.name}.partial-{pid}"
        if ".replaced-" in path.name and not destination.exists():
            if partial.is_dir():
                fileio.rename_durably(partial, destination)
                log(f"{destination}: finished replacing the export with the verified one that a killed export-best "
                    f"(pid {pid}) left in {partial.name}")
            else:
                fileio.rename_durably(path, destination)
                log(f"{destination}: restored the previous export from {path.name}, left by a killed export-best "
                    f"(pid {pid})")
                continue
        if path.exists():
            fileio.remove(path)
            log(f"removed {path}, left by a killed export-best (pid {pid})")


def write_export(chosen: ExportedModel, spec: studies.StudySpec, root: Path, directory: Path,
                 threads: int) -> dict[str, Any]:
    """Every file but the verification; returns metrics.json's content."""
    torch.set_num_threads(threads)
    dataset, test, arrays = recorded_test_split(chosen.definition, root)
    loading.require_digest(chosen.trial.dataset_digest, arrays.checksum, chosen.trial_number,
                        sources.dataset_label(dataset),
                        "restore the pictures it was trained on, or search again and export that")
    example = test.inputs(slice(0, 4), None, None)
    _write_model(chosen.model, example, directory)
    if arrays.memory_mapped:  # the test split is rows of the image cache: verify.py needs to know which
        np.save(directory / TEST_ROWS, arrays.test_rows.numpy().astype(np.int64), allow_pickle=False)
    config = _config(chosen, spec, dataset, test, arrays, threads)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    exported = torch.export.load(str(directory / "model.pt2")).module()  # score exactly what was written
    scores = verify_export.logits(exported, test.images, config["mean"], config["std"], verify_export.EVAL_BATCH)
    predicted = scores.argmax(1)
    speed = latency.export_speed(exported, example)
    metrics = _metrics(chosen, spec, predicted, test.labels, config, speed, threads)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plots.confusion_matrix(test.labels.numpy(), predicted.numpy(), config["classes"],
                           directory / "confusion_matrix.png", title=f"{spec.name} champion: test split")
    plots.mistakes_grid(test.images.numpy(), test.labels.numpy(), predicted.numpy(),
                        scores.softmax(1).max(1).values.numpy(), config["classes"], directory / "misclassified.png",
                        title=f"{spec.name} champion")
    card = model_card(spec, chosen, config, metrics, dataset, arrays.given_val is not None,
                      cached=arrays.memory_mapped)
    (directory / "model_card.md").write_text(card)
    return metrics


def _write_model(model: torch.nn.Module, example: torch.Tensor, directory: Path) -> None:
    """model.pt2 (any batch size), weights.pt and verify.py."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    # Serialised in memory and written by Python: torch's file writer aborts the process on a full disk.
    (directory / "model.pt2").write_bytes(_serialised(lambda buffer: torch.export.save(program, buffer)))
    (directory / "weights.pt").write_bytes(_serialised(lambda buffer: torch.save(model.state_dict(), buffer)))
    shutil.copy(Path(verify_export.__file__), directory / "verify.py")


def _serialised(save: Callable[[io.BytesIO], None]) -> bytes:
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def _config(chosen: ExportedModel, spec: studies.StudySpec, dataset: sources.DatasetRef, test: loading.ResidentImages,
            arrays: Arrays, threads: int) -> dict[str, Any]:
    """config.json: what the model is, what it expects, and where it came from."""
    params = hparams.resolve_params(chosen.params)
    input_shape = list(test.shape)
    channels, height, width = input_shape
    return {
        "model": params["model"],
        "params": params,
        "input_shape": input_shape,
        "input": f"float32 [N, {channels}, {height}, {width}]: uint8 pixels / 255, then (x - mean) / std per channel",
        "mean": list(test.mean),
        "std": list(test.std),
        "preprocessing": arrays.preprocessing.as_dict(),  # how `predict` turns a picture into the input
        "classes": list(arrays.classes),
        "dataset": sources.dataset_label(dataset),
        "dataset_checksum": arrays.checksum,
        "split_hash": chosen.split_hash,
        "study": chosen.study_name,
        "study_file": spec.name,
        "trial_number": chosen.trial_number,
        "trial_seed": chosen.trial.seed,
        "repeat": chosen.trial.repeat,  # 0: the search's own run; else the champion phase's run of the trial
        "source": chosen.source,
        "git_commit": revision.git_commit(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "evaluation": {"threads": threads, "batch_size": verify_export.EVAL_BATCH},
    }


def _metrics(chosen: ExportedModel, spec: studies.StudySpec, predicted: torch.Tensor, labels: torch.Tensor,
             config: dict[str, Any], speed: tuple[float, float], threads: int) -> dict[str, Any]:
    """metrics.json: accuracy on the test split, size, and CPU speed (seconds per image, images per second)."""
    classes, (seconds, throughput) = config["classes"], speed
    correct = int((predicted == labels).sum())
    per_class = {classes[c]: int((predicted[labels == c] == c).sum()) / max(int((labels == c).sum()), 1)
                 for c in range(len(classes))}
    model = chosen.model
    return {
        "val_accuracy": max((h["val_accuracy"] for h in chosen.trial.history), default=None),
        "objective": dict(zip(spec.metrics, chosen.trial.values or [], strict=False)),
        "val_over_seeds": _over_seeds(chosen.confirmed),
        "test_accuracy": correct / len(labels),
        "test_correct": correct,
        "test_images": len(labels),
        "test_per_class_accuracy": per_class,
        "parameter_count": models.count_parameters(model),
        "flops_per_image": models.flops_per_image(model, tuple(config["input_shape"])),
        "cpu_latency_ms_batch1_median": seconds * 1000,
        "cpu_throughput_images_per_s_batch256": throughput,
        "cpu_threads": threads,
    }


def _over_seeds(confirmed: champion.Candidate | None) -> dict[str, Any] | None:
    """The configuration's validation figures over its seeds (the champion phase), for metrics.json."""
    if confirmed is None:
        return None
    s = confirmed.summary
    return {"runs": s.n, "mean": s.mean, "std": s.std, "ci95_low": s.ci_low, "ci95_high": s.ci_high,
            "min": s.low, "max": s.high, "values": [r.value for r in confirmed.runs]}


def verify(directory: Path, root: Path = paths.DATA_ROOT) -> dict[str, Any]:
    """Run the export's verify.py in a fresh process; returns its result (which says if project code loaded).

    The test split is read where the pipeline landed it: the IDX test files of MNIST-like datasets, or the
    image cache of the dataset's digest (CIFAR, folders) with the export's own test_rows.npy.
    """
    config = json.loads((directory / "config.json").read_text())
    command = [sys.executable, str(directory / "verify.py"), "--export", str(directory), *_test_files(config, root,
                                                                                                    directory)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=directory, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportFailed(f"{directory / 'model.pt2'} could not be re-evaluated by a fresh process: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _test_files(config: dict, root: Path, directory: Path) -> list[str]:
    """verify.py's arguments that name the test split's files."""
    cache = imagecache.cache_dir(root, config["dataset_checksum"])
    if (directory / TEST_ROWS).is_file():
        if not (cache / "images.npy").is_file():
            raise BadInput(f"{cache}: the image cache of {config['dataset']!r} (digest {config['dataset_checksum']}) "
                           f"is missing; run `make search` on its study to land it again, or pass --root")
        return ["--images", str(cache / "images.npy"), "--labels", str(cache / "labels.npy"),
                "--rows", str(directory / TEST_ROWS)]
    raw = sources.dataset_info(config["dataset"]).raw_dir(root)
    return ["--images", str(raw / sources.TEST_IMAGES), "--labels", str(raw / sources.TEST_LABELS)]
