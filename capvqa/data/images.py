"""Decode an item's image to RGB pixels, and name its content for the cache.

Loaders never decode: they hand out :class:`~capvqa.data.items.ImageRef` s, and a stage calls
:func:`load_image` when it needs pixels. This keeps a 214k-question split cheap to stream once per stage.

Every image comes back as an 8-bit RGB :class:`PIL.Image.Image` whatever its stored mode, because every
vision model we run expects that and a wrong conversion (a 16-bit PNG clipped to white, a transparent PNG
with black where the alpha was) silently degrades captions instead of failing.

Anything wrong with the file (missing, empty, truncated, not an image, too many pixels) raises
:class:`~capvqa.errors.DataError` naming the file, so a broken image in a long run is reported, not
turned into a crash with a PIL traceback.

Only regular files are read, and only up to :func:`max_image_file_bytes`: a path that resolves to a FIFO,
a device (a symlink to ``/dev/zero`` reads forever), a socket or a folder, or a file over the limit, is
refused with a :class:`~capvqa.errors.DataError` before a byte is read, so hashing or decoding can never
block or run without end.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from capvqa.data.items import ImageRef
from capvqa.errors import ConfigError, DataError

if TYPE_CHECKING:
    from capvqa.engine.stage import StageInput

logger = logging.getLogger(__name__)

#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (about 89.5 megapixels). The largest COCO image is
#: 640x640; anything far beyond this is a corrupt header or a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485

#: Background that transparent pixels are composited on: white, as a browser shows them and as the
#: annotators saw web images.
_BACKGROUND = (255, 255, 255)

#: The largest image file read, in bytes (256 MiB). The largest COCO image is under 1 MiB and a 16-bit
#: TIFF at :data:`DEFAULT_MAX_PIXELS` about 512 MiB; anything this large in a VQA dataset is a mistake,
#: and reading it would stall the run. ``$CAPVQA_MAX_IMAGE_BYTES`` overrides it.
DEFAULT_MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024
MAX_IMAGE_FILE_BYTES_ENV = "CAPVQA_MAX_IMAGE_BYTES"

_HASH_CHUNK_BYTES = 1 << 20

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def load_image(
    ref: ImageRef,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
    expected_sha256: str | None = None,
) -> Image.Image:
    """Decode ``ref`` into a fully loaded 8-bit RGB image.

    ``max_pixels`` is checked against the header's size *before* any pixel is decoded; ``None`` turns
    our check off (Pillow still refuses more than twice its global ``Image.MAX_IMAGE_PIXELS``).
    ``exif_transpose`` applies the EXIF orientation tag so the pixels are upright as a camera app
    shows them. ``expected_sha256`` is the content hash the item's cache keys were made from: the bytes
    decoded must be those bytes, else a file replaced after the run hashed it would have its results
    stored under the old content's keys.
    """
    if ref.path is not None:
        with _open_file(ref.path) as handle:
            encoded = _read_capped(handle, ref.path)
    else:
        encoded = ref.data or b""
    if expected_sha256 is not None and hashlib.sha256(encoded).hexdigest() != expected_sha256:
        raise DataError(
            f"image {ref.describe()} changed while the run was using it (its content no longer matches the "
            "hash its cached results are keyed by); rerun once the file is final"
        )
    with io.BytesIO(encoded) as stream:
        image = _decode(stream, ref.describe(), max_pixels=max_pixels)
    if exif_transpose:
        image = _exif_transposed(image, ref.describe())
    return to_rgb(image)


def _read_capped(handle: BinaryIO, path: Path) -> bytes:
    """The file's bytes, refusing a file that grows past the size limit while it is read."""
    limit = max_image_file_bytes()
    encoded = handle.read(limit + 1)
    if len(encoded) > limit:
        raise _too_large(path, len(encoded), limit, grew=True)
    return encoded


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
    limit = max_image_file_bytes()
    read = 0
    with _open_file(ref.path) as stream:
        # the size was checked on opening; counting again catches a file that grows while it is read
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            read += len(chunk)
            if read > limit:
                raise _too_large(ref.path, read, limit, grew=True)
            digest.update(chunk)
    return digest.hexdigest()


def max_image_file_bytes() -> int:
    """The largest image file :func:`load_image` and :func:`image_content_hash` read, in bytes:
    ``$CAPVQA_MAX_IMAGE_BYTES`` when set, else :data:`DEFAULT_MAX_IMAGE_FILE_BYTES`."""
    raw = os.environ.get(MAX_IMAGE_FILE_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_FILE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"{MAX_IMAGE_FILE_BYTES_ENV}={raw!r} is not a positive whole number of bytes; set it to e.g. "
            f"{DEFAULT_MAX_IMAGE_FILE_BYTES} (256 MiB, the default) or unset it."
        )
    return value


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
    """Open ``path`` for reading if it is (or links to) a regular file within the size limit.

    The type and size are checked with ``stat`` before opening, so a FIFO (whose open would block until
    a writer appears) or a device is never opened. The open itself is non-blocking and its result is
    checked again with ``fstat``: a path swapped for a FIFO between the two calls still cannot hang.
    """
    _check_image_file(path, _stat(path, os.stat, path))
    non_blocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; elsewhere the stat check above is the guard
    try:
        descriptor = os.open(path, os.O_RDONLY | non_blocking | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise _unreadable(path, error) from None
    try:
        _check_image_file(path, _stat(path, os.fstat, descriptor))
        if non_blocking:
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _stat(path: Path, stat_call: Callable[[Any], os.stat_result], target: Any) -> os.stat_result:
    try:
        return stat_call(target)
    except OSError as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: OSError) -> DataError:
    if isinstance(error, FileNotFoundError):
        return DataError(
            f"Image file not found: {path}. Check the dataset's image folder (was the image zip "
            "downloaded and extracted there?) or the image file-name pattern."
        )
    if isinstance(error, IsADirectoryError):
        return DataError(f"Expected an image file but found a folder: {path}.")
    if isinstance(error, PermissionError):
        return DataError(f"Image file is not readable (permission denied): {path}.")
    return DataError(f"Image file cannot be opened: {path} ({error.strerror or error}).")


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_image_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
        if kind == "a folder":
            raise DataError(f"Expected an image file but found a folder: {path}.")
        target = os.path.realpath(path)
        via = f" (it links to {target})" if target != os.path.abspath(path) else ""
        raise DataError(
            f"Image {path} is {kind}{via}, not a regular file; it is not read (it could block or never "
            "end). Replace it with the image file."
        )
    limit = max_image_file_bytes()
    if info.st_size > limit:
        raise _too_large(path, info.st_size, limit, grew=False)


def _too_large(path: Path, size: int, limit: int, *, grew: bool) -> DataError:
    what = "grew past" if grew else f"is {size:,} bytes, over"
    return DataError(
        f"Image file {path} {what} the limit of {limit:,} bytes; it is not read. If the image is "
        f"genuine, raise the limit with {MAX_IMAGE_FILE_BYTES_ENV}=BYTES."
    )


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
            images.append(load_image(entry.item.image, expected_sha256=entry.content_sha256))
        positions.append(index_of[entry.image_hash])
    return images, positions
