"""Img2LLM's question-guided captions with the in-loop ITM filter (docs/methods.md#captions-and-the-itm-filter).

As LAVIS 1.0.2 Img2Prompt's ``forward_cap``: every round samples patches and decodes captions exactly as
PNP-VQA's captioning does (the shared functions of :mod:`capvqa.stages.patch_captioning`, with the same
per-item random streams), then the *ITM model's text encoder and head* score each caption against the
*captioner's* patch embeddings it was decoded from (no CLS, all real patches attended). The text is the
decoder's own ids from the prompt's last word on, that word overwritten by ``[ENC]``
(:func:`capvqa.models.blip_itm.itm_inputs_from_decoder_ids`). A caption is kept when softmax(ITM)[1] >=
``threshold`` (0.5) and it is not a substring of a caption already kept (:func:`admit_caption`); rounds
repeat until the item has ``num_captions`` (100) captions. LAVIS loops until then however long it takes;
capvqa stops after ``max_draws`` candidates per question and records rounds, draws, how many candidates
passed the ITM and how many were kept.

Scoring captioner features with the ITM encoder looks like a mistake, but it is what produced the
published numbers. The whole-image filter (:mod:`capvqa.stages.caption_filter`, after PNP-VQA's
captions) is the other option (``pipelines/img2llm-whole-image-filter.yaml``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from capvqa.data.image_memo import ImageMemo, memo_encoded_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.models.blip_captioner import BlipCaptioner, PatchDecoding, SampledDecoding, load_blip_captioner
from capvqa.models.blip_itm import BlipItm, itm_inputs_from_decoder_ids, load_blip_itm
from capvqa.stages.patch_captioning import (
    batch_relevance,
    decode_patch_rows,
    draw_patch_rows,
    is_new_caption,
    patch_rngs,
)

log = logging.getLogger(__name__)


def admit_caption(caption: str, probability: float, kept: Sequence[str], threshold: float, limit: int) -> bool:
    """LAVIS Img2Prompt's in-loop rule: keep a candidate while fewer than ``limit`` are kept, when its
    P(match) is at least ``threshold`` and it is new (not empty, not a substring of a kept caption)."""
    return len(kept) < limit and probability >= threshold and is_new_caption(caption, kept)


@dataclass(frozen=True)
class FilteredPatchCaptioningConfig:
    model: str = "Salesforce/blip-image-captioning-large"  # the captioner
    revision: str | None = None
    checkpoint: str | None = None  # an original BLIP captioner .pth (path or URL), converted into `model`
    itm_model: str = "Salesforce/blip-itm-large-coco"  # whose text encoder + ITM head filter the captions
    itm_revision: str | None = None
    itm_checkpoint: str | None = None  # an original BLIP retrieval .pth, converted into `itm_model`
    enc_token_id: int | None = None  # the ITM's [ENC] id; None: from its tokenizer
    prompt: str = "a picture of "
    num_captions: int = 100
    num_patches: int = 20
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_length: int = 10  # counts the prompt tokens ([DEC] a picture of), as in LAVIS
    max_length: int = 20
    threshold: float = 0.5
    max_draws: int = 2000  # candidate captions per question before giving up (20 rounds of 100)
    seed: int = 42
    batch_size: int = non_semantic(8)
    max_rows_per_generate: int = non_semantic(1600)

    def __post_init__(self) -> None:
        if self.num_captions < 1 or self.num_patches < 1 or self.max_draws < 1:
            raise ValueError("num_captions, num_patches and max_draws must be >= 1")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"need min_length <= max_length, got {self.min_length} > {self.max_length}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")


@dataclass(frozen=True)
class FilteredPatchCaptions:
    """The captions kept, in the order kept, with their P(match); and how the filling went: ``rounds`` of
    drawing, ``draws`` candidates decoded, ``passed`` of them at or above the threshold (duplicates
    included), ``kept`` = len(captions)."""

    captions: list[str]
    scores: list[float]
    rounds: int
    draws: int
    passed: int
    kept: int
    patches_per_caption: int


class FilteredPatchCaptioning:
    NAME: ClassVar[str] = "filtered_patch_captioning"
    VERSION: ClassVar[str] = "2"  # 2: the prompt cut as LAVIS cuts it (capvqa/models/blip_captioner.py texts)
    INPUTS: ClassVar[tuple[str, ...]] = ("relevance",)
    INPUT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"relevance": ("relevance",)}
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model", "itm_model")
    Config = FilteredPatchCaptioningConfig
    Output = FilteredPatchCaptions

    def __init__(self, config: FilteredPatchCaptioningConfig | None = None, **overrides: Any) -> None:
        self.config = config or FilteredPatchCaptioningConfig(**overrides)
        self._captioner: BlipCaptioner | None = None
        self._itm: BlipItm | None = None
        self.image_embeddings: ImageMemo[torch.Tensor] = ImageMemo()

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        self.runtime = runtime
        self.image_embeddings = ImageMemo()
        self._captioner = load_blip_captioner(cfg.model, cfg.revision, runtime, cfg.prompt, cfg.checkpoint)
        self._itm = load_blip_itm(cfg.itm_model, cfg.itm_revision, runtime, cfg.enc_token_id, cfg.itm_checkpoint)
        check_itm_reads_captioner(self._itm, self._captioner, cfg)
        log.info("filtered captioning: BLIP %s, ITM filter %s (P >= %s), %d captions x %d patches per question, "
                 "at most %d draws", cfg.model, cfg.itm_model, cfg.threshold, cfg.num_captions, cfg.num_patches,
                 cfg.max_draws)

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    @property
    def images_encoded(self) -> int:
        return self.image_embeddings.computed

    def run(self, batch: Sequence[StageInput]) -> list[FilteredPatchCaptions]:
        cfg = self.config
        relevance = batch_relevance(batch, self._captioner)
        image_embeds, image_index = memo_encoded_images(self.image_embeddings, batch, self._captioner.encode_images)

        rngs = patch_rngs(batch, cfg.seed)
        n = len(batch)
        kept: list[list[str]] = [[] for _ in range(n)]
        scores: list[list[float]] = [[] for _ in range(n)]
        draws, rounds, passed, patches_used = [0] * n, [0] * n, [0] * n, [0] * n
        while True:
            plan = {i: (draws[i], min(cfg.num_captions, cfg.max_draws - draws[i])) for i in range(n)
                    if len(kept[i]) < cfg.num_captions and draws[i] < cfg.max_draws}
            if not plan:
                break
            rows = draw_patch_rows(batch, relevance, rngs, plan, cfg.num_patches, cfg.seed)
            for i, (_, count) in plan.items():
                rounds[i] += 1
                draws[i] += count
            for start, chunk in decode_patch_rows(self._captioner, image_embeds, image_index, rows, SampledDecoding.of(cfg),
                                                  cfg.max_rows_per_generate):
                probabilities = self.match_probabilities(chunk)
                for offset, (caption, probability) in enumerate(zip(chunk.texts, probabilities)):
                    i = rows.item[start + offset]
                    patches_used[i] = len(rows.patches[start + offset])
                    passed[i] += int(probability >= cfg.threshold)
                    if admit_caption(caption, probability, kept[i], cfg.threshold, cfg.num_captions):
                        kept[i].append(caption)
                        scores[i].append(probability)
        return [
            FilteredPatchCaptions(captions=kept[i], scores=scores[i], rounds=rounds[i], draws=draws[i],
                                  passed=passed[i], kept=len(kept[i]), patches_per_caption=patches_used[i])
            for i in range(n)
        ]

    def match_probabilities(self, chunk: PatchDecoding) -> list[float]:
        """P(match) of each decoded row against the captioner patch embeddings it was decoded from."""
        input_ids, attention_mask = itm_inputs_from_decoder_ids(
            chunk.output_ids, len(self._captioner.prompt_ids), self._itm.enc_token_id, self._captioner.pad_id)
        return self._itm.match_probabilities(input_ids, attention_mask, chunk.memory, chunk.memory_mask).cpu().tolist()

    def cleanup(self) -> None:
        self._captioner = None
        self._itm = None
        self.image_embeddings.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_itm_reads_captioner(itm: BlipItm, captioner: BlipCaptioner, config: FilteredPatchCaptioningConfig) -> None:
    """The ITM text encoder reads the captioner's patch embeddings and decoder ids as they are: its
    cross-attention must expect the captioner's ViT width, and both must share one vocabulary and padding id."""
    itm_text = itm.model.config.text_config
    vision_width = captioner.model.config.vision_config.hidden_size
    cross_width = getattr(itm_text, "encoder_hidden_size", None)
    if cross_width != vision_width:
        raise ConfigError(
            f"filtered captioning: the ITM model {config.itm_model!r} cross-attends to {cross_width}-wide image "
            f"features, but the captioner {config.model!r} has a {vision_width}-wide ViT; the in-loop filter "
            "scores captions against the captioner's patch embeddings, so pick an ITM model and a captioner "
            "of the same ViT size (e.g. both ViT-L: Salesforce/blip-itm-large-coco with "
            "Salesforce/blip-image-captioning-large)"
        )
    caption_vocab = captioner.model.config.text_config.vocab_size
    itm_pad = itm.processor.tokenizer.pad_token_id
    if itm_text.vocab_size != caption_vocab or itm_pad != captioner.pad_id:
        raise ConfigError(
            f"filtered captioning: the ITM model {config.itm_model!r} (vocabulary {itm_text.vocab_size}, padding "
            f"id {itm_pad}) and the captioner {config.model!r} (vocabulary {caption_vocab}, padding id "
            f"{captioner.pad_id}) do not share a tokenizer; the filter feeds the captioner's token ids to the "
            "ITM text encoder, so both must be BLIP models with the same vocabulary"
        )
