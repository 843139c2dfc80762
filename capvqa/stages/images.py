"""Shared image handling for stages: decode each distinct image of a batch once."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from capvqa.engine.stage import StageInput


def distinct_images(batch: Sequence[StageInput]) -> tuple[list[Image.Image], list[int]]:
    """Decoded images, one per distinct image hash, and for each input the index of its image.

    Several questions often share an image (VQAv2 has ~5 per image); encoding it once per model is the
    cheapest way to batch them.
    """
    from capvqa.data.images import load_image

    index_of: dict[str, int] = {}
    images: list[Image.Image] = []
    positions: list[int] = []
    for entry in batch:
        if entry.image_hash not in index_of:
            index_of[entry.image_hash] = len(images)
            images.append(load_image(entry.item.image))
        positions.append(index_of[entry.image_hash])
    return images, positions
