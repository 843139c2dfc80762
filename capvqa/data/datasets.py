"""``open_dataset``: the one way every command gets its questions.

Spec forms (a string, as typed on a command line):

=====================  ================================================================================
``sample``             the bundled VQAv2-format sample (``data/sample/``), no download needed
``vqav2``              official VQAv2 files under ``data_root``; splits val2014 (default), train2014,
                       test2015, test-dev2015
``okvqa``              official OK-VQA v1.1 files under ``data_root``; splits val2014 (default), train2014
``hf:<name or path>``  a Hugging Face dataset in the lmms-lab/VQAv2 or lmms-lab/OK-VQA schema: a hub name,
                       a ``save_to_disk`` folder or parquet file(s); default split validation / val2014
``<folder>``           a folder laid out like ``data/sample/`` (see :mod:`capvqa.data.folder`)
=====================  ================================================================================

The layout under ``data_root`` is the contract with ``capvqa data download`` (which writes it)::

    {root}/vqav2/v2_OpenEnded_mscoco_{split}_questions.json
    {root}/vqav2/v2_mscoco_{split}_annotations.json          (not for test2015 / test-dev2015)
    {root}/okvqa/OpenEnded_mscoco_{split}_questions.json
    {root}/okvqa/mscoco_{split}_annotations.json
    {root}/coco/{image_split}/COCO_{image_split}_{image_id:012d}.jpg

``image_split`` is the question split, except that test-dev2015 questions are about test2015 images.
:func:`vqav2_layout` and :func:`okvqa_layout` compute these paths; the downloader should use them too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from capvqa.data.folder import is_dataset_folder, load_folder
from capvqa.data.huggingface import load_huggingface
from capvqa.data.items import VQAItem
from capvqa.data.official import DEFAULT_IMAGE_NAME, ItemId, load_official
from capvqa.errors import DataError
from capvqa.resources import sample_dir

VQAV2_SPLITS = ("val2014", "train2014", "test2015", "test-dev2015")
OKVQA_SPLITS = ("val2014", "train2014")
DEFAULT_OFFICIAL_SPLIT = "val2014"
HF_PREFIX = "hf:"

VALID_SPECS = (
    "'sample' (the bundled sample)",
    "'vqav2' or 'okvqa' (official files under --data-root, as `capvqa data download` writes them)",
    "'hf:<hub name or local path>' (e.g. hf:lmms-lab/VQAv2, a save_to_disk folder or parquet files)",
    "a path to a folder with questions.json, optional annotations.json and images/ (like data/sample)",
)


class ItemSource(Protocol):
    """What a loader hands to :class:`Dataset`: a sized, re-iterable stream of items."""

    @property
    def has_annotations(self) -> bool: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[VQAItem]: ...


class Dataset:
    """A named split of questions, re-iterable.

    Each ``iter()`` streams fresh :class:`VQAItem` s whose images are references (paths or encoded
    bytes), so the engine can walk the dataset once per stage without holding pixels.
    """

    def __init__(
        self, name: str, split: str | None, source: ItemSource, *, spec: str | None = None,
        data_root: Path | None = None, limit: int | None = None, question_ids: Sequence[ItemId] | None = None,
    ) -> None:
        self.name = name
        self.split = split
        # what open_dataset was given, so a run can record how to open exactly this selection again
        self.spec = spec if spec is not None else name
        self.data_root = data_root
        self.limit = limit
        self.question_ids = tuple(question_ids) if question_ids is not None else None
        self._source = source

    @property
    def has_annotations(self) -> bool:
        """Whether items carry human answers (false for test splits): decides if accuracy can be scored."""
        return self._source.has_annotations

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self) -> Iterator[VQAItem]:
        return iter(self._source)

    def content_fingerprint(self) -> str:
        """One hash of the split's questions and answers, in order, without reading any image.

        A source with embedded images (Hugging Face) hands over its rows minus the image column
        (``text_records``); the others yield items whose images are only paths.
        """
        digest = hashlib.sha256()
        text_records = getattr(self._source, "text_records", None)
        records = text_records() if callable(text_records) else (
            [str(item.question_id), str(item.image_id), item.question, list(item.answers)] for item in self)
        for record in records:
            digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, items={len(self)}, "
            f"has_annotations={self.has_annotations})"
        )


@dataclass(frozen=True)
class OfficialLayout:
    """Where one official split's files live under a data root."""

    dataset: str
    split: str
    questions: Path
    annotations: Path | None
    image_dir: Path
    image_split: str


def vqav2_layout(root: Path, split: str) -> OfficialLayout:
    """VQAv2 file paths for ``split`` under ``root`` (pure; see the module docstring)."""
    _check_split("vqav2", split, VQAV2_SPLITS)
    root = Path(root)
    image_split = "test2015" if split.startswith("test") else split
    return OfficialLayout(
        dataset="vqav2",
        split=split,
        questions=root / "vqav2" / f"v2_OpenEnded_mscoco_{split}_questions.json",
        annotations=None
        if split.startswith("test")
        else root / "vqav2" / f"v2_mscoco_{split}_annotations.json",
        image_dir=root / "coco" / image_split,
        image_split=image_split,
    )


def okvqa_layout(root: Path, split: str) -> OfficialLayout:
    """OK-VQA file paths for ``split`` under ``root`` (pure; see the module docstring)."""
    _check_split("okvqa", split, OKVQA_SPLITS)
    root = Path(root)
    return OfficialLayout(
        dataset="okvqa",
        split=split,
        questions=root / "okvqa" / f"OpenEnded_mscoco_{split}_questions.json",
        annotations=root / "okvqa" / f"mscoco_{split}_annotations.json",
        image_dir=root / "coco" / split,
        image_split=split,
    )


def download_command(dataset: str, split: str, root: Path) -> str:
    """The ``capvqa data download`` command that fetches ``dataset``'s ``split`` into ``root``.

    Question/annotation targets hold every split of a dataset; COCO images have one target per split
    (``dataset='coco'``).
    """
    target = f"coco-{split}" if dataset == "coco" else dataset
    return f"capvqa data download {target} --root {root}"


def open_dataset(
    spec: str,
    *,
    split: str | None = None,
    data_root: Path | None = None,
    limit: int | None = None,
    question_ids: Sequence[ItemId] | None = None,
) -> Dataset:
    """Open the dataset named by ``spec`` (forms in the module docstring).

    ``limit`` keeps the first N questions (after ``question_ids``, which selects an explicit subset;
    an unknown id is an error). Ids may be given as strings or ints.
    """
    spec = spec.strip()
    if spec == "sample":
        source = load_folder(sample_dir(), split=split, limit=limit, question_ids=question_ids)
        return Dataset("sample", source.split, source, limit=limit, question_ids=question_ids)
    if spec in ("vqav2", "okvqa"):
        return _open_official(spec, split=split, data_root=data_root, limit=limit, question_ids=question_ids)
    if spec.startswith(HF_PREFIX):
        target = spec[len(HF_PREFIX) :].strip()
        if not target:
            raise DataError(f"Dataset spec {spec!r} names no dataset; e.g. hf:lmms-lab/VQAv2.")
        hf_source = load_huggingface(target, split=split, limit=limit, question_ids=question_ids)
        return Dataset(spec, hf_source.split, hf_source, limit=limit, question_ids=question_ids)
    path = Path(spec).expanduser()
    if path.is_dir() and is_dataset_folder(path):
        source = load_folder(path, split=split, limit=limit, question_ids=question_ids)
        return Dataset(path.resolve().name, source.split, source, spec=str(path.resolve()), limit=limit,
                       question_ids=question_ids)
    reason = (
        f"the folder {path} has no questions.json"
        if path.is_dir()
        else f"{path} is not a folder"
        if path.exists()
        else "it is neither a known name nor an existing folder"
    )
    raise DataError(f"Unknown dataset {spec!r}: {reason}. Valid forms: " + "; ".join(VALID_SPECS) + ".")


def _open_official(
    dataset: str,
    *,
    split: str | None,
    data_root: Path | None,
    limit: int | None,
    question_ids: Sequence[ItemId] | None,
) -> Dataset:
    split = split or DEFAULT_OFFICIAL_SPLIT
    if data_root is None:
        raise DataError(
            f"The {dataset} dataset needs a data root: the folder that `capvqa data download "
            f"{dataset} --root ...` downloaded into (pass --data-root)."
        )
    layout = vqav2_layout(data_root, split) if dataset == "vqav2" else okvqa_layout(data_root, split)
    _check_present(layout, Path(data_root))
    source = load_official(
        layout.questions,
        image_dir=layout.image_dir,
        annotations_path=layout.annotations,
        split=layout.image_split,
        image_name=DEFAULT_IMAGE_NAME,
        limit=limit,
        question_ids=question_ids,
    )
    return Dataset(dataset, split, source, data_root=Path(data_root), limit=limit, question_ids=question_ids)


def _check_present(layout: OfficialLayout, root: Path) -> None:
    """Name the first missing file or folder and the download command that provides it."""
    for path in (layout.questions, layout.annotations):
        if path is not None and not path.is_file():
            raise DataError(
                f"{layout.dataset} {layout.split}: missing {path}. Fetch it with: "
                f"{download_command(layout.dataset, layout.split, root)}"
            )
    if not layout.image_dir.is_dir():
        raise DataError(
            f"{layout.dataset} {layout.split}: missing the COCO image folder {layout.image_dir}. Fetch it "
            f"with: {download_command('coco', layout.image_split, root)}"
        )


def _check_split(dataset: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise DataError(f"{dataset} has no split {split!r}; valid splits: {', '.join(valid)}.")
