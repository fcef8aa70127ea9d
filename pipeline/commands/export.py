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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from pipeline import store
from pipeline.commands import replay, verify_export
from pipeline.data import imagecache, loading
from pipeline.infra import fileio
from pipeline.reports import plots
from pipeline.search import champion as champion_phase
from pipeline.search import pareto
from pipeline.spec import hparams, paths, sources, studies
from pipeline.spec.errors import BadInput
from pipeline.spec.sources import DEFAULT_VAL_SIZE, DIGITS, FolderSource
from pipeline.spec.studies import StudyError
from pipeline.store import Storage
from pipeline.tracking import registry
from pipeline.training import models, reproducibility, train
from pipeline.training.latency import median_seconds

LATENCY_RUNS = 200
THROUGHPUT_BATCH = 256
THROUGHPUT_RUNS = 10
TEST_ROWS = "test_rows.npy"  # written for datasets read from the image cache: the test split's rows of it


class ExportFailed(Exception):
    """The written export did not reproduce its own figures; nothing was left behind."""


@dataclass
class Champion:
    """The model to export and where it came from."""

    study_name: str  # the Optuna study (version) it belongs to
    trial: store.TrialRecord
    definition: dict[str, Any]  # that study's search definition (dataset, val_size, limits, ...)
    model: torch.nn.Module  # CPU, float32, eval mode
    source: str  # one line: registry version, or retrained from the recorded trial
    run_ids: list[str]  # MLflow runs that get the test figures (champion run, parent run)
    split_hash: str  # the validation split it was judged on: recorded by the trial, or (older trials) rebuilt
    confirmed: champion_phase.Candidate | None = None  # its configuration's runs over seeds (champion phase)
    how_chosen: str = ""  # one line for the model card: the study's rule, or the user's TRIAL=

    @property
    def trial_number(self) -> int:
        """The search trial whose configuration this is (a champion-phase run trains one again)."""
        return self.trial.confirmation_of if self.trial.confirmation_of is not None else self.trial.number

    def describe(self) -> str:
        if self.trial.confirmation_of is None:
            return f"trial {self.trial.number}"
        return f"repeat {self.trial.repeat} of trial {self.trial.confirmation_of}"


# --------------------------------------------------------------------------------------------------
# Finding the champion


def find_champion(spec: studies.StudySpec, storage: Storage, root: Path, client: Any | None,
                  log: Any = print, trial: int | None = None) -> Champion:
    """The registry's `champion` of the study's model, else the study's champion (its best trial, the champion
    phase's or the Pareto front's choice) retrained from its record; with `trial`, that complete trial retrained."""
    study = store.find_study(spec, storage.backend)  # StudyError (exit 2) when the study was never run
    how = ""
    if trial is not None:
        best, confirmed = _complete_trial(study, trial), None
        what, why = f"trial {trial}", "TRIAL= asks for it"
        how = f"Chosen by the user (`make export-best TRIAL={trial}`), not by the study's rule"
    else:
        version = registry.champion(client, spec.name) if client is not None else None
        if version is not None:
            return _registered(spec, storage, root, version)
        decision, confirmed = pareto.decide(spec, study), None
        best = decision.trial
        if best is None:
            raise BadInput(f"study {study.study_name!r} has no complete trial to export (or none its [champion] "
                           f"accepts); run `make search STUDY={spec.name}` until one completes")
        what, why = f"trial {best.number}", f"no registered champion for {spec.name!r}"
        if spec.pareto_choice is not None:
            how = f"Chosen from {decision.reason}"
        table, companion = _phase(spec, storage, study)
        if table is not None and table.exported is not None:  # the champion phase's choice: its run nearest the mean
            confirmed, best = table.champion, store.record(companion, table.exported.number)
            what = f"repeat {best.repeat} of trial {best.confirmation_of} (the champion phase's choice)"
    definition = store.definition(study)
    log(f"{why}: retraining {what} of {study.study_name!r} from its recorded params and seed")
    prepared = replay.recorded_data(definition, root, train.pick_device())

    def progress(m: train.EpochMetrics) -> None:
        log(f"  epoch {m.epoch}: val_accuracy {m.val_accuracy:.4f} ({m.epoch_seconds:.0f} s)")

    result = replay.retrain(best, prepared, progress)
    recorded = [h["val_accuracy"] for h in best.history]
    if recorded and max(recorded) != result.best_val_accuracy:
        log(f"warning: the retrained validation accuracy {result.best_val_accuracy} differs from the recorded "
            f"{max(recorded)} (another device or thread count?)")
    return Champion(study.study_name, best, definition, train.export_ready_copy(result.model),
                    f"{what} retrained from its recorded params and seed ({why})", [],
                    best.split_hash or prepared.split_hash, confirmed, how)


def _complete_trial(study: optuna.Study, number: int) -> store.TrialRecord:
    record = store.record(study, number)
    if record is None or record.state != "COMPLETE":
        done = [r.number for r in store.records(study, (optuna.trial.TrialState.COMPLETE,))]
        shown = ", ".join(map(str, done[:30])) + (" ..." if len(done) > 30 else "") if done else "none"
        raise BadInput(f"TRIAL={number}: study {study.study_name!r} has no complete trial {number}; complete trials: "
                       f"{shown}")
    return record


def _phase(spec: studies.StudySpec, storage: Storage,
           study: optuna.Study) -> tuple[champion_phase.Standings | None, optuna.Study | None]:
    """The champion phase's table (when the study file has a [champion]) and its runs' companion study, if any."""
    companion = champion_phase.find_companion(storage.backend, study.study_name)
    table = champion_phase.standings(spec, study, companion) if spec.confirmation is not None else None
    return table, companion


def _registered(spec: studies.StudySpec, storage: Storage, root: Path, version: registry.ChampionVersion) -> Champion:
    """The registered champion's weights in the architecture its trial recorded, checked to be that trial's."""
    study = store.load_study(storage.backend, version.study_name)
    trial, confirmed = store.record(study, version.trial_number), None
    if version.confirmation_number is not None:  # the champion phase's run of that trial's configuration
        table, companion = _phase(spec, storage, study)
        trial = store.record(companion, version.confirmation_number) if companion is not None else None
        if table is not None:
            confirmed = next((c for c in table.candidates if c.trial.number == version.trial_number), None)
    if trial is None or trial.state != "COMPLETE":
        raise StudyError(f"trial {version.trial_number} of study {version.study_name!r} is not a complete trial")
    if not version.matches(hparams.resolve_params(trial.params), trial.seed):
        raise BadInput(f"the registered champion of {spec.name!r} (version {version.version}) was trained by "
                       f"trial {version.trial_number} of {version.study_name!r}, but that trial in the Optuna "
                       "storage has other params or seed (was the storage replaced?); point STORAGE at the "
                       "original one, or pass --no-tracking to export the study's own best trial")
    definition = store.definition(study)
    # Streamed (resident_bytes=1): only the classes, shape and statistics are needed, not the images.
    prepared = replay.recorded_data(definition, root, resident_bytes=1)
    # A pretrained ResNet's input adapter needs the data's statistics; not its ImageNet weights, which the
    # champion's replace.
    model = models.build_model(trial.params, len(prepared.classes), prepared.input_shape,
                               (prepared.mean, prepared.std), imagenet=False)
    try:
        model.load_state_dict(registry.load_state_dict(version.model_uri))
    except RuntimeError as exc:  # the registry's files are anyone's: their weights may not fit
        detail = " ".join(str(exc).split())[:300]
        raise BadInput(f"{version.model_uri}: its weights do not fit the network trial {version.trial_number} "
                       f"describes ({detail}); {registry.REGISTER_FIX}") from None
    return Champion(version.study_name, trial, definition, model.eval(),
                    f"registered model {spec.name!r} version {version.version} (alias champion)",
                    [r for r in (version.run_id, version.parent_run_id) if r], trial.split_hash or prepared.split_hash,
                    confirmed)


# --------------------------------------------------------------------------------------------------
# Writing, measuring, verifying


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
    champion = find_champion(spec, store.open_storage(storage_override, spec.name), root, client, log, trial)
    log(f"exporting {champion.source}: {champion.describe()} of {champion.study_name!r}")
    threads = threads or torch.get_num_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        metrics = write_export(champion, spec, root, partial, threads)
        verified = verify(partial, root)
        if verified["correct"] != metrics["test_correct"] or verified["project_code_loaded"]:
            raise ExportFailed(f"a fresh process scored model.pt2 {verified['correct']}/{verified['total']} on the "
                               f"test split, metrics.json says {metrics['test_correct']}/{metrics['test_images']}")
        _move_into_place(partial, destination, force)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if client is not None and champion.run_ids:
        registry.log_test_metrics(client, champion.run_ids, {"test_accuracy": metrics["test_accuracy"]})
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


def write_export(champion: Champion, spec: studies.StudySpec, root: Path, directory: Path,
                 threads: int) -> dict[str, Any]:
    """Every file but the verification; returns metrics.json's content."""
    torch.set_num_threads(threads)
    dataset = studies.dataset_ref(champion.definition["dataset"])
    test, arrays = loading.test_split(dataset, root, "cpu",
                                   val_size=champion.definition.get("val_size", DEFAULT_VAL_SIZE))
    loading.require_digest(champion.trial.dataset_digest, arrays.checksum, champion.trial_number,
                        loading.dataset_label(dataset),
                        "restore the pictures it was trained on, or search again and export that")
    example = test.inputs(slice(0, 4), None, None)
    _write_model(champion.model, example, directory)
    if arrays.memory_mapped:  # the test split is rows of the image cache: verify.py needs to know which
        np.save(directory / TEST_ROWS, arrays.test_rows.numpy().astype(np.int64), allow_pickle=False)
    config = _config(champion, spec, dataset, test, arrays, threads)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    exported = torch.export.load(str(directory / "model.pt2")).module()  # score exactly what was written
    scores = verify_export.logits(exported, test.images, config["mean"], config["std"], verify_export.EVAL_BATCH)
    predicted = scores.argmax(1)
    metrics = _metrics(champion, spec, predicted, test.labels, config, _speed(exported, example), threads)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plots.confusion_matrix(test.labels.numpy(), predicted.numpy(), config["classes"],
                           directory / "confusion_matrix.png", title=f"{spec.name} champion: test split")
    plots.mistakes_grid(test.images.numpy(), test.labels.numpy(), predicted.numpy(),
                        scores.softmax(1).max(1).values.numpy(), config["classes"], directory / "misclassified.png",
                        title=f"{spec.name} champion")
    (directory / "model_card.md").write_text(model_card(spec, champion, config, metrics, dataset,
                                                        arrays.memory_mapped, arrays.given_val is not None))
    return metrics


def _write_model(model: torch.nn.Module, example: torch.Tensor, directory: Path) -> None:
    """model.pt2 (any batch size), weights.pt and verify.py."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    # Serialised in memory and written by Python: torch's file writer aborts the process on a full disk.
    for name, save, payload in (("model.pt2", torch.export.save, program), ("weights.pt", torch.save,
                                                                             model.state_dict())):
        buffer = io.BytesIO()
        save(payload, buffer)
        (directory / name).write_bytes(buffer.getvalue())
    shutil.copy(Path(verify_export.__file__), directory / "verify.py")


def _config(champion: Champion, spec: studies.StudySpec, dataset: loading.DatasetRef, test: loading.ResidentImages,
            arrays: loading.Arrays, threads: int) -> dict[str, Any]:
    """config.json: what the model is, what it expects, and where it came from."""
    params = hparams.resolve_params(champion.trial.params)
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
        "dataset": loading.dataset_label(dataset),
        "dataset_checksum": arrays.checksum,
        "split_hash": champion.split_hash,
        "study": champion.study_name,
        "study_file": spec.name,
        "trial_number": champion.trial_number,
        "trial_seed": champion.trial.seed,
        "repeat": champion.trial.repeat,  # 0: the search's own run; else the champion phase's run of the trial
        "source": champion.source,
        "git_commit": reproducibility.git_commit(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "evaluation": {"threads": threads, "batch_size": verify_export.EVAL_BATCH},
    }


def _metrics(champion: Champion, spec: studies.StudySpec, predicted: torch.Tensor, labels: torch.Tensor,
             config: dict[str, Any], speed: tuple[float, float], threads: int) -> dict[str, Any]:
    """metrics.json: accuracy on the test split, size, and CPU speed (seconds per image, images per second)."""
    classes, (latency, throughput) = config["classes"], speed
    correct = int((predicted == labels).sum())
    per_class = {classes[c]: int((predicted[labels == c] == c).sum()) / max(int((labels == c).sum()), 1)
                 for c in range(len(classes))}
    model = champion.model
    return {
        "val_accuracy": max((h["val_accuracy"] for h in champion.trial.history), default=None),
        "objective": dict(zip(spec.metrics, champion.trial.values, strict=False)),
        "val_over_seeds": _over_seeds(champion.confirmed),
        "test_accuracy": correct / len(labels),
        "test_correct": correct,
        "test_images": len(labels),
        "test_per_class_accuracy": per_class,
        "parameter_count": models.count_parameters(model),
        "flops_per_image": models.flops_per_image(model, tuple(config["input_shape"])),
        "cpu_latency_ms_batch1_median": latency * 1000,
        "cpu_throughput_images_per_s_batch256": throughput,
        "cpu_threads": threads,
    }


def _over_seeds(confirmed: champion_phase.Candidate | None) -> dict[str, Any] | None:
    """The configuration's validation figures over its seeds (the champion phase), for metrics.json."""
    if confirmed is None:
        return None
    s = confirmed.summary
    return {"runs": s.n, "mean": s.mean, "std": s.std, "ci95_low": s.ci_low, "ci95_high": s.ci_high,
            "min": s.low, "max": s.high, "values": [r.value for r in confirmed.runs]}


def _speed(model: torch.nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """Median seconds per image at batch 1, and images per second at batch 256, on the CPU's current threads."""
    latency = median_seconds(model, example, LATENCY_RUNS, torch.get_num_threads())
    many = example[:1].expand(THROUGHPUT_BATCH, -1, -1, -1).contiguous()
    with torch.no_grad():
        model(many)
        started = time.perf_counter()
        for _ in range(THROUGHPUT_RUNS):
            model(many)
        throughput = THROUGHPUT_BATCH * THROUGHPUT_RUNS / (time.perf_counter() - started)
    return latency, throughput


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


def _looks(preprocessing: dict) -> str:
    """What the model's input pictures look like, for the model card."""
    size = preprocessing["image_size"]
    if preprocessing["style"] in DIGITS:
        return f"{size}x{size} grayscale, centred, light object on a dark background"
    colour = "RGB" if preprocessing["channels"] == "rgb" else "grayscale"
    return f"{size}x{size} {colour}, the shorter side resized to {size} and the centre cropped"


def _which_run(champion: Champion, config: dict) -> str:
    if champion.confirmed is None:
        return f"This is {champion.describe()} (seed {config['trial_seed']})"
    return (f"This is {champion.describe()} (seed {config['trial_seed']}): after the search, the champion phase "
            f"trained the best configurations again over seeds and chose trial {champion.trial_number}'s by its "
            "mean; these weights are its run closest to that mean, a typical run rather than the luckiest")


def _seeds_row(champion: Champion, spec: studies.StudySpec) -> str:
    """The configuration's validation mean and interval over seeds: a table row, or nothing without them."""
    if champion.confirmed is None:
        return ""
    s = champion.confirmed.summary
    spread = "" if s.std is None else f", 95% CI [{s.ci_low:.4f}, {s.ci_high:.4f}] (Student t), std {s.std:.4f}"
    return (f"| {spec.metrics[0]} of the configuration over {s.n} seeds (validation) | mean {s.mean:.4f}{spread}, "
            f"min {s.low:.4f}, max {s.high:.4f} |\n")


def _how_chosen(champion: Champion, spec: studies.StudySpec) -> str:
    if champion.how_chosen:
        return champion.how_chosen
    if champion.confirmed is None:
        return "Chosen by validation accuracy among the study's trials"
    return (f"Chosen by its mean {spec.metrics[0]} over {champion.confirmed.summary.n} seeds among the "
            "search's best configurations; the test split was used for nothing but the figure above")


def model_card(spec: studies.StudySpec, champion: Champion, config: dict, metrics: dict, dataset: loading.DatasetRef,
               cached: bool, given_val: bool) -> str:
    """`cached`: the test split is rows of the image cache; `given_val`: the dataset brought its own val/ split."""
    definition = champion.definition
    space = ", ".join(sorted(definition.get("space", {}))) or "none"
    fixed = ", ".join(f"{k}={v}" for k, v in sorted(definition.get("fixed", {}).items())) or "none"
    per_class = "\n".join(f"| {name} | {accuracy:.4f} |"
                          for name, accuracy in metrics["test_per_class_accuracy"].items())
    trained_on = definition.get("train_limit") or "all"
    test = f"{metrics['test_accuracy']:.4f} ({metrics['test_correct']:,}/{metrics['test_images']:,})"
    validation = ("the folder's own val/ split" if given_val else
                  f"a stratified, seeded split of the training images (hash {config['split_hash']})")
    if isinstance(dataset, FolderSource):
        held_out = (f"the pictures in {dataset.path}/test/ when the folder is split into train/ and test/, "
                    f"otherwise a stratified {dataset.test_fraction:.0%} of its pictures carved once with a fixed "
                    "seed; never trained or tuned on")
    else:
        held_out = f"the test split that {config['dataset']} ships with; never trained or tuned on"
    if cached:
        cache = f"<data>/cache/{config['dataset_checksum']}"
        verify_command = (f"python verify.py --images {cache}/images.npy --labels {cache}/labels.npy --rows "
                          f"{TEST_ROWS}` (`<data>`: the pipeline's data folder, `data/` unless --root moved it)")
    else:
        verify_command = "python verify.py --images <t10k-images-idx3-ubyte> --labels <t10k-labels-idx1-ubyte>`"
    return f"""# {spec.name} champion: {config['model']} on {config['dataset']}

{spec.description or ''}

## What it is
A {config['model']} image classifier for {len(config['classes'])} classes ({', '.join(config['classes'])}), taking
{config['input']}. {metrics['parameter_count']:,} parameters, {metrics['flops_per_image'] / 1e6:,.1f} MFLOPs per image.
Architecture and training parameters: `config.json` (`params`); how a picture becomes the input: `preprocessing`.

## How it was found
Optuna study `{champion.study_name}` (file `studies/{spec.name}.toml`): sampler {definition.get('sampler')}, pruner
{definition.get('pruner')}, up to {definition.get('epochs')} epochs per trial, objective
{', '.join(spec.metrics)}. Searched: {space}. Fixed: {fixed}.
{_which_run(champion, config)}; source: {champion.source}.
Training images: {trained_on} of the training split; validation: {validation}, used for every tuning decision.
Test: {held_out}. Dataset digest {config['dataset_checksum']}.

## Figures
| figure | value |
|---|---|
{_seeds_row(champion, spec)}| validation accuracy of these weights (recorded in training) | {metrics['val_accuracy']} |
| **test accuracy** (untouched test split, measured at export) | **{test}** |
| CPU latency, batch 1 (median of {LATENCY_RUNS}) | {metrics['cpu_latency_ms_batch1_median']:.3f} ms |
| CPU throughput, batch {THROUGHPUT_BATCH} | {metrics['cpu_throughput_images_per_s_batch256']:,.0f} images/s |

CPU figures on {metrics['cpu_threads']} threads of the exporting machine. Per-class test accuracy:

| class | accuracy |
|---|---|
{per_class}

`confusion_matrix.png` and `misclassified.png` show where it errs.

## Limits
- Trained and tested on {config['dataset']} only: {_looks(config['preprocessing'])}.
  Other pictures must be prepared the same way (`make predict` does) and may still score far lower.
- The test accuracy is one sample of {metrics['test_images']:,} images; differences of a few tenths of a percent
  between models are within noise.
- {_how_chosen(champion, spec)}; no calibration of the probabilities.

## Use
```python
import torch
model = torch.export.load("model.pt2").module()
probabilities = model(x).softmax(1)   # x: {config['input']}
```
`model.pt2` is a program: loading it unpickles parts of it, which can run code, so load it only from a source
you trust, like any program. `make predict` does not load it: it rebuilds the network from `config.json` and
reads `weights.pt` with `torch.load(..., weights_only=True)`, which builds tensors and nothing else.
`{verify_command} re-checks the test accuracy with torch alone.
"""
