"""Whole-image caption filtering by BLIP image-text matching (docs/methods.md#captions-and-the-itm-filter).

Question-guided captions sampled from a few patches are often wrong about the whole image. This stage
keeps a caption only when BLIP's ITM head, reading the whole image through the ITM model's own ViT, gives
it a match probability (softmax over the head's two logits) of at least ``threshold`` (0.5). Every
(image, caption) pair of a batch is scored in a few text-encoder calls; each distinct image is encoded
once, not once per batch (:mod:`capvqa.data.image_memo`). It runs after PNP-VQA's captioning, without
refilling (``pipelines/img2llm-whole-image-filter.yaml``);
Img2LLM's default, as its authors ran it, filters inside the caption loop instead
(:mod:`capvqa.stages.filtered_patch_captioning`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from capvqa.data.image_memo import ImageMemo, memo_encoded_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.models.blip_itm import load_blip_itm

_CAPTION_PUNCT = re.compile(r"[.!\"()*#:;~]")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's BLIP caption processor: lower-case, punctuation . ! " ( ) * # : ; ~ -> space, collapse
    whitespace, at most ``max_words`` words."""
    words = _CAPTION_PUNCT.sub(" ", caption.lower()).split()
    return " ".join(words[:max_words])


@dataclass(frozen=True)
class CaptionFilterConfig:
    model: str = "Salesforce/blip-itm-large-coco"
    revision: str | None = None
    checkpoint: str | None = None  # an original BLIP .pth (path or URL), converted into `model`
    threshold: float = 0.5
    max_text_tokens: int = 35
    enc_token_id: int | None = None
    batch_size: int = non_semantic(8)
    max_pairs_per_forward: int = non_semantic(512)


@dataclass(frozen=True)
class FilteredCaptions:
    """The captions that passed, in their original order, with every caption's match probability."""

    captions: list[str]
    scores: list[float]
    all_scores: list[float]
    threshold: float


class CaptionFilter:
    NAME: ClassVar[str] = "caption_filter"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("captions",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = CaptionFilterConfig
    Output = FilteredCaptions

    def __init__(self, config: CaptionFilterConfig | None = None, **overrides: Any) -> None:
        self.config = config or CaptionFilterConfig(**overrides)
        self.itm: Any = None
        self.image_embeddings: ImageMemo[torch.Tensor] = ImageMemo()

    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.image_embeddings = ImageMemo()
        self.itm = load_blip_itm(self.config.model, self.config.revision, runtime, self.config.enc_token_id,
                                 self.config.checkpoint)

    def cost(self, entry: StageInput) -> int:
        return len(entry.upstream["captions"].captions)

    def run(self, batch: Sequence[StageInput]) -> list[FilteredCaptions]:
        captioned = [entry for entry in batch if entry.upstream["captions"].captions]  # others need no image
        probabilities: list[float] = []
        if captioned:
            image_embeds, image_index = memo_encoded_images(self.image_embeddings, captioned,
                                                            self.itm.encode_images)
            pair_image: list[int] = []
            pair_text: list[str] = []
            for entry, image in zip(captioned, image_index):
                for caption in entry.upstream["captions"].captions:
                    pair_image.append(image)
                    pair_text.append(clean_caption(caption))
            probabilities = self.match_probabilities(image_embeds, pair_image, pair_text)
        results, start = [], 0
        for entry in batch:
            captions = list(entry.upstream["captions"].captions)
            scores = [float(p) for p in probabilities[start : start + len(captions)]]
            start += len(captions)
            kept = [i for i, score in enumerate(scores) if score >= self.config.threshold]
            results.append(
                FilteredCaptions(captions=[captions[i] for i in kept], scores=[scores[i] for i in kept],
                                 all_scores=scores, threshold=self.config.threshold)
            )
        return results

    @property
    def images_encoded(self) -> int:
        return self.image_embeddings.computed

    def match_probabilities(
        self, image_embeds: torch.Tensor, pair_image: list[int], pair_text: list[str]
    ) -> list[float]:
        """P(match) of each (image index, text) pair, given the ITM ViT's embeddings of the images."""
        device = self.runtime.device
        out: list[float] = []
        step = self.config.max_pairs_per_forward
        for start in range(0, len(pair_text), step):
            texts = pair_text[start : start + step]
            rows = torch.as_tensor(pair_image[start : start + step], device=device)
            memory = image_embeds[rows]
            input_ids, mask = self.itm.text_inputs(texts, self.config.max_text_tokens)
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=device)
            out.extend(self.itm.match_probabilities(input_ids, mask, memory, memory_mask).cpu().tolist())
        return out

    def cleanup(self) -> None:
        self.itm = None
        self.image_embeddings.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
