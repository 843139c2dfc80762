"""A self-contained dataset folder, laid out like the bundled ``data/sample/``.

Layout::

    my_dataset/
        questions.json      official VQAv2 questions format (see capvqa.data.official); its top-level
                            "data_subtype" (e.g. "val2014") is the folder's split
        annotations.json    optional, official annotations format; without it items have no answers
        images/
            COCO_{data_subtype}_{image_id:012d}.jpg    e.g. COCO_val2014_000000000001.jpg
            {image_id}.jpg or {image_id}.png           accepted when the COCO name is absent

This is the way to bring your own photos and questions: write the two JSON files in the official format
(so the same files also work with the official evaluation script) and drop the images in ``images/``.
Loading reuses :mod:`capvqa.data.official`, so the checks and error messages are the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from capvqa.data.official import (
    ImagePathFn,
    ItemId,
    OfficialSource,
    load_official,
    normalize_id,
)
from capvqa.errors import DataError

QUESTIONS_FILE = "questions.json"
ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"
FALLBACK_SUFFIXES = (".jpg", ".png")


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` looks like a dataset folder (it has a ``questions.json``)."""
    return (Path(path) / QUESTIONS_FILE).is_file()


def load_folder(
    folder: Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    question_ids: Iterable[ItemId] | None = None,
) -> OfficialSource:
    """Load a dataset folder (layout in the module docstring).

    A folder holds exactly one split, named by its questions file's ``data_subtype``; ``split`` may be
    given only to assert which one (or to name the split when the file has no ``data_subtype``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Dataset folder not found: {folder}")
    questions_path = folder / QUESTIONS_FILE
    if not questions_path.is_file():
        raise DataError(
            f"{folder} is not a dataset folder: it has no {QUESTIONS_FILE}. Expected {QUESTIONS_FILE}, "
            f"optional {ANNOTATIONS_FILE} and {IMAGES_DIR}/ (see data/sample/README.md)."
        )
    annotations_path = folder / ANNOTATIONS_FILE
    image_dir = folder / IMAGES_DIR
    source = load_official(
        questions_path,
        image_dir=image_dir,
        annotations_path=annotations_path if annotations_path.is_file() else None,
        image_paths=lambda data_subtype: folder_image_paths(image_dir, data_subtype),
        limit=limit,
        question_ids=question_ids,
    )
    if split is not None and source.split is not None and split != source.split:
        raise DataError(
            f"{folder} holds the split {source.split!r} (the data_subtype of its {QUESTIONS_FILE}), not "
            f"{split!r}; leave the split unset for a dataset folder."
        )
    if source.split is None:
        source.split = split
    return source


def folder_image_paths(image_dir: Path, data_subtype: str | None) -> ImagePathFn:
    """COCO name first, then ``{image_id}.jpg`` / ``.png``; when none exists, the first candidate.

    Returning a path that does not exist (rather than failing here) keeps the failure where the image
    is loaded, with the missing file's name in the message.
    """

    def image_path(image_id: ItemId) -> Path:
        candidates = _candidate_names(image_id, data_subtype)
        for name in candidates:
            path = image_dir / name
            if path.is_file():
                return path
        return image_dir / candidates[0]

    return image_path


def _candidate_names(image_id: ItemId, data_subtype: str | None) -> list[str]:
    names = []
    value = normalize_id(image_id)
    if data_subtype is not None and isinstance(value, int):
        names.append(f"COCO_{data_subtype}_{value:012d}.jpg")
    names.extend(f"{image_id}{suffix}" for suffix in FALLBACK_SUFFIXES)
    return names
