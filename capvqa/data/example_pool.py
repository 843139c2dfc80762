"""PICa's pool of in-context examples: training questions with an answer, a caption and CLIP embeddings.

PICa (SPEC §3) picks its few-shot examples from the training split by CLIP similarity to the query. The
pool is dataset-level state, not per-item state, so it does not fit the per-item stage cache; it is built
here once per (pool, CLIP model) and kept on disk:

- **Embeddings** are stored per *distinct* question text and per *distinct* image (VQAv2 train has 443k
  questions but 82k images and far fewer distinct question strings), each array under
  ``{cache_dir}/example-pools/`` as a raw ``.npy`` file (never a pickle), written to a temporary file and
  renamed into place so a crash never leaves a half-written array. The file name is a hash of exactly
  what the array depends on: the list of texts (or image content hashes) in order, the CLIP model
  fingerprint and :data:`POOL_CACHE_VERSION`. Content hashing rather than question ids means a moved or
  re-downloaded dataset keeps its arrays, and an edited one never reuses stale rows.
- **Captions** come from a COCO captions file (the image's first caption, see
  :mod:`capvqa.data.coco_captions`) or, for images it lacks, from the
  :class:`~capvqa.stages.image_captioning.ImageCaptioning` stage run through the ordinary
  :class:`~capvqa.engine.runner.PipelineRunner` and stage cache, so pool captions are computed once and
  shared with any pipeline that captions the same images with the same settings.

CLIP features come from :class:`capvqa.models.clip_encoder.ClipEncoder`, shared with the tags stage.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capvqa.atomic import atomic_open
from capvqa.data.items import ImageRef, VQAItem
from capvqa.data.official import ItemId
from capvqa.engine.keys import canonical_json, sha256_hex
from capvqa.engine.runtime import Runtime
from capvqa.errors import DataError

log = logging.getLogger(__name__)

#: Bump when the way pool embeddings are computed changes (preprocessing, normalisation, dtype).
POOL_CACHE_VERSION = 1
POOL_CACHE_SUBDIR = "example-pools"


# ----------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PoolEntry:
    """One training question usable as an in-context example."""

    question_id: ItemId
    image_id: ItemId
    question: str
    answer: str  # the first annotated answer, as PICa uses
    image_hash: str
    image: ImageRef


@dataclass(frozen=True)
class PoolReport:
    """How the pool was assembled (logged once, and checked by tests)."""

    items: int  # pool questions kept
    skipped: int  # questions without a question text or an answer (PICa re-draws those)
    captions_from_file: int
    captions_generated: int  # items whose caption came from the captioner (cached or computed)
    question_embeddings: str  # "computed", "cached" or "unused"
    image_embeddings: str


# ------------------------------------------------------------------------------------ pure helpers


def first_answer(item: VQAItem) -> str | None:
    """An item's first annotated answer (stripped), or None when it has no non-empty first answer."""
    if not item.answers:
        return None
    answer = item.answers[0].strip()
    return answer or None


def distinct_in_order(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct values in first-appearance order and, per value, the row of its distinct copy."""
    row_of: dict[str, int] = {}
    index = np.empty(len(values), dtype=np.int64)
    for position, value in enumerate(values):
        index[position] = row_of.setdefault(value, len(row_of))
    return list(row_of), index


def embedding_cache_key(kind: str, model_fingerprint: str, values: Sequence[str]) -> str:
    """The identity of an embedding array: what was embedded (in order), by which model, by which code."""
    content = hashlib.sha256()
    for value in values:
        content.update(value.encode("utf-8"))
        content.update(b"\0")
    return sha256_hex(
        canonical_json(
            {
                "version": POOL_CACHE_VERSION,
                "kind": kind,
                "model": model_fingerprint,
                "count": len(values),
                "content": content.hexdigest(),
            }
        )
    )


# ------------------------------------------------------------------------------------ array cache


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` to a temporary file next to ``path``, then rename it into place.

    A reader sees the whole file or no file; on error the temporary file is removed.
    """
    with atomic_open(path, "wb") as stream:
        np.save(stream, np.ascontiguousarray(array), allow_pickle=False)

def cached_array(
    directory: Path, key: str, rows: int, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, bool]:
    """The ``rows``-row array stored under ``key`` in ``directory``, computing and storing it on a miss.

    Returns ``(array, was_cached)``. An unreadable file (e.g. from a full disk) or one with the wrong
    number of rows is recomputed and replaced.
    """
    path = Path(directory) / f"{key}.npy"
    if path.is_file():
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable pool array %s (%s); recomputing it", path, error)
        else:
            if array.ndim == 2 and array.shape[0] == rows:
                return array, True
            log.warning(
                "ignoring pool array %s of shape %s (expected %d rows); recomputing it",
                path,
                array.shape,
                rows,
            )
    array = np.asarray(compute(), dtype=np.float32)
    save_array_atomic(path, array)
    return array, False


# ----------------------------------------------------------------------------------- pool assembly


def pool_content_fingerprint(pool: Any, captions_file: str | Path | None = None) -> str:
    """What a selection depends on in the pool itself, as one hash: the pool split's questions and answers
    (``Dataset.content_fingerprint``) and the bytes of the COCO captions file when one is used.

    It enters the selection stage's cache key, so a pool whose annotations or captions file were edited in
    place recomputes the selections instead of serving stale ones. Images are named by their ids here: an
    image re-encoded in place is not seen.
    """
    digest = hashlib.sha256(pool.content_fingerprint().encode())
    if captions_file is not None:
        path = Path(captions_file).expanduser()
        digest.update(b"captions:")
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            raise DataError(
                f"COCO captions file for the example pool not found or unreadable: {path} ({error.strerror}). "
                "Point examples.pool_captions at captions_train2014.json, or leave it unset to caption the "
                "pool images with the pool captioner."
            ) from error
    return digest.hexdigest()


def read_pool_entries(
    items: Iterable[VQAItem], image_hash: Callable[[VQAItem], str]
) -> tuple[list[PoolEntry], int]:
    """Pool entries for every item with a question and a first answer; returns (entries, skipped).

    The original code re-draws a random training example when one lacks a question or answer; leaving
    such items out of the pool is the deterministic equivalent.
    """
    entries: list[PoolEntry] = []
    skipped = 0
    for item in items:
        answer = first_answer(item)
        question = item.question.strip()
        if answer is None or not question:
            skipped += 1
            continue
        entries.append(
            PoolEntry(
                question_id=item.question_id,
                image_id=item.image_id,
                question=item.question,
                answer=answer,
                image_hash=image_hash(item),
                image=item.image,
            )
        )
    return entries, skipped


def generate_captions(
    entries: Sequence[PoolEntry],
    *,
    model: str,
    revision: str | None,
    batch_size: int,
    runtime: Runtime,
    store: Any,
) -> dict[str, str]:
    """``{image_hash: caption}`` for the entries' images, from the ImageCaptioning stage and its cache.

    One representative question per distinct image is run (the caption ignores the question), so a
    VQAv2-sized pool is captioned once per image, not once per question.
    """
    from capvqa.engine.runner import BoundStage, PipelineRunner
    from capvqa.stages.image_captioning import ImageCaptioning

    representatives: dict[str, VQAItem] = {}
    for entry in entries:
        if entry.image_hash not in representatives:
            representatives[entry.image_hash] = VQAItem(
                question_id=entry.question_id,
                image_id=entry.image_id,
                question=entry.question,
                image=entry.image,
            )
    if not representatives:
        return {}
    stage = ImageCaptioning(model=model, revision=revision, batch_size=batch_size)
    bound = BoundStage.create("pool_captioning", stage, {})
    runner = PipelineRunner([bound], store, runtime)
    items = list(representatives.values())
    runner.run_stage(bound, items, total=len(items))
    image_hash_of = {str(item.question_id): image_hash for image_hash, item in representatives.items()}
    # the runner's default bad-image policy raises, so every representative has a result
    return {
        image_hash_of[str(item.question_id)]: outputs["pool_captioning"].caption
        for item, outputs in runner.results(items)
        if outputs is not None
    }
