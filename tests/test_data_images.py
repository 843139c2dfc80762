"""load_image: every Pillow mode becomes correct 8-bit RGB; broken files raise DataError naming them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capvqa.data.images import image_content_hash, load_image, to_rgb
from capvqa.data.items import ImageRef
from capvqa.errors import ConfigError, DataError


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


# -- files that must never be read in full, or at all: they could block or never end ----------------

_READ_BOTH_WAYS = textwrap.dedent("""
    import sys
    from capvqa.data.images import image_content_hash, load_image
    from capvqa.data.items import ImageRef
    from capvqa.errors import DataError
    for read in (image_content_hash, load_image):
        try:
            read(ImageRef(path=sys.argv[1]))
        except DataError as error:
            print(error)
        else:
            print("READ")
""")


def _guarded(code: str, *args: str, env: dict | None = None) -> list[str]:
    """Run ``code`` in a subprocess that is killed after 30 s, so a regression fails instead of hanging the
    suite (reading /dev/zero never ends; opening a FIFO blocks until a writer comes)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_refused_not_read_forever(tmp_path):
    link = tmp_path / "COCO_val2014_000000000007.jpg"
    link.symlink_to("/dev/zero")
    lines = _guarded(_READ_BOTH_WAYS, str(link))
    assert len(lines) == 2
    for line in lines:  # hashing and decoding both refuse it, naming the file and what it is
        assert "COCO_val2014_000000000007.jpg" in line and "character device" in line and "/dev/zero" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    lines = _guarded(_READ_BOTH_WAYS, str(fifo))
    assert len(lines) == 2 and all("pipe.jpg" in line and "named pipe (FIFO)" in line for line in lines)


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import capvqa.data.images as images

    ref = _save(Image.new("RGB", (16, 16), (9, 9, 9)), tmp_path / "big.png")
    size = ref.path.stat().st_size
    monkeypatch.setattr(images, "DEFAULT_MAX_IMAGE_FILE_BYTES", size - 1)
    for read in (image_content_hash, load_image):
        with pytest.raises(DataError, match=rf"big\.png is {size:,} bytes, over the limit of {size - 1:,} bytes.*"
                                            "CAPVQA_MAX_IMAGE_BYTES"):
            read(ref)
    monkeypatch.setattr(images, "DEFAULT_MAX_IMAGE_FILE_BYTES", size)  # the limit itself is allowed
    assert image_content_hash(ref) == hashlib.sha256(ref.path.read_bytes()).hexdigest()
    monkeypatch.setattr(images, "DEFAULT_MAX_IMAGE_FILE_BYTES", 10)
    monkeypatch.setenv("CAPVQA_MAX_IMAGE_BYTES", str(size))  # the environment overrides the default
    assert load_image(ref).size == (16, 16)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_file_that_outgrows_its_stat_size_stops_at_the_limit(tmp_path, monkeypatch):
    # /proc files are regular and report size 0, like a file still being written: the byte count read
    # is checked too, not only the size announced on opening.
    link = tmp_path / "maps.jpg"
    link.symlink_to("/proc/self/maps")
    monkeypatch.setenv("CAPVQA_MAX_IMAGE_BYTES", "64")
    with pytest.raises(DataError, match=r"maps\.jpg grew past the limit of 64 bytes"):
        image_content_hash(ImageRef(path=link))


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_invalid_size_limit_in_the_environment_is_named(tmp_path, monkeypatch, value):
    ref = _save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    monkeypatch.setenv("CAPVQA_MAX_IMAGE_BYTES", value)
    with pytest.raises(ConfigError, match=rf"CAPVQA_MAX_IMAGE_BYTES={value!r} is not a positive"):
        image_content_hash(ref)


_KEY_TWO_IMAGES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from capvqa.data.items import ImageRef, VQAItem
    from capvqa.engine.runner import PipelineRunner
    from capvqa.engine.store import CacheStore
    from capvqa.errors import DataError
    good, bad, cache, policy = sys.argv[1:]
    items = [VQAItem(question_id=i, image_id=i, question="What is it?", image=ImageRef(path=Path(p)))
             for i, p in ((1, good), (2, bad))]
    runner = PipelineRunner([], CacheStore(cache), runtime=None, on_bad_image=policy)
    try:
        keyed = runner.keyed_window(items)
    except DataError as error:
        print(json.dumps({"error": str(error)}))
    else:
        print(json.dumps({"keyed": [k.item.question_id for k in keyed],
                          "skipped": {q: s.reason for q, s in runner.skipped.items()}}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_run_skips_or_stops_at_an_image_that_links_to_dev_zero(tmp_path, policy):
    good = _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "good.png").path
    bad = tmp_path / "COCO_val2014_000000000002.jpg"
    bad.symlink_to("/dev/zero")
    (outcome,) = _guarded(_KEY_TWO_IMAGES, str(good), str(bad), str(tmp_path / "cache"), policy)
    result = json.loads(outcome)
    if policy == "skip":
        assert result["keyed"] == [1] and list(result["skipped"]) == ["2"]
        assert "COCO_val2014_000000000002.jpg" in result["skipped"]["2"]
    else:
        assert "COCO_val2014_000000000002.jpg" in result["error"] and "character device" in result["error"]


def test_an_image_replaced_after_hashing_is_refused_at_decode(tmp_path):
    """The engine keys an item by the hash of its image bytes when the run starts; a file replaced before a
    stage decodes it must not get results stored under the old content's keys."""
    import hashlib

    from capvqa.data.images import distinct_images
    from capvqa.data.items import ImageRef, VQAItem
    from capvqa.engine.stage import StageInput

    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    hashed = hashlib.sha256(path.read_bytes()).hexdigest()
    item = VQAItem(question_id=1, image_id=1, question="what?", image=ImageRef(path=path))
    entry = StageInput(item=item, item_key="k", image_hash=hashed, content_sha256=hashed)
    images, _ = distinct_images([entry])
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(path)
    with pytest.raises(DataError, match="changed while the run was using it"):
        distinct_images([entry])
    hand_made = StageInput(item=item, item_key="k", image_hash="mine")  # stages used alone: nothing to check
    assert distinct_images([hand_made])[0][0].getpixel((0, 0)) == (0, 0, 255)
