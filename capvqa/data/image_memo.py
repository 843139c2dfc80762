"""Per-image values a stage computes once for all of an image's questions, not once per batch
(docs/methods.md#shared-deviations).

A VQAv2 image has about 5.4 questions. The engine batches an image's questions side by side
(:func:`capvqa.engine.runner.batch_order`), but when they straddle a batch boundary the next batch would
decode and encode the image again. A stage keeps the last few images' values here, by image content
hash, and computes (and decodes) only the images it has not seen recently: the encoder then runs about
once per image of the run at any batch size.

The memo is least-recently-used with a fixed number of images, so memory stays flat on a dataset of
any size; an image evicted before its last question comes up (its questions far apart in the run) is
computed again, which only costs time. Values are kept by the hash of the image bytes the engine keyed
the item with (``StageInput.content_sha256``); inputs made by hand without one (a stage used alone, whose
``image_hash`` is any label) share values within a batch only, as before, so a label reused for another
picture in a later call never gets the earlier picture's value. A value is whatever the stage
derives from the image alone (an encoder's output row, a caption, CLIP tags); it must not depend on the
question, or the memo would hand one question's value to another.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from capvqa.data.images import load_image

if TYPE_CHECKING:
    from capvqa.engine.stage import StageInput

Value = TypeVar("Value")

# Enough for an image whose questions straddle a few batches; a BLIP ViT-L/16 output at 384 px is
# 2.4 MB in float32 (1.2 MB in half precision), so 77 MB at most.
MEMO_IMAGES = 32


class ImageMemo(Generic[Value]):
    """The values of the most recently used images, by image content hash."""

    def __init__(self, capacity: int = MEMO_IMAGES) -> None:
        if capacity < 1:
            raise ValueError(f"an image memo holds at least one image, not {capacity}")
        self.capacity = capacity
        self.computed = 0  # images whose value was computed (not found), since construction
        self._values: OrderedDict[str, Value] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def values(
        self, batch: Sequence[StageInput], compute: Callable[[list[Any]], Sequence[Value]]
    ) -> tuple[list[Value], list[int]]:
        """One value per distinct image of ``batch`` (in order of first appearance) and, for each input,
        the index of its image -- the shape :func:`capvqa.data.images.distinct_images` gives.

        ``compute`` maps decoded images to one value each, in order; it is called once per batch, only
        with the images not in the memo (and not at all when every image is there). A value kept for later
        batches should not share memory with other images' values: copy a row out of a batched tensor,
        or the row keeps the whole batch's output alive.
        """
        index_of: dict[str, int] = {}
        first_entry: list[StageInput] = []
        positions: list[int] = []
        for entry in batch:
            if entry.image_hash not in index_of:
                index_of[entry.image_hash] = len(first_entry)
                first_entry.append(entry)
            positions.append(index_of[entry.image_hash])
        found: list[Any] = [self._values.get(entry.content_sha256) if entry.content_sha256 else None
                            for entry in first_entry]
        missing = [i for i, entry in enumerate(first_entry)
                   if not entry.content_sha256 or entry.content_sha256 not in self._values]
        if missing:
            images = [load_image(first_entry[i].item.image, expected_sha256=first_entry[i].content_sha256)
                      for i in missing]
            computed = list(compute(images))
            if len(computed) != len(missing):
                raise RuntimeError(f"computed {len(computed)} values for {len(missing)} images")
            self.computed += len(missing)
            for i, value in zip(missing, computed):
                found[i] = value
        for entry, value in zip(first_entry, found):
            if entry.content_sha256:  # engine-made input: the key is the image's content
                self._values[entry.content_sha256] = value
                self._values.move_to_end(entry.content_sha256)
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)
        return found, positions

    def clear(self) -> None:
        """Drop the values (a stage's cleanup frees its device memory); the count stays."""
        self._values.clear()


def memo_encoded_images(
    memo: ImageMemo[torch.Tensor], batch: Sequence[StageInput], encode: Callable[[list[Any]], torch.Tensor]
) -> tuple[torch.Tensor, list[int]]:
    """An encoder's output (N, ...) for the N distinct images of ``batch`` and each input's image index,
    encoding only the images ``memo`` lacks (``encode`` maps decoded images to a batched tensor)."""
    rows, positions = memo.values(batch, lambda images: [row.clone() for row in encode(images)])
    return torch.stack(rows), positions
