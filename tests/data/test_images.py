"""Decoding one picture file: what Pillow hands over in every mode becomes the same uint8 [C, S, S].

Every test writes a real file with Pillow and reads it back through `images.open_picture`, the function
landing a folder and `make predict` share.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import images
from pipeline.data.images import PictureError, Preprocessing, open_picture

RGB16 = Preprocessing(16, "rgb")
GRAY16 = Preprocessing(16, "gray")


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _colour_of(picture: np.ndarray) -> tuple[float, ...]:
    """Mean value per channel of a [C, H, W] picture."""
    return tuple(float(v) for v in picture.reshape(picture.shape[0], -1).mean(axis=1))


# --------------------------------------------------------------------------------------------------
# Bit depths and colour modes


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    levels = np.array([0, 257 * 64, 32768, 65535], dtype=np.uint16)  # 0, 1/4, 1/2 and full scale
    stored = np.repeat(np.repeat(levels.reshape(2, 2), 8, axis=0), 8, axis=1)
    path = _save(Image.fromarray(stored), tmp_path / "deep.png")
    assert _mode(path) == "I;16"  # really a 16-bit file

    picture = open_picture(path, GRAY16)
    assert picture.shape == (1, 16, 16) and picture.dtype == np.uint8
    # Clipping would make everything above 255 white (255, 255, 255 for the last three quadrants).
    assert picture[0, :8, :8].tolist() == [[0] * 8] * 8
    assert set(picture[0, :8, 8:].ravel()) == {64}
    assert set(picture[0, 8:, :8].ravel()) == {128}
    assert set(picture[0, 8:, 8:].ravel()) == {255}


def test_dark_16_bit_png_stays_dark(tmp_path):
    """A 16-bit picture whose values all happen to be below 256 is nearly black, not an 8-bit picture."""
    stored = np.full((16, 16), 200, dtype=np.uint16)  # 200 / 65535 of full scale
    path = _save(Image.fromarray(stored), tmp_path / "dark.png")
    assert _mode(path) == "I;16"
    assert set(open_picture(path, GRAY16).ravel()) == {1}  # round(200 * 255 / 65535)


def test_float_tiff_in_0_1_is_scaled(tmp_path):
    stored = np.full((16, 16), 0.5, dtype=np.float32)
    path = _save(Image.fromarray(stored, mode="F"), tmp_path / "float.tif")
    assert set(open_picture(path, GRAY16).ravel()) == {128}


@pytest.mark.parametrize(("stored", "outlier", "scaled"), [
    (np.full((32, 16), 255, dtype=np.int32), 65535, 1),  # 32-bit integers: one above 255 makes them 16-bit
    pytest.param(np.full((32, 16), 1.0, dtype=np.float32), np.nan, 1,  # floats: a NaN means they are not 0-1
                 marks=pytest.mark.filterwarnings("ignore:invalid value encountered in cast")),  # the NaN's pixel
])
def test_the_range_of_a_32_bit_picture_is_judged_on_all_its_bands(stored, outlier, scaled, tmp_path, monkeypatch):
    """The one value that decides the range lies in the picture's last band, outside the centre crop."""
    monkeypatch.setattr(images, "BAND_PIXELS", 16 * 8)  # bands of 8 rows
    stored[31, 0] = outlier
    path = _save(Image.fromarray(stored), tmp_path / "deep.tif")
    assert _mode(path) in ("I", "F")
    assert set(open_picture(path, GRAY16).ravel()) == {scaled}  # 255 of 65535, 1.0 of 255
    stored[31, 0] = stored[0, 0]  # without it: the 8-bit (0-255, 0-1) range
    assert set(open_picture(_save(Image.fromarray(stored), tmp_path / "plain.tif"), GRAY16).ravel()) == {255}


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "print.jpg", quality=95)
    assert _mode(path) == "CMYK"
    red, green, blue = _colour_of(open_picture(path, RGB16))
    assert red > 240 and green < 15 and blue < 15


def test_palette_png_becomes_its_colours(tmp_path):
    stored = Image.new("P", (16, 16), 0)
    stored.putpalette([10, 200, 30, 250, 250, 0] + [0] * (254 * 3))
    stored.paste(1, (0, 8, 16, 16))  # bottom half: palette entry 1
    path = _save(stored, tmp_path / "palette.png")
    assert _mode(path) == "P"
    picture = open_picture(path, RGB16)
    assert picture[:, :8].reshape(3, -1).T.tolist() == [[10, 200, 30]] * 128
    assert picture[:, 8:].reshape(3, -1).T.tolist() == [[250, 250, 0]] * 128


def test_palette_png_transparency_is_composited_over_white(tmp_path):
    stored = Image.new("P", (16, 16), 0)
    stored.putpalette([0, 0, 255, 255, 0, 0] + [0] * (254 * 3))
    stored.paste(1, (0, 8, 16, 16))
    path = _save(stored, tmp_path / "transparent.png", transparency=0)  # entry 0 is see-through
    picture = open_picture(path, RGB16)
    assert set(picture[:, :8].ravel()) == {255}  # transparent blue: white
    assert picture[:, 8:].reshape(3, -1).T.tolist() == [[255, 0, 0]] * 128


def test_rgba_png_is_composited_over_white(tmp_path):
    stored = np.zeros((16, 16, 4), dtype=np.uint8)
    stored[:, :8] = (0, 0, 255, 255)  # opaque blue
    stored[:, 8:] = (255, 0, 0, 0)  # fully transparent red
    stored[8:, 8:] = (0, 0, 0, 128)  # half-transparent black
    path = _save(Image.fromarray(stored, mode="RGBA"), tmp_path / "alpha.png")
    picture = open_picture(path, RGB16)
    assert picture[:, :, :8].reshape(3, -1).T.tolist() == [[0, 0, 255]] * 128
    assert set(picture[:, :8, 8:].ravel()) == {255}
    assert set(picture[:, 8:, 8:].ravel()) == {127}  # 255 * (1 - 128/255)


def test_gray_with_alpha_is_composited_over_white(tmp_path):
    stored = np.zeros((16, 16, 2), dtype=np.uint8)  # black
    stored[:, :8, 1] = 255  # left half opaque, right half fully transparent
    path = _save(Image.fromarray(stored, mode="LA"), tmp_path / "la.png")
    picture = open_picture(path, GRAY16)
    assert set(picture[0, :, :8].ravel()) == {0} and set(picture[0, :, 8:].ravel()) == {255}


def test_gray_request_gives_luminance_and_rgb_request_repeats_gray(tmp_path):
    red = _save(Image.new("RGB", (16, 16), (255, 0, 0)), tmp_path / "red.png")
    gray = _save(Image.new("L", (16, 16), 90), tmp_path / "gray.png")
    assert set(open_picture(red, GRAY16).ravel()) == {76}  # ITU-R 601-2 luma: 255 * 0.299
    picture = open_picture(gray, RGB16)
    assert picture.shape == (3, 16, 16) and set(picture.ravel()) == {90}


# --------------------------------------------------------------------------------------------------
# Geometry


def test_exif_orientation_6_is_applied(tmp_path):
    """Stored landscape with red on top and blue below; Orientation=6 says: turn 90 degrees clockwise to view.

    Viewed, the picture is portrait with red on the right and blue on the left."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10] = (255, 0, 0)
    stored[10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(stored), tmp_path / "phone.jpg", exif=exif, quality=95)
    picture = open_picture(path, RGB16).astype(int)
    left, right = picture[:, :, :6], picture[:, :, 10:]
    assert _colour_of(left)[2] > 200 and _colour_of(left)[0] < 40  # blue
    assert _colour_of(right)[0] > 200 and _colour_of(right)[2] < 40  # red
    top, bottom = picture[:, :6], picture[:, 10:]
    assert abs(_colour_of(top)[0] - _colour_of(bottom)[0]) < 20  # no longer split top/bottom

    exif[0x0112] = 1  # the same pixels, upright: split top/bottom as stored
    upright = open_picture(_save(Image.fromarray(stored), tmp_path / "upright.jpg", exif=exif, quality=95), RGB16)
    assert _colour_of(upright[:, :6])[0] > 200 and _colour_of(upright[:, 10:])[2] > 200


def test_shorter_side_resized_then_centre_cropped(tmp_path):
    stored = np.zeros((20, 60, 3), dtype=np.uint8)  # three 20x20 squares: red, green, blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:40] = (0, 255, 0)
    stored[:, 40:] = (0, 0, 255)
    picture = open_picture(_save(Image.fromarray(stored), tmp_path / "wide.png"), RGB16)
    assert picture.shape == (3, 16, 16)
    assert picture[:, :, 2:14].reshape(3, -1).T.tolist() == [[0, 255, 0]] * (16 * 12)  # the middle square

    small = open_picture(_save(Image.new("RGB", (4, 8), (9, 8, 7)), tmp_path / "small.png"), RGB16)
    assert small.shape == (3, 16, 16) and small.reshape(3, -1).T.tolist() == [[9, 8, 7]] * 256  # upscaled


# --------------------------------------------------------------------------------------------------
# Files that cannot be used


def test_pixel_cap_refuses_before_decoding_and_names_the_file(tmp_path):
    path = _save(Image.new("RGB", (40, 40)), tmp_path / "big.png")
    with pytest.raises(PictureError) as refused:
        open_picture(path, RGB16, max_megapixels=0.001)
    message = str(refused.value)
    assert str(path) in message and "40x40" in message and "max_megapixels" in message
    assert "\n" not in message
    assert open_picture(path, RGB16, max_megapixels=0.002).shape == (3, 16, 16)  # 1,600 pixels fit in 2,000


def test_truncated_jpeg_is_named_in_one_line(tmp_path):
    whole = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                  tmp_path / "whole.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(PictureError) as refused:
        open_picture(cut, RGB16)
    message = str(refused.value)
    assert message.startswith(f"{cut}: cannot be decoded as an image") and "\n" not in message


def test_text_file_with_an_image_name_is_refused(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture\nat all\n")
    with pytest.raises(PictureError, match="notes.png: cannot be decoded as an image"):
        open_picture(fake, RGB16)


# --------------------------------------------------------------------------------------------------
# Memory: what decoding one picture may take


# Run in a process of its own: its address space is capped at what it has mapped after the imports plus the
# budget, so the decoding's peak, not just its end state, must fit.
DECODE_UNDER_A_LIMIT = """
import re, resource, sys
import numpy as np
from pipeline.data.images import Preprocessing, open_picture

def mapped():
    with open("/proc/self/status") as status:
        return int(re.search(r"^VmSize:\\s*(\\d+) kB", status.read(), re.MULTILINE)[1]) * 1024

path, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
limit = mapped() + budget
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
np.save(out, open_picture(path, Preprocessing(16, "gray")))
"""


def test_decoding_a_big_16_bit_png_takes_a_few_times_its_decoded_bytes(tmp_path):
    """6000x6000 16-bit: 72 MB decoded (from a ~100 KB file). Scaled through float64 copies of the whole picture
    it took over a gigabyte; band by band it fits in four times its decoded bytes."""
    side = 6000
    gradient = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)  # 0 left, 65535 right
    path = _save(Image.fromarray(np.broadcast_to(gradient, (side, side)).copy()), tmp_path / "deep.png")
    assert _mode(path) == "I;16" and path.stat().st_size < 1_000_000
    decoded_bytes = side * side * 2

    out = tmp_path / "picture.npy"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no thread buffers mapped later
    child = subprocess.run([sys.executable, "-c", DECODE_UNDER_A_LIMIT, str(path), str(4 * decoded_bytes), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    picture = np.load(out)
    assert picture.shape == (1, 16, 16)
    assert (picture[0] == picture[0, 0]).all()  # every row the same gradient
    row = picture[0, 0].astype(int)
    assert (np.diff(row) > 0).all() and row[0] < 20 and row[-1] > 235  # scaled, not clipped to white
