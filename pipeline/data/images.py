"""One picture -> the uint8 array a model was trained on. Landing a folder and `make predict` both call
`prepare_picture`, so the two cannot drift apart.

Decoding is Pillow's, for the formats a folder dataset's file names promise (FORMATS) and no other, with
a pixel cap checked on the header before anything is decoded: EXIF orientation applied, 16-bit and float
images scaled to 8 bits, palette and transparent images composited over white, CMYK converted to RGB.
Then the shorter side is resized to `image_size` and the centre cropped to a square. Digit datasets
(MNIST, Fashion-MNIST) instead get their own preparation: light object on a dark background, cropped
to the object and centred as those datasets were made.

No step copies a whole picture into wider numbers (16-bit and float pictures are scaled a band of rows at
a time): decoding one takes a small multiple of its decoded bytes, which the pixel cap bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.spec.sources import DEFAULT_MAX_MEGAPIXELS, DIGITS

# The formats a picture may come in: those of the file names a folder dataset takes (torchvision's IMG_EXTENSIONS:
# .jpg .jpeg .png .ppm .pgm .bmp .tif .tiff .webp), as Pillow names them. Only these decoders are tried, whatever
# a file is called, so a picture in any other format (GIF, ICO, PSD, ...) never reaches another parser.
FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
GRAY_MODES = ("1", "L", "LA", "I", *SIXTEEN_BIT, "F")
# Pillow refuses more than twice its own limit by itself; ours is the one that applies (checked first).
Image.MAX_IMAGE_PIXELS = None
DATASET_CAP_HINT = "a study may raise dataset.max_megapixels"  # what a refused picture's line suggests by default
BAND_PIXELS = 1 << 20  # pixels scaled at a time from a 16/32-bit picture: its float64 copy is 8 MB, not 8 bytes a pixel


class PictureError(ValueError):
    """A file that cannot be used as a picture: unreadable, truncated, or over the pixel cap."""


@dataclass(frozen=True)
class Preprocessing:
    """How pictures become model input: recorded in every export's config.json."""

    image_size: int  # output is image_size x image_size
    channels: str  # "rgb" or "gray" (resolved, never "auto")
    style: str = "photo"  # "photo": resize + centre crop; "mnist" / "fashion-mnist": the digit datasets' own

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "style": self.style}

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3 if self.channels == "rgb" else 1, self.image_size, self.image_size)


def is_gray_mode(mode: str) -> bool:
    return mode in GRAY_MODES


def _bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(top row, its pixels) for each band of rows of `image`, BAND_PIXELS at most: one band at a time is
    copied out, never the whole picture."""
    rows = max(1, BAND_PIXELS // image.width)
    for top in range(0, image.height, rows):
        yield top, np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))))


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float gray images scaled to 0-255 (Pillow's own conversion clips).

    A 16-bit mode's range is 0-65535 whatever its pixels hold, so a dark 16-bit picture stays dark. Mode "I"
    (32-bit integers) and "F" (floats) say nothing of their range: values up to 255 (floats: up to 1) are
    taken as that range, larger ones as 16-bit. Scaled band by band, so that the work takes a few megabytes
    beside the decoded picture and its 8-bit result; integers with integer math (v * 255 / 65535 is v / 257,
    never halfway between two integers, so (v + 128) // 257 is its rounding), floats as float64 as before."""
    if image.mode not in ("I", *SIXTEEN_BIT, "F"):
        return image
    if image.mode in SIXTEEN_BIT:
        top = 65535
    elif image.mode == "I":  # one band: Pillow finds its (lowest, highest) in C, without a copy
        top = 65535 if cast(tuple[int, int], image.getextrema())[1] > 255 else 255
    else:  # any NaN makes its band's maximum NaN, which is not <= 1: 255 (Pillow's getextrema would skip NaN)
        top = 1 if all(band.max(initial=0) <= 1.0 for _, band in _bands(image)) else 255
    result = Image.new("L", image.size)
    for row, band in _bands(image):
        if image.mode == "F":
            scaled = np.clip(np.round(band.astype(np.float64) * 255.0 / top), 0, 255)
        elif top == 65535:
            scaled = np.clip((band.astype(np.int64) + 128) // 257, 0, 255)
        else:
            scaled = np.clip(band, 0, 255)
        result.paste(Image.fromarray(scaled.astype(np.uint8)), (0, row))
    return result


def to_mode(image: Image.Image, channels: str) -> Image.Image:
    """An 8-bit "RGB" or "L" image, transparency composited over white, orientation from EXIF applied."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even an upright picture
        image = ImageOps.exif_transpose(image)
    image = _eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    mode = "RGB" if channels == "rgb" else "L"
    return image if image.mode == mode else image.convert(mode)  # convert() to the same mode is a copy


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (antialiased), then the centred size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def check_size(image: Image.Image, max_megapixels: float, name: str, cap_hint: str = DATASET_CAP_HINT) -> None:
    pixels = image.width * image.height
    if pixels > max_megapixels * 1e6:
        raise PictureError(f"{name}: {image.width}x{image.height} is {pixels / 1e6:.0f} megapixels, over the cap "
                           f"of {max_megapixels:g}; shrink it or remove it ({cap_hint})")


def prepare_picture(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """A decoded picture -> uint8 [C, S, S] the way the training images were landed."""
    if preprocessing.style in DIGITS:
        return digit_picture(image, preprocessing.style)[None]
    picture = resize_and_crop(to_mode(image, preprocessing.channels), preprocessing.image_size)
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def open_picture(path, preprocessing: Preprocessing, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                 cap_hint: str = DATASET_CAP_HINT) -> np.ndarray:
    """Read one picture file (one of FORMATS) and prepare it; PictureError names the file and what is wrong.

    The pixel cap is checked on the header's size, before anything is decoded. Any exception while decoding
    and preparing is the file's: decoders and EXIF parsers raise all sorts (struct.error, TypeError, ...)
    on crafted or damaged files, and one bad picture must not stop the others."""
    try:
        with Image.open(path, formats=FORMATS) as image:
            check_size(image, max_megapixels, str(path), cap_hint)
            image.load()
            return prepare_picture(image, preprocessing)
    except PictureError:
        raise
    except UnidentifiedImageError:
        raise PictureError(f"{path}: cannot be decoded as an image in the formats read here "
                           f"({', '.join(FORMATS)}); convert it to PNG or JPEG") from None
    except Exception as exc:
        detail = " ".join(str(exc).split())  # one line, whatever the decoder wrote
        kind = type(exc).__qualname__
        if type(exc).__module__ != "builtins":  # struct.error, not a bare "error"
            kind = f"{type(exc).__module__}.{kind}"
        raise PictureError(f"{path}: cannot be decoded as an image ({kind}: {detail})") from None


def digit_picture(image: Image.Image, dataset: str) -> np.ndarray:
    """Any picture -> 28x28 uint8 the way the digit datasets look: grayscale, light object on a dark background.

    A 28x28 picture is kept as it is (only inverted if its background is light). Otherwise: grayscale,
    inverted if the border is lighter than the middle, cropped to the object, and then for MNIST scaled
    to fit 20x20 and centred by its centre of mass in 28x28 (how MNIST was made); for Fashion-MNIST
    scaled to fit 28x28 and centred.
    """
    gray = to_mode(image, "gray")
    pixels = np.asarray(gray)  # uint8: a float copy of a big picture would take 4 or 8 times its bytes
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.int64)
    if border.sum() > 127 * border.size:  # a mean above 127, in integers
        gray = ImageOps.invert(gray)
    if gray.size == (28, 28):
        return np.asarray(gray, dtype=np.uint8)
    box = gray.point(lambda v: 255 if v > 30 else 0).getbbox() or (0, 0, *gray.size)
    gray = gray.crop(box)
    fit = 20 if dataset == "mnist" else 28
    scale = fit / max(gray.size)
    fitted = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    gray = gray.resize(fitted, Image.Resampling.LANCZOS)
    canvas = np.zeros((28, 28), dtype=np.float32)
    small = np.asarray(gray, dtype=np.float32)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    if dataset == "mnist" and small.sum() > 0:  # centre of mass at the centre, as MNIST was centred
        rows, cols = np.indices(small.shape)
        top = int(round(14 - (rows * small).sum() / small.sum()))
        left = int(round(14 - (cols * small).sum() / small.sum()))
        top = min(max(top, 0), 28 - small.shape[0])
        left = min(max(left, 0), 28 - small.shape[1])
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return canvas.clip(0, 255).astype(np.uint8)


def decode_files(task: tuple[list[str], Preprocessing, float]) -> list[np.ndarray | str]:
    """Each picture of a chunk as uint8 [C, S, S], or the error line that names it.

    Run in the decoding processes, which import only this module (numpy and Pillow, not torch): each
    starts in a fraction of a second."""
    paths, preprocessing, max_megapixels = task
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(open_picture(path, preprocessing, max_megapixels))
        except PictureError as exc:
            out.append(str(exc))
    return out
