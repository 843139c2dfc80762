"""PICa's pool of in-context examples: training questions with an answer, a caption and CLIP embeddings.

PICa (docs/methods.md#example-selection) picks its few-shot examples from the training split by CLIP
similarity to the query. The pool is dataset-level state, not per-item state, so it does not fit the
per-item stage cache; it is built here once per (pool, CLIP model) and kept on disk:

- **Embeddings** are stored per *distinct* question text and per *distinct* image (VQAv2 train has 443k
  questions but 82k images and far fewer distinct question strings), each array under
  ``{cache_dir}/example-pools/`` as a raw ``.npy`` file (never a pickle), written to a temporary file and
  renamed into place so a crash never leaves a half-written array. The file name is a hash of exactly
  what the array depends on: the list of texts (or image content hashes) in order, the CLIP model
  fingerprint and :data:`POOL_CACHE_VERSION`. Content hashing rather than question ids means a moved or
  re-downloaded dataset keeps its arrays, and an edited one never reuses stale rows.
- **Captions** come from a COCO captions file (the image's first caption, see
  :mod:`capvqa.data.coco_captions`) or, for images it lacks, from the pipeline's own caption stage
  (:class:`~capvqa.stages.image_captioning.ImageCaptioning` with exactly that stage's config and the run's
  dtype) run through the ordinary :class:`~capvqa.engine.runner.PipelineRunner` and stage cache: a pool
  image is captioned once, and its entry is the very one the caption stage reads for the same image and
  question.
- **The content fingerprint** (:func:`pool_content_fingerprint`, part of the selection's cache key) reads
  the pool's whole questions and answers. For pools read from files it is memoised under
  ``{cache_dir}/example-pools/`` by the files' identity (path, size, mtime, inode), so a fully cached
  rerun does not read the pool again; an edited file has a new identity and is read again
  (:func:`memoised_pool_fingerprint`).

CLIP features come from :class:`capvqa.models.clip_encoder.ClipEncoder`, shared with the tags stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capvqa.atomic import atomic_open
from capvqa.data.items import ImageRef, VQAItem
from capvqa.data.official import ItemId
from capvqa.engine.keys import canonical_json, sha256_hex
from capvqa.engine.runtime import Runtime
from capvqa.errors import DataError

if TYPE_CHECKING:
    from capvqa.stages.image_captioning import ImageCaptioningConfig

log = logging.getLogger(__name__)

#: Bump when the way pool embeddings are computed changes (preprocessing, normalisation, dtype).
POOL_CACHE_VERSION = 1
POOL_CACHE_SUBDIR = "example-pools"
#: Bump when :func:`pool_content_fingerprint` changes what it hashes (old memos are then never read).
POOL_FINGERPRINT_VERSION = 1


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


def pool_source_files(dataset: str, split: str | None, data_root: Path | None) -> list[Path] | None:
    """The files an ``open_dataset`` pool reads its questions and answers from, named without reading
    them: the questions and annotations files of ``sample``, a folder or an official split, every file of
    a local Hugging Face dataset. None when they cannot be named (a hub dataset, an official split without
    a data root, an unknown spec): the caller then reads the pool itself, which also raises the loader's
    clear error for a missing dataset.
    """
    from capvqa.data.datasets import HF_PREFIX, okvqa_layout, vqav2_layout
    from capvqa.data.folder import ANNOTATIONS_FILE, QUESTIONS_FILE, is_dataset_folder
    from capvqa.resources import sample_dir

    spec = dataset.strip()
    if spec in ("vqav2", "okvqa"):
        if data_root is None or split is None:
            return None
        try:
            layout = (vqav2_layout if spec == "vqav2" else okvqa_layout)(Path(data_root), split)
        except DataError:
            return None  # an unknown split: opening the pool names the valid ones
        return [path for path in (layout.questions, layout.annotations) if path is not None]
    if spec.startswith(HF_PREFIX):
        local = Path(spec[len(HF_PREFIX) :].strip()).expanduser()
        if local.is_file():
            return [local]
        if local.is_dir():
            return sorted(path for path in local.rglob("*") if path.is_file())
        return None  # a hub name: its files live in the Hugging Face cache, not named here
    folder = sample_dir() if spec == "sample" else Path(spec).expanduser()
    if not is_dataset_folder(folder):
        return None
    return [path for path in (folder / QUESTIONS_FILE, folder / ANNOTATIONS_FILE) if path.is_file()]


def file_identity(path: Path) -> list[Any]:
    """What says a file is unchanged without reading it: its resolved path and the image memo's file
    signature (device, inode, size, mtime, ctime: a file edited in place and given its old size and mtime
    back, as ``cp -p`` or ``rsync -t`` do, still has a new ctime)."""
    from capvqa.engine.store import file_signature

    return [str(path.resolve()), file_signature(path.stat())]


def memoised_pool_fingerprint(
    *,
    dataset: str,
    split: str | None,
    data_root: Path | None,
    limit: int | None,
    captions_file: str | Path | None,
    open_pool: Callable[[], Any],
    memo_dir: Path,
) -> str:
    """:func:`pool_content_fingerprint` of the pool ``open_pool()`` opens, memoised in ``memo_dir``.

    The memo is keyed by the identity (:func:`file_identity`) of every file the pool and the captions
    file are read from, and by what selects the pool's rows (dataset, split, limit). A fully cached rerun
    thus stats a few files instead of parsing the whole pool; a file edited or replaced has a new
    signature (its ctime changes on every write), and the pool is read again. The identities are taken
    before the pool is read, so a file changed meanwhile can only cause a miss later, never a stale hit.
    ``capvqa cache clear`` removes these memos with the rest of the cache. Pools whose files cannot be
    named (:func:`pool_source_files`) are read every time. A memo that cannot be written is only logged.
    """
    files = pool_source_files(dataset, split, data_root)
    if files is None:
        return pool_content_fingerprint(open_pool(), captions_file)
    if captions_file is not None:
        files = [*files, Path(captions_file).expanduser()]
    try:
        identities = [file_identity(path) for path in files]
    except OSError:
        return pool_content_fingerprint(open_pool(), captions_file)  # raises the clear error
    key = sha256_hex(
        canonical_json(
            {
                "version": POOL_FINGERPRINT_VERSION,
                "dataset": dataset.strip(),
                "split": split,
                "limit": limit,
                "captions": captions_file is not None,
                "files": identities,
            }
        )
    )
    memo = Path(memo_dir) / f"fingerprint-{key}.json"
    try:
        fingerprint = json.loads(memo.read_text(encoding="utf-8"))["fingerprint"]
        if isinstance(fingerprint, str) and len(fingerprint) == 64:
            return fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or an unreadable one: compute and (re)write it
    fingerprint = pool_content_fingerprint(open_pool(), captions_file)
    try:
        with atomic_open(memo, "w") as handle:
            json.dump({"fingerprint": fingerprint, "files": identities}, handle)
    except OSError as error:
        log.warning("could not memoise the example pool's fingerprint in %s (%s); it is read again next time",
                    memo, error)
    return fingerprint


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
    captioner: ImageCaptioningConfig,
    runtime: Runtime,
    store: Any,
) -> dict[str, str]:
    """``{image_hash: caption}`` for the entries' images, from the ImageCaptioning stage and its cache.

    ``captioner`` is the pipeline's caption stage config, and the stage is keyed with the run's dtype as
    the engine keys every stage (:meth:`~capvqa.engine.runner.BoundStage.create`), so a pool caption is
    the same cache entry as the caption stage's result for the same image and question, and fp32 and
    bf16 captions are never mixed. One representative question per distinct image is run (the caption
    ignores the question), so a VQAv2-sized pool is captioned once per image, not once per question.
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
    bound = BoundStage.create("pool_captioning", ImageCaptioning(captioner), {}, runtime.dtype_name)
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
