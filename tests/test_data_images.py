"""load_image: every Pillow mode becomes correct 8-bit RGB; broken files raise DataError naming them."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capvqa.data.images import image_content_hash, load_image, to_rgb
from capvqa.data.items import ImageRef
from capvqa.errors import DataError


def _save(image: Image.Image, path: Path, **kwargs) -> ImageRef:
    image.save(path, **kwargs)
    return ImageRef(path=path)


def _pixel(ref: ImageRef, xy=(0, 0)) -> tuple[int, int, int]:
    image = load_image(ref)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_rgb_jpeg_round_trip(tmp_path):
    ref = _save(Image.new("RGB", (8, 6), (200, 30, 40)), tmp_path / "a.jpg", quality=95)
    image = load_image(ref)
    assert image.size == (8, 6)
    assert all(abs(a - b) <= 6 for a, b in zip(image.getpixel((3, 3)), (200, 30, 40), strict=True))


def test_grayscale_becomes_three_equal_channels(tmp_path):
    ref = _save(Image.new("L", (4, 4), 77), tmp_path / "g.png")
    assert _pixel(ref) == (77, 77, 77)


def test_one_bit_image(tmp_path):
    image = Image.new("1", (4, 4), 0)
    image.putpixel((1, 1), 1)
    ref = _save(image, tmp_path / "b.png")
    assert _pixel(ref, (0, 0)) == (0, 0, 0)
    assert _pixel(ref, (1, 1)) == (255, 255, 255)


def test_rgba_transparency_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 1), (255, 0, 0, 255))
    image.putpixel((2, 2), (0, 0, 255, 128))
    ref = _save(image, tmp_path / "t.png")
    assert _pixel(ref, (0, 0)) == (255, 255, 255)
    assert _pixel(ref, (1, 1)) == (255, 0, 0)
    r, g, b = _pixel(ref, (2, 2))
    assert r == g and 120 <= r <= 135 and b == 255


def test_la_transparency_is_composited_on_white(tmp_path):
    ref = _save(Image.new("LA", (4, 4), (10, 0)), tmp_path / "la.png")
    assert _pixel(ref) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    assert _pixel(_save(palette_image, tmp_path / "p.png")) == (10, 200, 30)
    transparent = _save(palette_image, tmp_path / "pt.png", transparency=1)
    assert _pixel(transparent) == (255, 255, 255)


def test_pa_mode_is_composited():
    image = Image.new("PA", (2, 2))
    image.putpalette([0, 255, 0] * 256)
    image.putdata([(0, 0)] * 4)
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    ref = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    r, g, b = _pixel(ref, (4, 4))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    ref = _save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(ref.path).mode.startswith("I")
    image = load_image(ref)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 128, 255]


def test_thirty_two_bit_integer_and_float_modes():
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(2)] == [0, 255]
    narrow = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert to_rgb(narrow).getpixel((1, 0)) == (200, 200, 200)
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(unit_float).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    ref = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = load_image(ref)
    assert upright.size == (10, 20)
    assert upright.getpixel((5, 2))[0] > 200  # the red half is now on top
    assert upright.getpixel((5, 17))[0] < 50
    assert load_image(ref, exif_transpose=False).size == (20, 10)


def test_embedded_bytes(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 255, 0)).save(buffer, format="PNG")
    assert load_image(ImageRef(data=buffer.getvalue())).getpixel((1, 1)) == (0, 255, 0)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope" / "COCO_val2014_000000000042.jpg"
    with pytest.raises(DataError, match="COCO_val2014_000000000042.jpg"):
        load_image(ImageRef(path=path))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.*empty\.jpg"):
        load_image(ImageRef(path=path))
    with pytest.raises(DataError, match="empty"):
        load_image(ImageRef(data=b""))


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file(tmp_path, suffix):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full = tmp_path / f"full.{suffix}"
    noise.save(full)
    truncated = tmp_path / f"truncated.{suffix}"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"truncated\.{suffix}.*truncated or corrupt"):
        load_image(ImageRef(path=truncated))


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(DataError, match=r"Not a readable image.*notes\.jpg"):
        load_image(ImageRef(path=path))


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="folder"):
        load_image(ImageRef(path=tmp_path))


def test_decompression_bomb_guard_checks_header_before_decoding(tmp_path):
    ref = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png.*10,000 pixels.*5,000"):
        load_image(ref, max_pixels=5_000)
    assert load_image(ref, max_pixels=10_000).size == (100, 100)
    assert load_image(ref, max_pixels=None).size == (100, 100)


def test_content_hash_is_sha256_of_encoded_bytes(tmp_path):
    ref = _save(Image.new("RGB", (5, 5), (1, 2, 3)), tmp_path / "h.png")
    raw = ref.path.read_bytes()
    expected = hashlib.sha256(raw).hexdigest()
    assert image_content_hash(ref) == expected
    assert image_content_hash(ImageRef(data=raw)) == expected
    with pytest.raises(DataError, match="missing.png"):
        image_content_hash(ImageRef(path=tmp_path / "missing.png"))
