"""Question-guided patch captioning with the BLIP captioner (docs/methods.md#question-guided-captioning).

Each distinct image is encoded once, not once per batch (:mod:`capvqa.data.image_memo`). For every
caption draw, ``num_patches`` patch embeddings are sampled by relevance and fed alone as the decoder's
cross-attention memory; all draws of all items in a batch decode together in a few ``generate`` calls (KV cache on). Sampling randomness is per item and per
draw (:mod:`capvqa.ops.seeded_sampling`), so an item's captions do not depend on its batch.

Distinct-caption filling follows LAVIS -- each round draws ``num_captions`` candidates per unfinished
item and keeps those that are not a substring of a caption already kept -- with a cap on the number of
rounds (LAVIS loops forever on degenerate models); how many rounds and draws ran is recorded.

The module-level functions (relevance check, drawing a round's rows, chunked decoding, the distinctness
rule) are shared with Img2LLM's in-loop filtered captioning
(:mod:`capvqa.stages.filtered_patch_captioning`), so both sample patches and captions identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from capvqa.data.image_memo import ImageMemo, memo_encoded_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.models.blip_captioner import BlipCaptioner, PatchDecoding, SampledDecoding, load_blip_captioner
from capvqa.ops.patch_sampling import item_rng, sample_patch_sets
from capvqa.ops.seeded_sampling import row_seed

log = logging.getLogger(__name__)


@dataclass
class PatchRows:
    """Caption draws to decode, one row each: the item (index in the batch), its sampled patches, and the
    64-bit seed of its token stream."""

    item: list[int] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)
    seed: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item)


def batch_relevance(batch: Sequence[StageInput], captioner: BlipCaptioner) -> list[np.ndarray]:
    """Each input's patch relevance, checked against the captioner's patch grid."""
    relevance = [np.asarray(entry.upstream["relevance"].relevance) for entry in batch]
    for entry, weights in zip(batch, relevance):
        if weights.shape[0] != captioner.num_image_patches:
            raise ValueError(
                f"question {entry.item.question_id}: relevance has {weights.shape[0]} patches but the "
                f"captioner's ViT has {captioner.num_image_patches}; matching and captioning models must "
                "share the image size and patch size"
            )
    return relevance


def patch_rngs(batch: Sequence[StageInput], seed: int) -> list[np.random.Generator]:
    """One patch-sampling generator per input, a function of (seed, item) only."""
    return [item_rng(seed, entry.item_key, "patches") for entry in batch]


def draw_patch_rows(
    batch: Sequence[StageInput],
    relevance: Sequence[np.ndarray],
    rngs: Sequence[np.random.Generator],
    draws: dict[int, tuple[int, int]],
    num_patches: int,
    seed: int,
) -> PatchRows:
    """Rows for ``draws = {item index: (first draw number, number of draws)}``: each item's patch sets come
    from its own generator (consumed in draw order) and draw ``n`` of an item gets the token stream
    ``row_seed(seed, item key, n)``, so an item's captions do not depend on the other items."""
    rows = PatchRows()
    for i, (first, count) in draws.items():
        patch_sets = sample_patch_sets(relevance[i], num_patches, count, rngs[i])
        for d in range(count):
            rows.item.append(i)
            rows.patches.append(patch_sets[d])
            rows.seed.append(row_seed(seed, batch[i].item_key, first + d))
    return rows


def decode_patch_rows(
    captioner: BlipCaptioner,
    image_embeds: torch.Tensor,
    image_index: Sequence[int],
    rows: PatchRows,
    decoding: SampledDecoding,
    max_rows_per_generate: int,
) -> Iterator[tuple[int, PatchDecoding]]:
    """Decode ``rows`` in chunks of at most ``max_rows_per_generate``; yields (first row, chunk)."""
    for start in range(0, len(rows), max_rows_per_generate):
        stop = start + max_rows_per_generate
        row_images = [image_index[i] for i in rows.item[start:stop]]
        yield start, captioner.sample_from_patches(image_embeds, row_images, rows.patches[start:stop],
                                                   rows.seed[start:stop], decoding)


def is_new_caption(caption: str, kept: Sequence[str]) -> bool:
    """LAVIS's distinctness rule: a non-empty caption that is not a substring of a caption kept so far."""
    return bool(caption) and not any(caption in previous for previous in kept)


@dataclass(frozen=True)
class PatchCaptioningConfig:
    model: str = "Salesforce/blip-image-captioning-large"
    revision: str | None = None
    checkpoint: str | None = None  # an original BLIP .pth (path or URL), converted into `model`
    prompt: str = "a picture of "
    num_captions: int = 100
    num_patches: int = 20
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_length: int = 10  # counts the prompt tokens ([DEC] a picture of), as in LAVIS
    max_length: int = 20
    max_rounds: int = 10
    seed: int = 42
    batch_size: int = non_semantic(8)
    max_rows_per_generate: int = non_semantic(1600)

    def __post_init__(self) -> None:
        if self.num_captions < 1 or self.num_patches < 1 or self.max_rounds < 1:
            raise ValueError("captioning: num_captions, num_patches and max_rounds must be >= 1")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"captioning: need min_length <= max_length, got {self.min_length} > {self.max_length}")


@dataclass(frozen=True)
class Captions:
    """Distinct question-guided captions of one item, in the order they were kept."""

    captions: list[str]
    rounds: int
    draws: int
    patches_per_caption: int


class PatchCaptioning:
    NAME: ClassVar[str] = "patch_captioning"
    VERSION: ClassVar[str] = "2"  # 2: the prompt cut as LAVIS cuts it (capvqa/models/blip_captioner.py texts)
    INPUTS: ClassVar[tuple[str, ...]] = ("relevance",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = PatchCaptioningConfig
    Output = Captions

    def __init__(self, config: PatchCaptioningConfig | None = None, **overrides: Any) -> None:
        self.config = config or PatchCaptioningConfig(**overrides)
        self._captioner: BlipCaptioner | None = None
        self.image_embeddings: ImageMemo[torch.Tensor] = ImageMemo()

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        self.runtime = runtime
        self.image_embeddings = ImageMemo()
        self._captioner = load_blip_captioner(cfg.model, cfg.revision, runtime, cfg.prompt, cfg.checkpoint)
        log.info("captioning: BLIP %s, %d captions x %d patches per question",
                 cfg.model, cfg.num_captions, cfg.num_patches)

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    @property
    def images_encoded(self) -> int:
        return self.image_embeddings.computed

    def run(self, batch: Sequence[StageInput]) -> list[Captions]:
        cfg = self.config
        relevance = batch_relevance(batch, self._captioner)
        image_embeds, image_index = memo_encoded_images(self.image_embeddings, batch, self._captioner.encode_images)

        rngs = patch_rngs(batch, cfg.seed)
        kept: list[list[str]] = [[] for _ in batch]
        draws = [0] * len(batch)
        rounds = [0] * len(batch)
        patches_used = [0] * len(batch)
        for _ in range(cfg.max_rounds):
            active = [i for i in range(len(batch)) if len(kept[i]) < cfg.num_captions]
            if not active:
                break
            rows = draw_patch_rows(batch, relevance, rngs, {i: (draws[i], cfg.num_captions) for i in active},
                                   cfg.num_patches, cfg.seed)
            for i, patches in zip(rows.item, rows.patches):
                patches_used[i] = len(patches)
            for i in active:
                rounds[i] += 1
                draws[i] += cfg.num_captions
            texts = [text for _, chunk in decode_patch_rows(self._captioner, image_embeds, image_index, rows,
                                                             SampledDecoding.of(cfg), cfg.max_rows_per_generate)
                     for text in chunk.texts]
            for i, caption in zip(rows.item, texts):
                if len(kept[i]) < cfg.num_captions and is_new_caption(caption, kept[i]):
                    kept[i].append(caption)
        return [
            Captions(captions=kept[i], rounds=rounds[i], draws=draws[i], patches_per_caption=patches_used[i])
            for i in range(len(batch))
        ]

    def cleanup(self) -> None:
        self._captioner = None
        self.image_embeddings.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
