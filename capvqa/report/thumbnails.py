"""Gallery thumbnails and the question-guided relevance heatmap, as small embedded images.

The heatmap is a separate RGBA PNG at the relevance grid's own resolution (24x24 for BLIP ViT-L): the
browser stretches it over the thumbnail with smooth scaling, so it costs ~1 kB per item and can be
toggled off to see the photo. Stretching over the whole thumbnail is correct because BLIP resizes the
full image to a square without cropping, so patch (r, c) covers the same fraction of the photo.

Images are resolved through the dataset named in the run's config; when it is not available where the
report is built (another machine, no data root) the gallery simply has no thumbnails.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 224
JPEG_QUALITY = 72

# jet-like colour ramp (blue -> cyan -> yellow -> red), the usual look of GradCAM maps
_RAMP = np.array([[0, 0, 160], [0, 90, 255], [0, 230, 255], [255, 240, 0], [255, 80, 0], [180, 0, 0]],
                 dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB via the ramp above (linear between its anchors)."""
    positions = np.linspace(0.0, 1.0, len(_RAMP))
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, positions, _RAMP[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def relevance_grid(relevance: Sequence[float] | None, grid: Sequence[int] | None) -> np.ndarray | None:
    """The relevance list reshaped to its (rows, cols) grid and min-max scaled to [0, 1] for display
    (the stage keeps raw GradCAM values, which are often ~1e-8); None when the shapes disagree."""
    if not relevance or not grid or len(grid) != 2:
        return None
    rows, cols = int(grid[0]), int(grid[1])
    values = np.asarray(relevance, dtype=np.float64)
    if rows <= 0 or cols <= 0 or values.size != rows * cols or not np.all(np.isfinite(values)):
        return None
    values = values.reshape(rows, cols)
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def heatmap_png(relevance: Sequence[float] | None, grid: Sequence[int] | None) -> bytes | None:
    """RGBA PNG of the relevance map: colour by value, low relevance nearly transparent."""
    scaled = relevance_grid(relevance, grid)
    if scaled is None:
        return None
    from PIL import Image

    rgba = np.empty(scaled.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = colormap(scaled)
    rgba[..., 3] = (30 + 190 * scaled).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def thumbnail_jpeg(image: Any, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """A small JPEG of a PIL image (aspect kept)."""
    copy = image.convert("RGB")
    copy.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def load_thumbnails(
    run_settings: dict[str, Any], question_ids: Sequence[Any], max_side: int = THUMBNAIL_SIDE
) -> tuple[dict[str, bytes], str]:
    """JPEG thumbnails keyed by ``str(question_id)`` for the gallery items, resolved through the run's
    dataset; returns ({}, reason) when the dataset or an image cannot be opened (never raises)."""
    dataset = run_settings.get("dataset")
    if not dataset:
        return {}, "the run's config names no dataset"
    if not question_ids:
        return {}, ""
    try:
        from capvqa.data.datasets import open_dataset
        from capvqa.data.images import load_image
        from capvqa.errors import DataError

        root = run_settings.get("data_root")
        options = {"split": run_settings.get("split"), "data_root": Path(root) if root else None}
        try:
            items: Any = open_dataset(str(dataset), question_ids=list(question_ids), **options)
        except DataError:
            # some ids are not in the dataset (records edited, or ids of another split): walk the
            # dataset (image references only, no pixels) and keep the ids it has
            wanted = {str(q) for q in question_ids}
            items = (item for item in open_dataset(str(dataset), **options) if str(item.question_id) in wanted)
        by_image: dict[str, bytes] = {}
        out: dict[str, bytes] = {}
        failures = 0
        for item in items:
            image_key = str(item.image_id)
            if image_key not in by_image:
                try:
                    by_image[image_key] = thumbnail_jpeg(load_image(item.image), max_side)
                except Exception as error:  # noqa: BLE001 - one unreadable image must not cost the gallery
                    logger.debug("thumbnail for %s failed: %s", image_key, error)
                    failures += 1
                    continue
            out[str(item.question_id)] = by_image[image_key]
        note = f"{failures} image(s) could not be read" if failures else ""
        return out, note
    except Exception as error:  # noqa: BLE001 - no dataset here: a gallery without images
        return {}, f"images not available ({type(error).__name__}: {error})"
