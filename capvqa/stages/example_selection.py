"""PICa in-context example selection: the training questions most similar to the query.

PICa (docs/methods.md#example-selection) scores every training question by CLIP similarity to the
query -- question to question plus image to image (ViT-B/16, "question+image"), question alone
("question"), or not at all ("random") -- and fills ``n_ensemble`` prompts of ``n_shot`` examples from
the ranks: prompt r gets ranks [r*n_shot, (r+1)*n_shot). This stage returns the top ``n_shot *
n_ensemble`` examples, ranked, with ``n_shot`` and ``n_ensemble`` in the record;
:mod:`capvqa.stages.pica_prompt` slices them into prompts from the record alone, so the two stages cannot
disagree.

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

Which pool: ``pool_dataset: auto`` (the default) is resolved from the run's dataset by
:meth:`ExampleSelection.resolve_params` before the config is built -- a ``vqav2``/``okvqa`` run pools that
dataset's train2014 split under the run's data root; any other dataset (``sample``, a folder, ``hf:...``)
pools itself, its own split. The run's ``config.yaml`` records the resolved pool.

Pool captions: an example's context is the first COCO caption of its image when ``pool_captions`` names a
captions file, verbatim (whitespace and all, as the original code puts it into the prompt); images it
lacks are captioned by ``pool_captioner``, which names the pipeline stage whose captioner to reuse
(``caption`` in ``pipelines/pica*.yaml``). Config building replaces the name by that stage's built
config, so pool captions use exactly its settings and the run's dtype and share its cache entries; each
setting is stated once, in the caption stage.

The pool (captions, embeddings, disk cache) is assembled in :mod:`capvqa.data.example_pool`. This stage's
cache key holds the CLIP model, the pool captioner (the caption stage's fingerprint: its settings and
model) and the pool's content (:func:`~capvqa.data.example_pool.pool_content_fingerprint`: its questions,
answers and captions file), so edited annotations or captions never serve stale selections (an image
re-encoded in place under the same id is not seen). The content fingerprint is memoised by the pool
files' identity, so a fully cached rerun does not read the pool again.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
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
    memoised_pool_fingerprint,
    read_pool_entries,
)
from capvqa.data.image_memo import ImageMemo, memo_encoded_images
from capvqa.data.official import normalize_id
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import DatasetContext, StageInput, non_semantic
from capvqa.errors import ConfigError, DataError
from capvqa.models.clip_encoder import ClipEncoder
from capvqa.models.loading import ModelRef, model_fingerprint
from capvqa.ops.patch_sampling import item_rng
from capvqa.stages.image_captioning import ImageCaptioning, ImageCaptioningConfig

log = logging.getLogger(__name__)

MODES = ("question+image", "question", "random")
#: ``pool_dataset`` value resolved from the run's dataset (:meth:`ExampleSelection.resolve_params`).
AUTO_POOL = "auto"
#: Datasets whose pool defaults to the training split (``pool_split`` unset).
_TRAIN_SPLIT_DATASETS = {"vqav2": "train2014", "okvqa": "train2014"}


@dataclass(frozen=True)
class ExampleSelectionConfig:
    clip_model: str = "openai/clip-vit-base-patch16"
    clip_revision: str | None = None
    # "auto": resolved from the run's dataset (ExampleSelection.resolve_params); else any open_dataset
    # spec: okvqa, vqav2, sample, hf:..., a folder
    pool_dataset: str = AUTO_POOL
    pool_split: str | None = None  # None: train2014 for vqav2/okvqa, else the dataset's own split
    # Where vqav2/okvqa pool files live (the run's --data-root when unset). Not in the cache key: the pool's
    # content is (model_fingerprints), so the same pool reached under another path keeps its selections.
    # (Nor is the path of pool_captions below, for the same reason.)
    pool_data_root: str | None = non_semantic(None)
    pool_limit: int | None = None  # the first N pool questions only (quick runs)
    # COCO captions file (captions_train2014.json); None: caption every pool image. Its content is in the
    # key (model_fingerprints), its path is not.
    pool_captions: str | None = non_semantic(None)
    # The captioner of pool images without a COCO caption: in a pipeline config, the name of the stage
    # whose config to reuse (config building puts that stage's ImageCaptioningConfig here); alone, an
    # ImageCaptioningConfig; None: every pool image needs a COCO caption. Kept out of the semantic config
    # because its identity enters the key as the caption stage's fingerprint (model_fingerprints).
    pool_captioner: str | ImageCaptioningConfig | None = field(
        default=None, metadata={"semantic": False, "stage_config": True}
    )
    mode: str = "question+image"
    n_shot: int = 16
    n_ensemble: int = 1
    seed: int = 42
    batch_size: int = non_semantic(64)  # CLIP batches

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"example selection mode {self.mode!r} is unknown; valid: {list(MODES)}")
        if self.n_shot < 1 or self.n_ensemble < 1:
            raise ConfigError(f"n_shot and n_ensemble must be >= 1, got {self.n_shot} and {self.n_ensemble}")
        if self.pool_limit is not None and self.pool_limit < 1:
            raise ConfigError(f"pool_limit must be >= 1 or unset, got {self.pool_limit}")
        if not isinstance(self.pool_dataset, str) or not self.pool_dataset.strip():
            raise ConfigError(f"pool_dataset must name a dataset (or be 'auto'), got {self.pool_dataset!r}")
        captioner = self.pool_captioner
        if captioner is not None and not isinstance(captioner, (str, ImageCaptioningConfig)):
            raise ConfigError(
                "pool_captioner must name the pipeline's caption stage (e.g. caption), or be an "
                f"ImageCaptioningConfig when the stage is used alone; got {self.pool_captioner!r}"
            )

    @property
    def num_examples(self) -> int:
        return self.n_shot * self.n_ensemble


@dataclass(frozen=True)
class InContextExamples:
    """Ranked examples, best first; each ``{"question_id", "question", "answer", "caption", "score"}``.

    ``score`` is the CLIP similarity (question + image, or question), None in random mode. ``n_shot`` and
    ``n_ensemble`` are the selection's settings: the prompt stage slices ``examples`` by them.
    """

    examples: list[dict]
    n_shot: int
    n_ensemble: int


# ------------------------------------------------------------------------------------ pure ranking


def resolve_pool_split(dataset: str, split: str | None) -> str | None:
    """The pool split: the given one, else train2014 for the official datasets, else the dataset's own."""
    return split if split is not None else _TRAIN_SPLIT_DATASETS.get(dataset.strip())


def _absolute_spec(spec: str) -> str:
    """A dataset spec with a local folder or ``hf:`` path made absolute (names are kept as they are)."""
    from capvqa.data.datasets import HF_PREFIX

    spec = spec.strip()
    if spec in ("sample", *_TRAIN_SPLIT_DATASETS):
        return spec
    if spec.startswith(HF_PREFIX):
        local = Path(spec[len(HF_PREFIX) :].strip()).expanduser()
        return f"{HF_PREFIX}{local.resolve()}" if local.exists() else spec
    local = Path(spec).expanduser()
    return str(local.resolve()) if local.exists() else spec


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
    # 2: COCO captions are kept as the file has them (whitespace included), as PICa's reference does
    VERSION: ClassVar[str] = "2"
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("clip_model",)
    Config = ExampleSelectionConfig
    Output = InContextExamples

    def __init__(self, config: ExampleSelectionConfig | None = None, **overrides: Any) -> None:
        self.config = config or ExampleSelectionConfig(**overrides)
        self._encoder: ClipEncoder | None = None
        self.report: PoolReport | None = None
        self.query_image_features: ImageMemo[torch.Tensor] = ImageMemo()

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], dataset: DatasetContext) -> dict[str, Any]:
        """``params`` with the pool resolved against the run's dataset, to concrete values.

        - ``pool_dataset: auto`` -> on a ``vqav2``/``okvqa`` run, that dataset's ``train2014`` split; on the
          bundled ``sample``, the sample itself (the query is never its own example, see
          :meth:`excluded_rows`). Any other dataset (a folder, ``hf:...``) needs an explicit pool: taking
          the evaluated split itself would put its own human answers into the prompts. Left ``auto`` when
          the run's dataset is unknown (``dataset.spec`` None): building the stage then asks for a pool.
        - an explicit ``pool_dataset`` wins; ``pool_split`` unset becomes ``train2014`` for vqav2/okvqa.
        - a vqav2/okvqa pool without ``pool_data_root`` takes the run's data root.

        Local paths (a folder or ``hf:`` path pool, ``pool_data_root``, ``pool_captions``) are made absolute,
        so the saved ``config.yaml`` reruns from any directory.
        """
        resolved = dict(params)
        pool = str(params.get("pool_dataset", AUTO_POOL)).strip()
        if pool == AUTO_POOL:
            if dataset.spec is None:
                return resolved
            pool = dataset.spec.strip()
            if pool not in (*_TRAIN_SPLIT_DATASETS, "sample"):
                raise ConfigError(
                    f"examples.pool_dataset: auto takes PICa's examples from a training split, and capvqa knows "
                    f"none for the dataset {pool!r}; using the evaluated split itself would put its own human "
                    "answers into the prompts. Name the pool: --set examples.pool_dataset=okvqa (with "
                    "--data-root), or e.g. examples.pool_dataset=hf:NAME with examples.pool_split=train"
                )
            if params.get("pool_split") is None and pool not in _TRAIN_SPLIT_DATASETS:
                resolved["pool_split"] = dataset.split
        pool = _absolute_spec(pool)
        resolved["pool_dataset"] = pool
        if params.get("pool_split") is None and pool in _TRAIN_SPLIT_DATASETS:
            resolved["pool_split"] = _TRAIN_SPLIT_DATASETS[pool]
        data_root = params.get("pool_data_root")
        if data_root is None and pool in _TRAIN_SPLIT_DATASETS:
            data_root = dataset.data_root
        for name, path in (("pool_data_root", data_root), ("pool_captions", params.get("pool_captions"))):
            if path is not None and str(path).strip():
                resolved[name] = str(Path(path).expanduser().resolve())
        return resolved

    def model_fingerprints(self, cache_dir: Path | None = None) -> dict[str, str]:
        """What enters the cache key beside the semantic config: the CLIP model (as any stage's model),
        the pool captioner (the caption stage's fingerprint: its settings and model) and the pool's content.

        The content fingerprint is memoised under ``cache_dir`` (default: the default cache directory) by
        the pool files' identity (:func:`~capvqa.data.example_pool.memoised_pool_fingerprint`), so a
        fully cached rerun stats the pool's files instead of reading them.
        """
        from capvqa.engine.runner import BoundStage, default_model_fingerprints
        from capvqa.engine.store import default_cache_dir

        cfg = self.config
        models = default_model_fingerprints(self)
        captioner = self._pool_captioner_config()
        if captioner is not None:
            # no dtype here: the run's dtype enters this stage's own key, and pool captions run with it
            pool_captioning = BoundStage.create("pool_captioning", ImageCaptioning(captioner), {})
            models["pool_captioner"] = pool_captioning.fingerprint
        dataset, split, data_root = self._pool_location()
        models["pool"] = memoised_pool_fingerprint(
            dataset=dataset,
            split=split,
            data_root=data_root,
            limit=cfg.pool_limit,
            captions_file=cfg.pool_captions,
            open_pool=self._open_pool,
            memo_dir=Path(cache_dir if cache_dir is not None else default_cache_dir()) / POOL_CACHE_SUBDIR,
        )
        return models

    def _pool_captioner_config(self) -> ImageCaptioningConfig | None:
        cfg = self.config
        if isinstance(cfg.pool_captioner, str):
            raise ConfigError(
                f"{self.NAME}: pool_captioner names the pipeline stage {cfg.pool_captioner!r}, which only a "
                "pipeline config resolves; used alone, pass pool_captioner=ImageCaptioningConfig(model=...)"
            )
        if cfg.pool_captioner is None and not cfg.pool_captions:
            raise ConfigError(
                f"{self.NAME}: the pool's examples need captions: set pool_captioner to the pipeline's "
                "caption stage (pool_captioner: caption) and/or pool_captions to a COCO captions file "
                "(captions_train2014.json)"
            )
        return cfg.pool_captioner

    def _pool_location(self) -> tuple[str, str | None, Path | None]:
        """(dataset spec, split, data root) of the pool; ``auto`` must have been resolved by now."""
        cfg = self.config
        if cfg.pool_dataset.strip() == AUTO_POOL:
            raise ConfigError(
                f"{self.NAME}: pool_dataset is 'auto', which is resolved from the run's dataset only when a "
                "pipeline runs on a dataset; set pool_dataset (okvqa, vqav2, sample, hf:NAME or a folder), "
                "e.g. --set examples.pool_dataset=okvqa"
            )
        data_root = Path(cfg.pool_data_root).expanduser() if cfg.pool_data_root else None
        return cfg.pool_dataset, resolve_pool_split(cfg.pool_dataset, cfg.pool_split), data_root

    def _open_pool(self) -> Any:
        from capvqa.data.datasets import open_dataset

        dataset, split, data_root = self._pool_location()
        return open_dataset(dataset, split=split, data_root=data_root, limit=self.config.pool_limit)

    # -- setup: pool items -> captions (captioner, then freed) -> CLIP -> pool embeddings ------------
    # The captioner runs before CLIP is loaded so only one model is in memory at a time.

    def setup(self, runtime: Runtime) -> None:
        from capvqa.engine.runner import ImageHasher
        from capvqa.engine.store import CacheStore, default_cache_dir

        cfg = self.config
        self.runtime = runtime
        self.query_image_features = ImageMemo()
        cache_dir = Path(runtime.cache_dir) if runtime.cache_dir is not None else default_cache_dir()
        _, self.pool_split, _ = self._pool_location()
        store = CacheStore(cache_dir)
        try:
            entries, skipped = self._setup_pool_entries(ImageHasher(store))
            self.captions, from_file = self._setup_pool_captions(entries, store)
        finally:
            store.close()
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
                "examples need answers: set examples.pool_dataset (and pool_split) to an annotated dataset, "
                "e.g. okvqa (train2014 under --data-root)"
            )
        entries, skipped = read_pool_entries(dataset, hasher)
        if not entries:
            raise DataError(
                f"the example pool {cfg.pool_dataset} {self.pool_split or ''} has no answered questions"
            )
        return entries, skipped

    def _setup_pool_captions(self, entries: list[PoolEntry], store: Any) -> tuple[list[str], int]:
        """Each entry's caption: the image's first COCO caption when the file has one, else the pipeline
        caption stage's caption (same config, the run's dtype, the same cache entries)."""
        from capvqa.data.coco_captions import first_caption, load_coco_captions

        cfg = self.config
        from_file: list[str | None] = [None] * len(entries)
        if cfg.pool_captions:
            coco = load_coco_captions(cfg.pool_captions)
            from_file = [first_caption(coco, entry.image_id) for entry in entries]
        missing = [entry for entry, caption in zip(entries, from_file) if caption is None]
        captioner = self._pool_captioner_config()
        if missing and captioner is None:
            raise DataError(
                f"{len(missing)} example pool questions have an image without a caption in "
                f"{cfg.pool_captions} (e.g. image {missing[0].image_id!r}); set examples.pool_captioner to the "
                "pipeline's caption stage (e.g. caption) to caption them, or use a captions file that covers "
                "the pool"
            )
        generated = (
            generate_captions(missing, captioner=captioner, runtime=self.runtime, store=store)
            if captioner is not None else {}
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

    @property
    def images_encoded(self) -> int:
        """Query images encoded by CLIP (``question+image`` mode; the pool's are encoded in setup)."""
        return self.query_image_features.computed

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
            image_features, image_index = memo_encoded_images(
                self.query_image_features, batch, lambda images: encoder.encode_images(images, cfg.batch_size))
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
        self.query_image_features.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
