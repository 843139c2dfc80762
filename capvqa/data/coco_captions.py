"""COCO caption annotations (``captions_train2014.json`` and its kind): image id -> human captions.

PICa writes each in-context example's context as a ground-truth COCO caption of the example's image
(docs/methods.md#example-selection). The file format::

    {"annotations": [{"image_id": 318556, "id": 48, "caption": "A very clean and well decorated ..."}, ...],
     "images": [...], "info": ..., "licenses": ...}

Only ``annotations`` is read. Captions keep the file's annotation order per image, so "the first caption
of an image" is well defined and reproducible (the original PICa code picks one of the five at random
on every prompt, which makes its prompts unrepeatable). A bare list of annotation objects is accepted
too, as the original code does.

Each caption is kept exactly as the file has it, stray spaces and line breaks included: the original
code puts it into the prompt as it is, and the prompt is what the LLM answers (a double space or a
trailing newline changes its tokens). Only a caption that is empty or all whitespace is skipped, so an
image whose first annotation is blank still gets a real caption.

Split of work: :func:`load_coco_captions` is the only I/O; :func:`parse_coco_captions` is pure and names
the file, the annotation index and the field for every problem a user can have.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capvqa.data.official import ItemId, normalize_id, read_json
from capvqa.errors import DataError


def load_coco_captions(path: Path | str) -> dict[ItemId, list[str]]:
    """Read a COCO captions file into ``{image_id: [caption, ...]}`` in annotation order.

    Image ids are normalised like question files' ids (numeric strings become ints), so the captions of
    image ``"9"`` are found for an item whose ``image_id`` is ``9``.
    """
    path = Path(path).expanduser()
    document = read_json(path, what="COCO captions file")
    return parse_coco_captions(document, source=str(path))


def parse_coco_captions(document: Any, *, source: str) -> dict[ItemId, list[str]]:
    """Validate a parsed COCO captions document (pure); see the module docstring for the format."""
    if isinstance(document, Mapping):
        if "annotations" not in document:
            raise DataError(
                f"{source}: missing top-level field 'annotations' (expected a COCO captions file such as "
                f"captions_train2014.json; top-level fields found: {sorted(document)[:10]})"
            )
        entries = document["annotations"]
    else:
        entries = document
    if not isinstance(entries, list):
        raise DataError(f"{source}: 'annotations' must be a list, got {type(entries).__name__}")
    captions: dict[ItemId, list[str]] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: annotations[{index}]"
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: each annotation must be an object, got {type(entry).__name__}")
        if "image_id" not in entry:
            raise DataError(f"{where}: missing field 'image_id'")
        image_id = entry["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or image_id == "":
            raise DataError(
                f"{where}: field 'image_id' must be an integer or non-empty string, got {image_id!r}"
            )
        if "caption" not in entry:
            raise DataError(f"{where} (image_id {image_id!r}): missing field 'caption'")
        caption = entry["caption"]
        if not isinstance(caption, str):
            raise DataError(
                f"{where} (image_id {image_id!r}): field 'caption' must be a string, got {caption!r}"
            )
        if caption.strip():  # raw text: the prompt carries it as the reference's does (module docstring)
            captions.setdefault(normalize_id(image_id), []).append(caption)
    if not captions:
        raise DataError(f"{source}: the file holds no non-empty captions")
    return captions


def first_caption(captions: Mapping[ItemId, list[str]], image_id: ItemId) -> str | None:
    """The image's first caption in annotation order, or None when the file has none for it."""
    found = captions.get(normalize_id(image_id))
    return found[0] if found else None
