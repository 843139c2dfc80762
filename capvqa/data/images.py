"""Decode an item's image to RGB pixels, and name its content for the cache.

Loaders never decode: they hand out :class:`~capvqa.data.items.ImageRef` s, and a stage calls
:func:`load_image` when it needs pixels. This keeps a 214k-question split cheap to stream once per stage.

Every image comes back as an 8-bit RGB :class:`PIL.Image.Image` whatever its stored mode, because every
vision model we run expects that and a wrong conversion (a 16-bit PNG clipped to white, a transparent PNG
with black where the alpha was) silently degrades captions instead of failing.

Anything wrong with the file (missing, empty, truncated, not an image, too many pixels) raises
:class:`~capvqa.errors.DataError` naming the file, so a broken image in a long run is reported, not
turned into a crash with a PIL traceback.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from capvqa.data.items import ImageRef
from capvqa.errors import DataError

if TYPE_CHECKING:
    from capvqa.engine.stage import StageInput

logger = logging.getLogger(__name__)

#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (about 89.5 megapixels). The largest COCO image is
#: 640x640; anything far beyond this is a corrupt header or a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485

#: Background that transparent pixels are composited on: white, as a browser shows them and as the
#: annotators saw web images.
_BACKGROUND = (255, 255, 255)

_HASH_CHUNK_BYTES = 1 << 20

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def load_image(
    ref: ImageRef,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode ``ref`` into a fully loaded 8-bit RGB image.

    ``max_pixels`` is checked against the header's size *before* any pixel is decoded; ``None`` turns
    our check off (Pillow still refuses more than twice its global ``Image.MAX_IMAGE_PIXELS``).
    ``exif_transpose`` applies the EXIF orientation tag so the pixels are upright as a camera app
    shows them.
    """
    if ref.path is not None:
        data_or_file: BinaryIO = _open_file(ref.path)
    else:
        data_or_file = io.BytesIO(ref.data or b"")
    with data_or_file as stream:
        image = _decode(stream, ref.describe(), max_pixels=max_pixels)
    if exif_transpose:
        image = _exif_transposed(image, ref.describe())
    return to_rgb(image)


def image_content_hash(ref: ImageRef) -> str:
    """SHA-256 hex digest of the encoded image bytes: the image's identity in the result cache.

    Hashing the encoded bytes, not the path or the COCO id, means a moved or re-downloaded dataset
    keeps its cache, and two loaders (official files, Hugging Face) that carry the same JPEG share
    entries. Files are read in chunks so a large image never sits in memory twice.
    """
    digest = hashlib.sha256()
    if ref.data is not None:
        digest.update(ref.data)
        return digest.hexdigest()
    assert ref.path is not None
    with _open_file(ref.path) as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (pure: no I/O).

    - alpha (RGBA, LA, PA, palette with transparency): composited on white, not dropped, because
      dropping alpha reveals whatever colour the encoder left under transparent pixels (often black);
    - 16-bit greyscale (``I;16*``): scaled 0..65535 -> 0..255; Pillow's own conversion clips instead;
    - 32-bit integer ``I``: treated as 16-bit when any value exceeds 255 (how Pillow opens some
      16-bit PNGs and TIFFs), else as 8-bit; ``F``: scaled from 0..1 when its maximum is <= 1, else
      clipped to 0..255;
    - everything else (1, L, P, CMYK, YCbCr, LAB, HSV): Pillow's ``convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        values = values.astype(np.float64)
        finite_max = float(np.nanmax(values)) if values.size else 0.0
        if finite_max <= 1.0:
            values = values * 255.0
        return np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
    wide = values.astype(np.int64)
    if mode == "I" and (wide.size == 0 or int(wide.max()) <= 255):
        return np.clip(wide, 0, 255).astype(np.uint8)
    # round(v * 255 / 65535) == round(v / 257), exactly, in integers.
    return ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)


def _open_file(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(
            f"Image file not found: {path}. Check the dataset's image folder (was the image zip "
            "downloaded and extracted there?) or the image file-name pattern."
        ) from None
    except IsADirectoryError:
        raise DataError(f"Expected an image file but found a folder: {path}.") from None
    except PermissionError:
        raise DataError(f"Image file is not readable (permission denied): {path}.") from None


def _decode(stream: BinaryIO, origin: str, *, max_pixels: int | None) -> Image.Image:
    """Open lazily, check the pixel count from the header, then decode everything."""
    if _is_empty(stream):
        raise DataError(f"Image file is empty (0 bytes): {origin}. Re-download or replace it.")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning; its hard error (2x its global limit) stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise DataError(
                f"Image {origin} is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (a corrupt header or a decompression bomb). If the image is genuine, "
                "raise max_pixels."
            )
        image.load()
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"Image {origin} was refused by Pillow as a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise DataError(
            f"Not a readable image: {origin} (Pillow does not recognise the format). Replace the file "
            "with the original JPEG/PNG."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"), and some
        # plugins as SyntaxError / ValueError.
        raise DataError(
            f"Image {origin} is truncated or corrupt ({error}). Re-download or replace the file."
        ) from None
    return image


def _is_empty(stream: BinaryIO) -> bool:
    first = stream.read(1)
    stream.seek(0)
    return first == b""


def _exif_transposed(image: Image.Image, origin: str) -> Image.Image:
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - a malformed EXIF block must not lose the image.
        logger.warning("Ignoring unreadable EXIF orientation of %s: %s", origin, error)
        return image
    return transposed if transposed is not None else image


def distinct_images(batch: Sequence[StageInput]) -> tuple[list[Image.Image], list[int]]:
    """Decoded images of a stage batch, one per distinct image hash, and for each input the index of its
    image.

    Several questions often share an image (VQAv2 has ~5 per image); encoding it once per model is the
    cheapest way to batch them.
    """
    index_of: dict[str, int] = {}
    images: list[Image.Image] = []
    positions: list[int] = []
    for entry in batch:
        if entry.image_hash not in index_of:
            index_of[entry.image_hash] = len(images)
            images.append(load_image(entry.item.image))
        positions.append(index_of[entry.image_hash])
    return images, positions
