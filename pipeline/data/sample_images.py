"""A small ImageFolder tree of drawn shapes, for trying a folder dataset offline (`make sample-images`).

    python -m pipeline.data.sample_images [--out data/sample-images] [--per-class 200] [--seed 0]

Five classes (circle, square, triangle, "thin stripes", "étoile": a space and a non-ASCII letter in the
folder names on purpose), drawn with Pillow in random colours, sizes, positions and rotations on noisy
backgrounds. The files are the kinds users have: PNG and JPEG (.png, .jpg, .jpeg, .JPG); RGB, gray (L),
palette (P) and RGBA; 40-120 px and never square; a few JPEGs stored sideways with an EXIF orientation tag.
Every shape sits inside the centred square that landing keeps (shorter side resized, centre cropped), so
no label is cropped away.

The same version, seed, count and sizes give the same files, byte for byte. The tree is written under a
temporary name and renamed into place; a folder that already holds the same version is left alone.
Exit codes: 0 done (or nothing to do), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.infra import fileio
from pipeline.spec.errors import BadInput
from pipeline.spec.paths import DATA_ROOT

VERSION = 1  # bump when the drawing changes, so existing trees are rewritten
CLASSES = ("circle", "square", "triangle", "thin stripes", "étoile")
DEFAULT_OUT = DATA_ROOT / "sample-images"
DEFAULT_PER_CLASS = 200  # 1,000 pictures land in seconds; at 120 a small CNN tops out near 85% in 15 epochs
DEFAULT_SIZES = (40, 120)  # shortest and longest side, px
MARKER = ".sample-images.json"  # a hidden file at the root: ImageFolder reads class folders only
# (mode, format, share of the pictures): mostly RGB JPEGs, as photo folders are
KINDS = (("RGB", "JPEG", 0.35), ("RGB", "PNG", 0.15), ("L", "JPEG", 0.15), ("L", "PNG", 0.10),
         ("P", "PNG", 0.15), ("RGBA", "PNG", 0.10))
EXIF_SHARE = 0.1  # of the RGB JPEGs: stored sideways or upside down, with the tag that turns them upright
# How each tag is undone on reading (ImageOps.exif_transpose), and so what we apply before saving.
STORED_FOR_TAG = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
ORIENTATION_TAG = 0x0112


def _luminance(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A base colour with a gentle gradient and sensor-like noise; returns (pixels, base colour)."""
    base = rng.uniform(0, 255, 3)
    ramp = np.linspace(-1, 1, width)[None, :, None] * rng.uniform(-30, 30, 3)
    noise = rng.normal(0, rng.uniform(4, 20), (height, width, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8), base


def _ink(rng: np.random.Generator, base: np.ndarray) -> tuple[int, int, int]:
    """A colour that stands out from the background even once converted to gray."""
    while True:
        colour = rng.uniform(0, 255, 3)
        if abs(_luminance(colour) - _luminance(base)) > 70:
            red, green, blue = (int(c) for c in colour)
            return red, green, blue


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + i * step), cy + r * math.sin(angle + i * step)) for i, r in enumerate(radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, side: int,
                colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    angle = rng.uniform(0, 2 * math.pi)
    # A third of the solid shapes are outlines only: the class is the shape, not the blob of colour.
    outline = rng.random() < 0.3
    width = max(2, round(r / 4))
    if name == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        if outline:
            draw.ellipse(box, outline=colour, width=width)
        else:
            draw.ellipse(box, fill=colour)
        return
    if name == "thin stripes":
        # Parallel lines across a patch of about the shape's size, at a random angle.
        count = int(rng.integers(3, 6))
        spacing = 2 * r / count
        thick = max(1, round(side / 40))
        along = (math.cos(angle), math.sin(angle))
        across = (-along[1], along[0])
        for i in range(count):
            offset = (i - (count - 1) / 2) * spacing
            mx, my = cx + across[0] * offset, cy + across[1] * offset
            draw.line([(mx - along[0] * r, my - along[1] * r), (mx + along[0] * r, my + along[1] * r)],
                      fill=colour, width=thick)
        return
    if name == "square":
        points = _polygon(cx, cy, [r] * 4, angle)
    elif name == "triangle":
        points = _polygon(cx, cy, [r] * 3, angle)
    else:  # étoile: a five-pointed star
        points = _polygon(cx, cy, [r, r * 0.4] * 5, angle)
    if outline:
        draw.polygon(points, outline=colour, width=width)
    else:
        draw.polygon(points, fill=colour)


def _picture(name: str, rng: np.random.Generator, sizes: tuple[int, int]) -> Image.Image:
    """One RGB picture of the shape `name`, inside the centred square of a non-square canvas."""
    width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
    if width == height:
        width = width + 1 if width < sizes[1] else width - 1
    pixels, base = _background(rng, width, height)
    image = Image.fromarray(pixels, "RGB")
    side = min(width, height)
    r = side * rng.uniform(0.22, 0.36)
    shift = side * 0.5 - r - side * 0.04  # keeps the shape inside the centred square, with a margin
    cx = width / 2 + rng.uniform(-shift, shift)
    cy = height / 2 + rng.uniform(-shift, shift)
    _draw_shape(ImageDraw.Draw(image), name, cx, cy, r, side, _ink(rng, base), rng)
    if rng.random() < 0.3:  # some out of focus, as photos are
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


def _save(image: Image.Image, folder: Path, index: int, rng: np.random.Generator, jpeg_only: bool) -> None:
    """Convert to a randomly chosen mode and save as PNG or JPEG (sometimes with an EXIF orientation)."""
    kinds = [k for k in KINDS if k[1] == "JPEG"] if jpeg_only else list(KINDS)
    shares = np.array([k[2] for k in kinds])
    mode, fmt, _ = kinds[int(rng.choice(len(kinds), p=shares / shares.sum()))]
    if mode == "P":
        image = image.quantize(colors=int(rng.integers(16, 65)))
    elif mode == "RGBA":
        # A see-through background (composited over white on landing), the shape itself opaque.
        alpha = np.full((image.height, image.width), int(rng.integers(120, 256)), dtype=np.uint8)
        gray = np.asarray(image.convert("L"), dtype=np.int16)
        alpha[np.abs(gray - np.median(gray)) > 35] = 255
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(alpha, "L"))
    else:
        image = image.convert(mode)
    if fmt == "PNG":
        image.save(folder / f"{index:04d}.png", "PNG")
        return
    suffix = [".jpg", ".jpeg", ".JPG"][int(rng.choice(3, p=[0.8, 0.15, 0.05]))]
    options: dict[str, int | bytes] = {"quality": int(rng.integers(60, 96))}
    if mode == "RGB" and rng.random() < EXIF_SHARE:
        tag = int(rng.choice(sorted(STORED_FOR_TAG)))
        image = image.transpose(STORED_FOR_TAG[tag])
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = tag
        options["exif"] = exif.tobytes()
    image.save(folder / f"{index:04d}{suffix}", "JPEG", **options)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write(out: Path = DEFAULT_OUT, per_class: int = DEFAULT_PER_CLASS, seed: int = 0,
          sizes: tuple[int, int] = DEFAULT_SIZES, jpeg_only: bool = False) -> bool:
    """Write the tree to `out` unless it already holds the same one; True when it wrote.

    A folder at `out` that this module did not write is never replaced (BadInput).
    """
    out = Path(out)
    if per_class < 2:
        raise BadInput(f"--per-class {per_class}: give at least 2 pictures per class (test and validation "
                       "splits are carved from each class)")
    if not 8 <= sizes[0] <= sizes[1]:
        raise BadInput(f"sizes {sizes}: need 8 <= shortest <= longest")
    marker = {"version": VERSION, "per_class": per_class, "seed": seed, "sizes": list(sizes), "jpeg_only": jpeg_only}
    if out.exists():
        found = _read_marker(out)
        if found == marker:
            return False
        if found is None:
            raise BadInput(f"{out} exists and was not written by pipeline.data.sample_images; remove it or pass "
                           "another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for label, name in enumerate(CLASSES):
            folder = partial / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                # One generator per picture: a picture does not depend on how many others are drawn.
                rng = np.random.default_rng([seed, label, index])
                _save(_picture(name, rng, sizes), folder, index, rng, jpeg_only)
        (partial / MARKER).write_text(json.dumps(marker) + "\n")
        _swap_in(partial, out, marker)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return True


def _swap_in(partial: Path, out: Path, marker: dict) -> None:
    """Rename the finished tree into place; an older version of ours is moved aside first, then removed."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        fileio.rename_durably(partial, out)
    except OSError:
        if _read_marker(out) != marker:  # not another process writing the same tree at the same moment
            raise
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the tree's folder (default: data/sample-images)")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="pictures per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        wrote = write(args.out, args.per_class, args.seed)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = args.per_class * len(CLASSES)
    if wrote:
        print(f"wrote {total:,} pictures in {len(CLASSES)} classes to {_shown(args.out)} "
              f"in {time.perf_counter() - started:.1f} s")
    else:
        print(f"{_shown(args.out)} already holds these {total:,} sample pictures (version {VERSION}); nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
