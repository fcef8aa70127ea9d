"""Files from elsewhere: exports, registry champions and pictures are read as data, never run as code.

Every crafted file is made for real: a torch.export archive whose weight record is a pickle, a weights.pt or
an MLflow model whose unpickling writes a marker file, pictures in formats predict does not promise, a PNG
header claiming tens of megapixels, a JPEG whose EXIF breaks Pillow's writer. Each test checks that the marker
never appears, that the command refuses with one line naming the file, and that everything else still works.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import EXPORT_FIXED, StudyEnv, TrackedSearch, shared_tracked_env, tiny_test_pictures
from mlflow import MlflowClient
from PIL import Image

from pipeline.cli import main
from pipeline.commands import predict, verify_export
from pipeline.console import tables
from pipeline.data.images import FORMATS, PictureError, Preprocessing, open_picture
from pipeline.reports import plots
from pipeline.spec import sources
from pipeline.spec.hparams import CLASSIC
from pipeline.tracking import registry
from pipeline.training import models

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

MNIST_LIKE = Preprocessing(28, "gray", "mnist")
TINY_MLP = {"model": "mlp", "mlp_widths": [16]}


class WritesMarker:
    """What a crafted file holds instead of weights: unpickling it runs `Path.touch(marker)`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class MarkerModule(torch.nn.Module):
    """A module that pickles (MLflow's pickle format) as a call to `Path.touch(marker)`."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def marker_pickle(marker: Path) -> bytes:
    """A torch.save file whose loading (without weights_only) writes `marker`."""
    buffer = io.BytesIO()
    torch.save(WritesMarker(marker), buffer)
    return buffer.getvalue()


def crafted_program(program: bytes, marker: Path) -> bytes:
    """A torch.export archive with its first weight marked `use_pickle`, the record a pickle that writes `marker`."""
    source = zipfile.ZipFile(io.BytesIO(program))
    config_name = next(n for n in source.namelist() if n.endswith("data/weights/model_weights_config.json"))
    config = json.loads(source.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    record = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as crafted:
        for info in source.infolist():
            payload = source.read(info)
            if info.filename == config_name:
                payload = json.dumps(config).encode()
            elif info.filename == record:
                payload = marker_pickle(marker)
            crafted.writestr(info, payload)
    return out.getvalue()


def program_bytes(model: torch.nn.Module, shape: tuple[int, ...]) -> bytes:
    program = torch.export.export(model.eval(), (torch.zeros(2, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def runs_code_when_loaded(load, proof: Path) -> bool:
    """Does `load()` (of a file crafted to write `proof`) run that code? It may raise afterwards."""
    try:
        load()
    except Exception:
        pass
    return proof.exists()


def one_line(err: str) -> str:
    """The command's refusal: exactly one line on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# predict: the network from config.json, the weights from weights.pt, never model.pt2


def digit(label: int) -> np.ndarray:
    """A 28x28 picture of the tiny dataset's kind: a bright square at the class's spot on a dark background."""
    picture = np.zeros((28, 28), dtype=np.uint8)
    row, col = 3 + 6 * (label // 4), 3 + 6 * (label % 4)
    picture[row:row + 6, col:col + 6] = 230
    return picture


@pytest.fixture
def small_export(tmp_path) -> Path:
    """A small MLP's export as export-best writes what predict reads: config.json with params, weights.pt, model.pt2."""
    directory = tmp_path / "export"
    directory.mkdir()
    torch.manual_seed(0)
    model = models.build_model(TINY_MLP).eval()
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "model.pt2").write_bytes(program_bytes(model, (1, 28, 28)))
    (directory / "config.json").write_text(json.dumps({
        "model": "mlp", "params": TINY_MLP, "input_shape": [1, 28, 28], "mean": [0.13], "std": [0.31],
        "preprocessing": MNIST_LIKE.as_dict(), "classes": [f"class{i}" for i in range(10)], "dataset": "tiny"}))
    return directory


def write_digits(folder: Path, count: int = 3) -> list[str]:
    names = []
    for label in range(count):
        names.append(f"digit{label}.png")
        Image.fromarray(digit(label)).save(folder / names[-1])
    return names


def test_predict_never_loads_model_pt2_so_a_crafted_one_runs_nothing(small_export, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    (small_export / "model.pt2").write_bytes(crafted_program((small_export / "model.pt2").read_bytes(), marker))
    monkeypatch.chdir(tmp_path)
    names = write_digits(tmp_path)

    assert main(["predict", "--export", str(small_export), *names]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert len(rows) == len(names)
    assert not marker.exists()

    # The same crafted archive is a real exploit: torch.export.load runs its pickle.
    proof = tmp_path / "proof"
    (tmp_path / "proof.pt2").write_bytes(crafted_program(program_bytes(models.build_model(TINY_MLP), (1, 28, 28)),
                                                         proof))
    assert runs_code_when_loaded(lambda: torch.export.load(str(tmp_path / "proof.pt2")), proof)


def test_predict_refuses_a_weights_pt_that_would_run_code(small_export, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    (small_export / "weights.pt").write_bytes(marker_pickle(marker))
    monkeypatch.chdir(tmp_path)

    assert main(["predict", "--export", str(small_export), *write_digits(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{small_export / 'weights.pt'}: not a plain state dict of tensors" in line
    assert "weights-only" in line and "make export-best" in line
    assert not marker.exists()


def _no_weights(export: Path) -> None:
    (export / "weights.pt").unlink()


def _edit_config(**changes):
    def edit(export: Path) -> None:
        config = json.loads((export / "config.json").read_text())
        (export / "config.json").write_text(json.dumps(config | changes))
    return edit


@pytest.mark.parametrize(("damage", "expected"), [
    (_no_weights, "is not an export that predict reads (no config.json / weights.pt)"),
    (_edit_config(params={"model": "mlp", "mlp_widths": [16], "wings": 2}), "config.json: does not describe a network"),
    (_edit_config(params={"model": "transformer"}), "config.json: does not describe a network"),
    (_edit_config(params=None), "config.json: does not describe a network"),
    (_edit_config(classes=["a", "b"]), "weights.pt: does not fit the network config.json describes"),
    (_edit_config(mean=[0.1, 0.2, 0.3]), "config.json: does not describe a network"),
], ids=["no-weights", "unknown-param", "unknown-model", "no-params", "other-classes", "wrong-channels"])
def test_predict_refuses_an_export_it_cannot_rebuild_in_one_line(small_export, tmp_path, capsys, damage, expected):
    damage(small_export)
    picture = tmp_path / "digit.png"
    Image.fromarray(digit(1)).save(picture)
    assert main(["predict", "--export", str(small_export), str(picture)]) == 2
    assert expected in one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# Class names are anyone's: drawn and printed as they are, never interpreted

# Ten names, one per class of the tiny dataset: mathtext that does not parse, rich markup that would raise, make a
# hyperlink or a style, terminal escape sequences (a colour, a window title, C1's clear screen), a trailing backslash.
NAMED_LIKE_CODE = ("price_$5_to_$10", "[/]", "[link=https://example.com]x[/link]", "\x1b[31mred", "[bold]b",
                   "\x1b]0;title\x07", "slash\\", "\x9b2J", "$x^2$", "plain")
SHOWN_AS = {"price_$5_to_$10", "[/]", "[link=https://example.com]x[/link]", "[31mred", "[bold]b", "]0;title",
            "slash\\", "2J", "$x^2$", "plain"}  # the same, control characters dropped
CONTROL = ("\x1b", "\x07", "\x9b")


def shown_classes(out: str) -> list[str]:
    """The class names in predict's table: the predicted column and each `name probability` top-k cell."""
    names = []
    for row in (line for line in out.splitlines() if line.startswith("│")):
        predicted, *top = [cell.strip() for cell in row.split("│")[2:-1]]
        names += [predicted, *(cell.rsplit(" ", 1)[0] for cell in top)]
    return names


def test_figures_draw_class_names_as_they_are(tmp_path, recwarn):
    labels = np.arange(20) % 10
    predicted = (labels + np.arange(20) // 10) % 10  # the second ten all wrong
    images = np.random.default_rng(0).integers(0, 256, size=(20, 1, 12, 12), dtype=np.uint8)
    counts = plots.confusion_matrix(labels, predicted, NAMED_LIKE_CODE, tmp_path / "confusion.png", "$ [/]")
    assert counts.trace() == 10
    assert plots.mistakes_grid(images, labels, predicted, np.linspace(0, 1, 20), NAMED_LIKE_CODE,
                               tmp_path / "mistakes.png", "$ [/]") == 10
    for figure in ("confusion.png", "mistakes.png"):
        with Image.open(tmp_path / figure) as image:
            assert image.format == "PNG" and image.width > 100
    # A missing glyph's warning would carry the control character itself to the terminal.
    assert not [str(w.message) for w in recwarn if any(c in str(w.message) for c in CONTROL)]


def test_predict_prints_class_names_as_they_are(small_export, tmp_path, capsys, monkeypatch):
    _edit_config(classes=list(NAMED_LIKE_CODE))(small_export)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")  # one line per row
    names = write_digits(tmp_path)

    found, errors = predict.predict(small_export, [Path(n) for n in names], top_k=10)
    assert not errors and {name for name, _ in found[0].top} == set(NAMED_LIKE_CODE)
    tables.predictions(small_export, found, errors)
    out = capsys.readouterr().out
    assert not any(c in out for c in CONTROL)
    assert len(shown_classes(out)) == 11 * len(names) and set(shown_classes(out)) == SHOWN_AS  # all ten, each as is

    assert main(["predict", "--export", str(small_export), *names]) == 0  # the command's own table
    out = capsys.readouterr().out
    assert not any(c in out for c in CONTROL) and set(shown_classes(out)) <= SHOWN_AS


def test_a_tracked_search_and_its_export_draw_class_names_as_they_are(study_env, mlflow_store, tiny_dataset, tmp_path,
                                                                     monkeypatch, capsys):
    """The confusion matrix drawn at each new best (tracking) and the export's figures: a name with two `$` was
    parsed as mathtext and raised, failing every new best and then export-best."""
    info, root = tiny_dataset
    monkeypatch.setitem(sources.DATASETS, info.name, dataclasses.replace(info, classes=NAMED_LIKE_CODE))
    study_env.write_study(trials=1, epochs=1, sampler="random", pruner="none", fixed=EXPORT_FIXED, baseline=None)
    assert study_env.run("search") == 0
    (record,) = study_env.records()
    assert record.state == "COMPLETE"
    run = MlflowClient(mlflow_store).search_runs(
        [MlflowClient(mlflow_store).get_experiment_by_name("tiny").experiment_id], "tags.trial_number = '0'")[0]
    assert "confusion_matrix.png" in {a.path for a in MlflowClient(mlflow_store).list_artifacts(run.info.run_id)}

    assert study_env.run("export-best") == 0
    export = study_env.exports / "tiny"
    assert json.loads((export / "config.json").read_text())["classes"] == list(NAMED_LIKE_CODE)
    for figure in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(export / figure) as image:
            assert image.format == "PNG" and image.width > 100

    paths = tiny_test_pictures(root, 5, tmp_path)
    monkeypatch.setenv("COLUMNS", "400")
    capsys.readouterr()
    assert main(["predict", "--export", str(export), *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in CONTROL) and set(shown_classes(out)) <= SHOWN_AS
    assert len(shown_classes(out)) == 4 * len(paths)


# --------------------------------------------------------------------------------------------------
# Champions logged before weights.pt: their program, checked pickle-free by MLflow, is the only source


@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet18-finetune"])
def test_programs_logged_without_weights_pt_load_with_mlflows_pickle_switch_off(family, tmp_path, request,
                                                                               monkeypatch):
    """What tracking logged before weights.pt (a pt2 model alone) passes MLflow's pickle-free check and gives the
    trained weights; the switch is set back afterwards. The ResNet's non-persistent buffers are archive constants."""
    shape = (3, 16, 16) if family.startswith("resnet") else (1, 28, 28)
    if family.startswith("resnet"):
        request.getfixturevalue("imagenet_weights")
        params = {"model": "resnet18", "resnet_mode": "finetune"}
    else:
        params = CLASSIC[family]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # a user's setting: ours must not leak
    torch.manual_seed(0)
    model = models.build_model(params, 10, shape, ((0.5,) * shape[0], (0.25,) * shape[0])).eval()
    example = torch.rand(4, *shape).numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    directory = tmp_path / "model"
    mlflow.pytorch.save_model(model, str(directory), signature=mlflow.models.infer_signature(example, output),
                              input_example=example, pip_requirements=["torch"])

    state = registry.load_state_dict(str(directory))
    expected = model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"


# --------------------------------------------------------------------------------------------------
# Pictures: the formats a folder dataset takes, a pixel cap read from the header, any decoder error per file


def test_formats_are_those_of_the_file_names_a_folder_dataset_takes():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    extensions = Image.registered_extensions()
    assert set(FORMATS) == {extensions[suffix] for suffix in IMG_EXTENSIONS}


@pytest.mark.parametrize("kind", ["GIF", "ICO", "TGA", "PCX", "SGI"])
def test_a_picture_in_a_format_not_promised_is_refused_by_name(kind, tmp_path):
    path = tmp_path / "looks-fine.png"
    Image.fromarray(digit(2)).save(path, format=kind)
    with Image.open(path) as image:
        assert image.format == kind  # Pillow itself reads it
    with pytest.raises(PictureError) as refused:
        open_picture(path, MNIST_LIKE)
    message = str(refused.value)
    assert message.startswith(f"{path}: cannot be decoded as an image in the formats read here (JPEG, PNG")
    assert "\n" not in message


@pytest.mark.parametrize("kind", FORMATS)
def test_every_promised_format_is_read_whatever_the_file_is_called(kind, tmp_path):
    path = tmp_path / "named-otherwise.png"
    Image.fromarray(digit(2)).save(path, format=kind, **({"lossless": True} if kind == "WEBP" else {}))
    picture = open_picture(path, MNIST_LIKE)
    assert picture.shape == (1, 28, 28)
    if kind != "JPEG":  # lossless: the very pixels
        assert np.array_equal(picture[0], digit(2))


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG file of ~60 bytes claiming width x height 8-bit gray pixels (its image data is a stub)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


def test_predict_refuses_a_picture_over_its_cap_from_the_header(tmp_path):
    """63 megapixels: under Pillow's own warning (89 MP) and the landing default (100 MP), over predict's cap."""
    big = png_header(tmp_path / "big.png", 7000, 9000)
    with pytest.raises(PictureError) as refused:
        open_picture(big, MNIST_LIKE, predict.MAX_MEGAPIXELS, predict.CAP_HINT)
    message = str(refused.value)
    # Named by the size the header claims: nothing was decoded (the stub data would have failed to decode).
    assert message == (f"{big}: 7000x9000 is 63 megapixels, over the cap of {predict.MAX_MEGAPIXELS}; shrink it or "
                       f"remove it (predict reads pictures up to {predict.MAX_MEGAPIXELS} megapixels)")


def exif_breaking_jpeg(path: Path, picture: np.ndarray) -> Path:
    """A JPEG whose EXIF (turn 90 degrees, plus a text in the ImageWidth tag) makes Pillow's EXIF writer raise
    struct.error while the orientation is applied: an exception type no decoder documents."""
    exif = Image.Exif()
    exif[0x010F] = "Maker"  # Make, a text
    exif[0x0112] = 6
    raw = exif.tobytes()
    retagged = raw.replace(b"\x01\x0f\x00\x02", b"\x01\x00\x00\x02")  # the same text, now as ImageWidth (0x0100)
    assert retagged != raw
    Image.fromarray(picture).save(path, exif=retagged)
    return path


@pytest.mark.faults  # README: What survives what
def test_predict_names_each_bad_picture_and_classifies_the_rest(small_export, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write_digits(tmp_path, 4)
    Image.fromarray(digit(5)).save("animated.png", format="GIF")
    png_header(tmp_path / "huge.png", 7000, 9000)
    exif_breaking_jpeg(tmp_path / "phone.jpg", digit(6))
    bad = ["animated.png", "huge.png", "phone.jpg"]

    assert main(["predict", "--export", str(small_export), good[0], *bad, *good[1:]]) == 2
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert "animated.png: cannot be decoded as an image in the formats read here" in err
    assert "huge.png: 7000x9000 is 63 megapixels, over the cap" in err
    assert "phone.jpg: cannot be decoded as an image (struct.error: " in err
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == good  # every readable picture classified, in order


# --------------------------------------------------------------------------------------------------
# A real search, its registered champion and its export (shared; tests copy the MLflow database before they
# register anything, and write their own exports)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, empty_mlflow_store) -> TrackedSearch:
    base = tmp_path_factory.mktemp("untrusted")
    with shared_tracked_env(base, empty_mlflow_store) as (env, info):
        env.write_study(trials=1, epochs=2, sampler="random", pruner="none", fixed=EXPORT_FIXED)
        assert env.run("search") == 0
        assert env.run("export-best") == 0
    return TrackedSearch(env, info)


@pytest.fixture
def registry_copy(exported, tmp_path, monkeypatch) -> StudyEnv:
    """The exported study with this test's own copy of the MLflow database (the artifacts it names are shared and
    left alone) and its own export folder."""
    monkeypatch.setitem(sources.DATASETS, exported.info.name, exported.info)
    database = shutil.copy(exported.database, tmp_path / "mlflow.db")
    uri = f"sqlite:///{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.artifacts and register_model read the process-wide URI
    yield exported.env.replace(tracking_uri=uri, exports=tmp_path / "exports")
    mlflow.set_tracking_uri(previous)  # not left behind for later tests


def champion_files(env: StudyEnv, into: Path) -> Path:
    """The champion's logged model, downloaded (a copy to tamper with)."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny@champion", dst_path=str(into),
                                                    tracking_uri=env.tracking_uri))


def make_champion(env: StudyEnv, directory: Path) -> str:
    """Register `directory` as a new version of the champion's model, for the same run and trial, and move the alias
    to it: what a swapped artifact on a shared tracking server looks like to export-best."""
    client = MlflowClient(env.tracking_uri)
    current = client.get_model_version_by_alias("tiny", registry.CHAMPION)
    version = client.create_model_version("tiny", str(directory), run_id=current.run_id, tags=current.tags)
    client.set_registered_model_alias("tiny", registry.CHAMPION, version.version)
    return f"models:/tiny/{version.version}"


@pytest.mark.faults  # README: What survives what
def test_predict_on_a_real_export_gives_what_its_model_pt2_gives_and_runs_none_of_its_code(exported, tmp_path,
                                                                                        capsys):
    paths = tiny_test_pictures(exported.env.root, 40, tmp_path)
    config = json.loads((exported.export / "config.json").read_text())
    program = torch.export.load(str(exported.export / "model.pt2")).module()
    batch = torch.from_numpy(np.stack([open_picture(p, predict.export_preprocessing(config)) for p in paths]))
    expected = verify_export.logits(program, batch, config["mean"], config["std"], 100).softmax(1)

    # The export comes from elsewhere: its model.pt2 would run code if it were loaded.
    marker = tmp_path / "ran"
    copy = shutil.copytree(exported.export, tmp_path / "export")
    (copy / "model.pt2").write_bytes(crafted_program((copy / "model.pt2").read_bytes(), marker))
    found, errors = predict.predict(copy, paths, top_k=10)
    assert not errors and len(found) == len(paths)
    for prediction, probabilities in zip(found, expected, strict=True):
        top = sorted(((config["classes"][i], float(p)) for i, p in enumerate(probabilities)), key=lambda t: -t[1])
        assert [name for name, _ in prediction.top] == [name for name, _ in top]
        assert [p for _, p in prediction.top] == pytest.approx([p for _, p in top], abs=1e-6)
    assert not marker.exists()

    # Its weights.pt would run code if it were unpickled: refused in one line.
    (copy / "weights.pt").write_bytes(marker_pickle(marker))
    capsys.readouterr()
    assert main(["predict", "--export", str(copy), *map(str, paths)]) == 2
    assert f"{copy / 'weights.pt'}: not a plain state dict of tensors" in one_line(capsys.readouterr().err)
    assert not marker.exists()


@pytest.mark.faults  # README: What survives what
def test_the_champion_carries_plain_weights_and_export_reads_them(registry_copy, exported, tmp_path):
    files = champion_files(registry_copy, tmp_path / "champion")
    logged = torch.load(files / registry.WEIGHTS_PATH, weights_only=True)
    program = torch.export.load(str(files / "data" / "model.pt2")).module().state_dict()
    assert logged.keys() == program.keys() and all(torch.equal(logged[k], program[k]) for k in logged)
    exported_weights = torch.load(exported.export / "weights.pt", weights_only=True)
    assert all(torch.equal(logged[k], exported_weights[k]) for k in logged)  # export-best read these

    # A champion logged before weights.pt (its program alone) still exports, the same model.
    shutil.rmtree(files / "extra_files")
    make_champion(registry_copy, files)
    assert registry_copy.run("export-best") == 0
    before = json.loads((exported.export / "metrics.json").read_text())
    after = json.loads((registry_copy.exports / "tiny" / "metrics.json").read_text())
    assert after["test_correct"] == before["test_correct"]


def _pt2_that_runs_code(files: Path, marker: Path) -> None:
    shutil.rmtree(files / "extra_files")  # logged the old way: the program is all there is
    program = files / "data" / "model.pt2"
    program.write_bytes(crafted_program(program.read_bytes(), marker))


def _weights_that_run_code(files: Path, marker: Path) -> None:
    (files / registry.WEIGHTS_PATH).write_bytes(marker_pickle(marker))


def _pickled_model(files: Path, marker: Path) -> None:
    """MLflow's pickle format: data/model.pth, whose unpickling writes the marker."""
    shutil.rmtree(files)
    mlflow.pytorch.save_model(MarkerModule(marker), str(files), serialization_format="pickle",
                              pip_requirements=["torch"])  # stated: MLflow's requirement probe would load it


def _pickle_module_from_its_code_dir(files: Path, marker: Path) -> None:
    """A pickle-format model naming its 'pickle module' in its own code/ directory: MLflow imports that module
    before it looks at its pickle switch, so the switch alone does not stop it."""
    _pickled_model(files, marker)
    (files / "code").mkdir()
    module = f"sneaky_{marker.name}"  # one per marker: a module imported once is not run again
    (files / "code" / f"{module}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (files / "data" / "pickle_module_info.txt").write_text(module)
    mlmodel = files / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("code: null", "code: code"))


def _weights_of_another_network(files: Path, marker: Path) -> None:
    """A plain state dict of tensors, so it loads, but one tensor has a row more than the trial's network has."""
    path = files / registry.WEIGHTS_PATH
    weights = torch.load(path, weights_only=True)
    name = next(key for key, tensor in weights.items() if tensor.dim())
    weights[name] = torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])
    torch.save(weights, path)


@pytest.mark.faults  # README: What survives what
@pytest.mark.parametrize(("craft", "expected"), [
    (_pt2_that_runs_code, "is not a pickle-free payload"),
    (_weights_that_run_code, f"({registry.WEIGHTS_PATH}): not a plain state dict of tensors"),
    (_pickled_model, "a pickled model (data/model.pth), which could run code when loaded, is never loaded"),
    (_pickle_module_from_its_code_dir, "a pickled model (data/model.pth)"),
    (_weights_of_another_network, "its weights do not fit the network trial 0 describes (Error(s) in loading"),
], ids=["pt2", "weights.pt", "model.pth", "code-dir", "wrong-shape"])
def test_export_best_refuses_a_champion_that_would_run_code(registry_copy, tmp_path, capsys, monkeypatch, craft,
                                                            expected):
    # The same craft is a real exploit where MLflow reads it: loaded as MLflow allows by default, it runs its code.
    proof = tmp_path / "proof"
    proof_files = champion_files(registry_copy, tmp_path / "proof-champion")
    craft(proof_files, proof)
    monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow puts a model's code/ on it for good
    exploited = runs_code_when_loaded(lambda: mlflow.pytorch.load_model(str(proof_files)), proof)
    sys.modules.pop(f"sneaky_{proof.name}", None)
    # MLflow never reads extra_files/weights.pt
    assert exploited == (craft not in (_weights_that_run_code, _weights_of_another_network))

    marker = tmp_path / "ran"
    files = champion_files(registry_copy, tmp_path / "champion")
    craft(files, marker)
    uri = make_champion(registry_copy, files)
    capsys.readouterr()
    assert registry_copy.run("export-best") == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{uri}") or f" {uri}" in line
    assert expected in line and "--no-tracking" in line
    assert not marker.exists()
    assert not registry_copy.exports.exists() or list(registry_copy.exports.iterdir()) == []
