"""PICa in-context example selection: the training questions most similar to the query (SPEC §3).

PICa scores every training question by CLIP similarity to the query -- question to question plus image to
image (ViT-B/16, "question+image"), question alone ("question"), or not at all ("random") -- and fills
``n_ensemble`` prompts of ``n_shot`` examples from the ranks: prompt r gets ranks [r*n_shot, (r+1)*n_shot).
This stage returns the top ``n_shot * n_ensemble`` examples, ranked; :mod:`capvqa.stages.pica_prompt`
slices them into prompts.

Differences from the original code (``microsoft/PICa``, ``gpt3_api_okvqa.py``), on purpose:

- the query itself is never its own example: pool rows with the query's question id, or with the same
  image content and question text, are excluded (the original pools train2014 for val2014 queries, where
  this cannot happen; here the pool may be any dataset, including the query's own);
- ties are broken by pool order (lower row first), so "question" mode -- where thousands of VQAv2
  questions share one text and one score -- is reproducible;
- "random" mode draws without replacement from a generator seeded by (seed, item) (the original draws
  each shot independently from one global stream, with possible repeats, so its prompts depend on the
  order questions are processed);
- an example's caption is the *first* COCO caption of its image rather than a random one of the five;
- pool questions without a question text or a first answer are left out of the pool (the original
  re-draws a random one when it meets them).

The pool (captions, embeddings, disk cache) is assembled in :mod:`capvqa.data.example_pool`. Two
models enter this stage's cache key (``MODEL_FIELDS``): the CLIP model and the pool captioner (the
captioner's output reaches the examples' captions). So does the pool's content
(:func:`~capvqa.data.example_pool.pool_content_fingerprint`: its questions, answers and captions file),
read when the stage is placed in a pipeline, so edited annotations or captions never serve stale
selections (an image re-encoded in place under the same id is not seen).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from capvqa.data.example_pool import (
    POOL_CACHE_SUBDIR,
    PoolEntry,
    PoolReport,
    cached_array,
    distinct_in_order,
    embedding_cache_key,
    generate_captions,
    pool_content_fingerprint,
    read_pool_entries,
)
from capvqa.data.images import distinct_images
from capvqa.data.official import normalize_id
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError, DataError
from capvqa.models.clip_encoder import ClipEncoder
from capvqa.models.loading import ModelRef, model_fingerprint
from capvqa.ops.patch_sampling import item_rng

log = logging.getLogger(__name__)

MODES = ("question+image", "question", "random")
#: Datasets whose pool defaults to the training split (``pool_split`` unset).
_TRAIN_SPLIT_DATASETS = {"vqav2": "train2014", "okvqa": "train2014"}


@dataclass(frozen=True)
class ExampleSelectionConfig:
    clip_model: str = "openai/clip-vit-base-patch16"
    clip_revision: str | None = None
    pool_dataset: str = "okvqa"  # any open_dataset spec: okvqa, vqav2, sample, hf:..., a folder
    pool_split: str | None = None  # None: train2014 for vqav2/okvqa, else the dataset's own split
    pool_data_root: str | None = None
    pool_limit: int | None = None  # the first N pool questions only (quick runs)
    pool_captions: str | None = None  # COCO captions file (captions_train2014.json); None: caption them
    pool_captioner_model: str = "Salesforce/blip-image-captioning-large"
    pool_captioner_revision: str | None = None
    mode: str = "question+image"
    n_shot: int = 16
    n_ensemble: int = 1
    seed: int = 42
    batch_size: int = non_semantic(64)  # CLIP batches
    pool_captioner_batch_size: int = non_semantic(16)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"example selection mode {self.mode!r} is unknown; valid: {list(MODES)}")
        if self.n_shot < 1 or self.n_ensemble < 1:
            raise ConfigError(f"n_shot and n_ensemble must be >= 1, got {self.n_shot} and {self.n_ensemble}")
        if self.pool_limit is not None and self.pool_limit < 1:
            raise ConfigError(f"pool_limit must be >= 1 or unset, got {self.pool_limit}")

    @property
    def num_examples(self) -> int:
        return self.n_shot * self.n_ensemble


@dataclass(frozen=True)
class InContextExamples:
    """Ranked examples, best first; each ``{"question_id", "question", "answer", "caption", "score"}``.

    ``score`` is the CLIP similarity (question + image, or question), None in random mode.
    """

    examples: list[dict]
    n_shot: int | None = None  # the selection's settings, so the prompt stage can check it slices alike
    n_ensemble: int | None = None


# ------------------------------------------------------------------------------------ pure ranking


def resolve_pool_split(dataset: str, split: str | None) -> str | None:
    """The pool split: the given one, else train2014 for the official datasets, else the dataset's own."""
    return split if split is not None else _TRAIN_SPLIT_DATASETS.get(dataset.strip())


def similarity_scores(
    query_text: torch.Tensor,
    pool_text: torch.Tensor,
    *,
    text_index: torch.Tensor | None = None,
    query_image: torch.Tensor | None = None,
    pool_image: torch.Tensor | None = None,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) scores: q·Q (+ i·I), one matrix product per modality.

    ``pool_text`` / ``pool_image`` may hold distinct rows only; ``text_index`` / ``image_index`` (N,)
    then map each pool entry to its row, so shared questions and images are multiplied once.
    """
    scores = query_text @ pool_text.T
    if text_index is not None:
        scores = scores[:, text_index]
    if query_image is not None:
        if pool_image is None:
            raise ValueError("query_image given without pool_image")
        image_scores = query_image @ pool_image.T
        if image_index is not None:
            image_scores = image_scores[:, image_index]
        scores = scores + image_scores
    return scores


def top_examples(
    scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> list[list[tuple[int, float]]]:
    """Per query, the ``k`` best (pool row, score) pairs, best first; excluded rows never appear.

    Ties are broken by pool row (lower first): ``topk`` finds the k-th best score, then only the rows at
    or above it are ordered with a stable sort, so this stays cheap on a 443k-row pool.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (queries, pool), got shape {tuple(scores.shape)}")
    scores = scores.float()
    if exclude is not None:
        scores = scores.masked_fill(exclude.to(scores.device, torch.bool), float("-inf"))
    k = min(int(k), scores.shape[1])
    if k <= 0:
        return [[] for _ in range(scores.shape[0])]
    kth = torch.topk(scores, k, dim=1).values[:, -1]
    ranked: list[list[tuple[int, float]]] = []
    for row, threshold in zip(scores, kth):
        candidates = torch.nonzero(row >= threshold).squeeze(1)  # ascending rows
        order = torch.sort(row[candidates], descending=True, stable=True).indices[:k]
        chosen = candidates[order].tolist()
        values = row[candidates[order]].tolist()
        ranked.append([(i, v) for i, v in zip(chosen, values) if v != float("-inf")])
    return ranked


def random_examples(
    pool_size: int, k: int, rng: np.random.Generator, exclude: Collection[int] = ()
) -> list[int]:
    """``k`` distinct pool rows drawn uniformly without replacement, none of them in ``exclude``."""
    excluded = set(exclude)
    draw = min(pool_size, k + len(excluded))
    drawn = rng.choice(pool_size, size=draw, replace=False) if draw > 0 else np.empty(0, dtype=np.int64)
    return [int(i) for i in drawn if int(i) not in excluded][:k]


def question_key(question: str) -> str:
    """Question text as compared for self-exclusion: case and whitespace do not make a new question."""
    return " ".join(question.lower().split())


# ------------------------------------------------------------------------------------------ stage


class ExampleSelection:
    NAME: ClassVar[str] = "pica_example_selection"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("clip_model", "pool_captioner_model")
    Config = ExampleSelectionConfig
    Output = InContextExamples

    def __init__(self, config: ExampleSelectionConfig | None = None, **overrides: Any) -> None:
        self.config = config or ExampleSelectionConfig(**overrides)
        self._encoder: ClipEncoder | None = None
        self.report: PoolReport | None = None

    def model_fingerprints(self) -> dict[str, str]:
        """The CLIP model and pool captioner, fingerprinted as any stage's models, and the pool's content.

        The pool's questions and answers are read (no images) when the stage is placed in a pipeline,
        on every run, so a fully cached rerun also needs the pool's files.
        """
        from capvqa.engine.runner import default_model_fingerprints

        return {**default_model_fingerprints(self),
                "pool": pool_content_fingerprint(self._open_pool(), self.config.pool_captions)}

    def _open_pool(self) -> Any:
        from capvqa.data.datasets import open_dataset

        cfg = self.config
        self.pool_split = resolve_pool_split(cfg.pool_dataset, cfg.pool_split)
        data_root = Path(cfg.pool_data_root).expanduser() if cfg.pool_data_root else None
        return open_dataset(cfg.pool_dataset, split=self.pool_split, data_root=data_root, limit=cfg.pool_limit)

    # -- setup: pool items -> captions (captioner, then freed) -> CLIP -> pool embeddings ------------
    # The captioner runs before CLIP is loaded so only one model is in memory at a time.

    def setup(self, runtime: Runtime) -> None:
        from capvqa.engine.runner import ImageHasher
        from capvqa.engine.store import CacheStore, default_cache_dir

        cfg = self.config
        self.runtime = runtime
        cache_dir = Path(runtime.cache_dir) if runtime.cache_dir is not None else default_cache_dir()
        store = CacheStore(cache_dir)
        entries, skipped = self._setup_pool_entries(ImageHasher(store))
        self.captions, from_file = self._setup_pool_captions(entries, store)
        self.entries = entries
        self._setup_exclusion_index(entries)
        text_state = image_state = "unused"
        if cfg.mode != "random":
            self._encoder = ClipEncoder.load(ModelRef(cfg.clip_model, cfg.clip_revision), runtime)
            text_state, image_state = self._setup_pool_embeddings(entries, cache_dir / POOL_CACHE_SUBDIR)
        self.report = PoolReport(
            items=len(entries),
            skipped=skipped,
            captions_from_file=from_file,
            captions_generated=len(entries) - from_file,
            question_embeddings=text_state,
            image_embeddings=image_state,
        )
        log.info(
            "example selection: %s pool %s (%d questions, %d skipped), mode %s, %d x %d examples; "
            "captions %d from file, %d generated; embeddings: questions %s, images %s",
            cfg.pool_dataset,
            self.pool_split,
            len(entries),
            skipped,
            cfg.mode,
            cfg.n_ensemble,
            cfg.n_shot,
            from_file,
            len(entries) - from_file,
            text_state,
            image_state,
        )

    def _setup_pool_entries(self, hasher: Any) -> tuple[list[PoolEntry], int]:
        cfg = self.config
        dataset = self._open_pool()
        if not dataset.has_annotations:
            raise DataError(
                f"the example pool {cfg.pool_dataset} {self.pool_split or ''} has no annotations; PICa's "
                "examples need answers (use a training split such as okvqa train2014)"
            )
        entries, skipped = read_pool_entries(dataset, hasher)
        if not entries:
            raise DataError(
                f"the example pool {cfg.pool_dataset} {self.pool_split or ''} has no answered questions"
            )
        return entries, skipped

    def _setup_pool_captions(self, entries: list[PoolEntry], store: Any) -> tuple[list[str], int]:
        """Each entry's caption: the image's first COCO caption when the file has one, else our own."""
        from capvqa.data.coco_captions import first_caption, load_coco_captions

        cfg = self.config
        from_file: list[str | None] = [None] * len(entries)
        if cfg.pool_captions:
            coco = load_coco_captions(cfg.pool_captions)
            from_file = [first_caption(coco, entry.image_id) for entry in entries]
        missing = [entry for entry, caption in zip(entries, from_file) if caption is None]
        generated = generate_captions(
            missing,
            model=cfg.pool_captioner_model,
            revision=cfg.pool_captioner_revision,
            batch_size=cfg.pool_captioner_batch_size,
            runtime=self.runtime,
            store=store,
        )
        captions = [
            caption if caption is not None else generated[entry.image_hash]
            for entry, caption in zip(entries, from_file)
        ]
        return captions, len(entries) - len(missing)

    def _setup_exclusion_index(self, entries: list[PoolEntry]) -> None:
        self._rows_by_id: dict[str, list[int]] = {}
        self._rows_by_content: dict[tuple[str, str], list[int]] = {}
        for row, entry in enumerate(entries):
            self._rows_by_id.setdefault(str(normalize_id(entry.question_id)), []).append(row)
            self._rows_by_content.setdefault((entry.image_hash, question_key(entry.question)), []).append(row)

    def _setup_pool_embeddings(self, entries: list[PoolEntry], directory: Path) -> tuple[str, str]:
        """Distinct-question and distinct-image CLIP embeddings, from the disk cache or computed once."""
        cfg, encoder, device = self.config, self._encoder, self.runtime.device
        assert encoder is not None
        fingerprint = model_fingerprint(ModelRef(cfg.clip_model, cfg.clip_revision))
        texts, text_index = distinct_in_order([entry.question for entry in entries])
        text_array, text_cached = cached_array(
            directory,
            embedding_cache_key("clip-question", fingerprint, texts),
            len(texts),
            lambda: encoder.encode_texts(texts, cfg.batch_size).cpu().numpy(),
        )
        self._pool_text = torch.from_numpy(text_array).to(device)
        self._text_index = torch.from_numpy(text_index).to(device)
        image_state = "unused"
        self._pool_image = self._image_index = None
        if cfg.mode == "question+image":
            hashes, image_index = distinct_in_order([entry.image_hash for entry in entries])
            ref_of = {}
            for entry in entries:
                ref_of.setdefault(entry.image_hash, entry.image)
            image_array, image_cached = cached_array(
                directory,
                embedding_cache_key("clip-image", fingerprint, hashes),
                len(hashes),
                lambda: encoder.encode_image_refs([ref_of[h] for h in hashes], cfg.batch_size).cpu().numpy(),
            )
            self._pool_image = torch.from_numpy(image_array).to(device)
            self._image_index = torch.from_numpy(image_index).to(device)
            image_state = "cached" if image_cached else "computed"
        return ("cached" if text_cached else "computed"), image_state

    # -- run ----------------------------------------------------------------------------------------

    def excluded_rows(self, entry: StageInput) -> list[int]:
        """Pool rows that are the query itself (same question id, or same image and question)."""
        rows = set(self._rows_by_id.get(str(normalize_id(entry.item.question_id)), ()))
        rows.update(self._rows_by_content.get((entry.image_hash, question_key(entry.item.question)), ()))
        return sorted(rows)

    def run(self, batch: Sequence[StageInput]) -> list[InContextExamples]:
        cfg = self.config
        excluded = [self.excluded_rows(entry) for entry in batch]
        if cfg.mode == "random":
            ranked = [self._random_ranks(entry, rows) for entry, rows in zip(batch, excluded)]
        else:
            ranked = self._rank_by_similarity(batch, excluded)
        return [
            InContextExamples(examples=[self._example(row, score) for row, score in rows],
                              n_shot=self.config.n_shot, n_ensemble=self.config.n_ensemble)
            for rows in ranked
        ]

    def _random_ranks(self, entry: StageInput, excluded: list[int]) -> list[tuple[int, None]]:
        """Uniform draws from a generator seeded by (seed, item): independent of batch and order."""
        rng = item_rng(self.config.seed, entry.item_key, "pica-examples")
        return [
            (row, None) for row in random_examples(len(self.entries), self.config.num_examples, rng, excluded)
        ]

    def _rank_by_similarity(
        self, batch: Sequence[StageInput], excluded: list[list[int]]
    ) -> list[list[tuple[int, float]]]:
        cfg, encoder = self.config, self._encoder
        assert encoder is not None
        query_text = encoder.encode_texts([entry.item.question for entry in batch], cfg.batch_size)
        query_image = None
        if cfg.mode == "question+image":
            images, image_index = distinct_images(batch)
            image_features = encoder.encode_images(images, cfg.batch_size)
            query_image = image_features[torch.as_tensor(image_index, device=image_features.device)]
        scores = similarity_scores(
            query_text,
            self._pool_text,
            text_index=self._text_index,
            query_image=query_image,
            pool_image=self._pool_image,
            image_index=self._image_index,
        )
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        for b, rows in enumerate(excluded):
            mask[b, rows] = True
        return top_examples(scores, cfg.num_examples, mask)

    def _example(self, row: int, score: float | None) -> dict:
        entry = self.entries[row]
        return {
            "question_id": entry.question_id,
            "question": entry.question,
            "answer": entry.answer,
            "caption": self.captions[row],
            "score": None if score is None else float(score),
        }

    def cleanup(self) -> None:
        self._encoder = None
        self._pool_text = self._pool_image = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
