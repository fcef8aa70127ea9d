"""`make sample-images`: a deterministic ImageFolder tree of real PNG/JPEG files of mixed sizes and modes."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from pipeline.data import sample_images
from pipeline.spec.errors import BadInput


def _tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_tree_is_real_mixed_pictures_the_same_every_time(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert sample_images.write(first, per_class=12) is True
    assert sample_images.write(first, per_class=12) is False  # already there: left alone
    sample_images.write(second, per_class=12)
    assert _tree(first) == _tree(second)  # byte for byte
    classes = sorted(p.name for p in first.iterdir() if p.is_dir())
    assert classes == sorted(sample_images.CLASSES) and "thin stripes" in classes and "étoile" in classes
    modes, formats, sizes = set(), set(), set()
    for path in first.rglob("*.*"):
        if path.name.startswith("."):
            continue
        with Image.open(path) as image:
            modes.add(image.mode)
            formats.add(image.format)
            sizes.add(image.size)
    assert {"PNG", "JPEG"} <= formats and len(modes) >= 3 and len(sizes) > 10
    assert all(w != h for w, h in sizes)


def test_a_folder_it_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(BadInput):
        sample_images.write(tmp_path / "mine", per_class=4)
    assert (tmp_path / "mine" / "photo.jpg").read_bytes() == b"precious"


def test_an_older_tree_of_ours_is_rewritten_in_place(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert sample_images.main(["--out", str(out), "--per-class", "2"]) == 0
    assert sample_images.main(["--out", str(out), "--per-class", "3"]) == 0  # another tree: replaced
    assert "wrote 15 pictures" in capsys.readouterr().out
    assert all(len(list((out / name).iterdir())) == 3 for name in sample_images.CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no .partial or .old folder left
    assert sample_images.main(["--out", str(out), "--per-class", "1"]) == 2
    assert "at least 2 pictures per class" in capsys.readouterr().err
