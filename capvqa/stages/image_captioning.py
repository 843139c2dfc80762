"""One whole-image caption per item, by BLIP or BLIP-2: PICa's query caption
(docs/methods.md#query-context-caption-and-tags).

PICa describes the query image with a single caption (VinVL in the paper; BLIP here, as in the rest of
capvqa), and falls back on it for in-context examples whose image has no COCO caption. Unlike PNP-VQA's
question-guided captions this one sees the whole image and ignores the question.

Decoding follows BLIP's own COCO captioning setting: beam search with 3 beams, ``min_length`` 5 and
``max_length`` 20, both counting the prompt tokens (``[DEC] a picture of``) as BLIP's ``generate`` does.
Beam search is deterministic, so no seed is involved. Each distinct image is encoded and decoded once per
run (:mod:`capvqa.data.image_memo`), and its caption handed to every item that shows it.

A BLIP-2 checkpoint as ``model`` (``pica-blip2``) captions as LAVIS's BLIP-2 captioning evaluation does
(:mod:`capvqa.models.blip2_captioner`: the prompt goes into the LM after the query tokens; ``max_length``
and ``min_length`` are the LM's, see there). The checkpoint's architecture decides which captioner runs;
its identity is in the cache key, and BLIP's captions and keys are the same as before BLIP-2 could run.
PICa's pool captions go through this stage with the same config, so they come from the same captioner.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from capvqa.data.image_memo import ImageMemo
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.models.beam_cache import beam_search_cache
from capvqa.models.blip2_captioner import (
    BLIP2_MODEL_TYPE,
    Blip2Captioner,
    checkpoint_model_type,
    load_blip2_captioner,
)
from capvqa.models.blip_captioner import BlipCaptioner, load_blip_captioner
from capvqa.models.loading import ModelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageCaptioningConfig:
    """BLIP: ``prompt`` is the decoder's text prefix, and ``max_length``/``min_length`` count its tokens
    (``[DEC] a picture of``), as BLIP's ``generate`` does. BLIP-2: ``prompt`` follows the query tokens into
    the LM (``"a photo of"``, or empty for prompt-less captions), and the lengths are passed to the LM as
    LAVIS's BLIP-2 ``generate`` passes ``max_len``/``min_len`` (:mod:`capvqa.models.blip2_captioner`)."""

    model: str = "Salesforce/blip-image-captioning-large"
    revision: str | None = None
    prompt: str = "a picture of "
    num_beams: int = 3
    max_length: int = 20  # counts the prompt tokens ([DEC] a picture of), as BLIP's generate does
    min_length: int = 5
    batch_size: int = non_semantic(16)

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_length <= self.max_length:
            raise ConfigError(
                f"need 0 <= min_length <= max_length, got {self.min_length} and {self.max_length}"
            )


@dataclass(frozen=True)
class ImageCaption:
    """A whole-image caption, without the prompt."""

    caption: str


class ImageCaptioning:
    NAME: ClassVar[str] = "image_captioning"
    VERSION: ClassVar[str] = "2"  # 2: the prompt cut as LAVIS cuts it (capvqa/models/blip_captioner.py texts)
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = ImageCaptioningConfig
    Output = ImageCaption

    def __init__(self, config: ImageCaptioningConfig | None = None, **overrides: Any) -> None:
        self.config = config or ImageCaptioningConfig(**overrides)
        self._captioner: BlipCaptioner | None = None
        self._blip2: Blip2Captioner | None = None
        self.captions_by_image: ImageMemo[str] = ImageMemo()

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        self.runtime = runtime
        self.captions_by_image = ImageMemo()
        ref = ModelRef(cfg.model, cfg.revision)
        if checkpoint_model_type(ref) == BLIP2_MODEL_TYPE:
            self._blip2 = load_blip2_captioner(ref, runtime, cfg.prompt)
            log.info("image captioning: BLIP-2 %s (%s LM), prompt %r, beam %d, length %d..%d (the LM's)",
                     cfg.model, "decoder-only" if self._blip2.decoder_only else "encoder-decoder", cfg.prompt,
                     cfg.num_beams, cfg.min_length, cfg.max_length)
            return
        self._captioner = load_blip_captioner(cfg.model, cfg.revision, runtime, cfg.prompt)
        log.info("image captioning: BLIP %s, beam %d, length %d..%d (prompt included)",
                 cfg.model, cfg.num_beams, cfg.min_length, cfg.max_length)

    def run(self, batch: Sequence[StageInput]) -> list[ImageCaption]:
        captions, image_index = self.captions_by_image.values(batch, self.caption_images)
        return [ImageCaption(caption=captions[i]) for i in image_index]

    @property
    def images_encoded(self) -> int:
        return self.captions_by_image.computed

    def caption_images(self, images: list) -> list[str]:
        """One beam-search caption per PIL image, in order."""
        cfg, captioner = self.config, self._captioner
        if self._blip2 is not None:
            return self._blip2.caption(images, num_beams=cfg.num_beams, max_length=cfg.max_length,
                                       min_length=cfg.min_length)
        image_embeds = captioner.encode_images(images)
        prompt_length = len(captioner.prompt_ids)
        input_ids = captioner.prompt_batch(len(images))
        with torch.inference_mode():
            output = captioner.model.text_decoder.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=input_ids.device),
                do_sample=False,
                num_beams=cfg.num_beams,
                max_new_tokens=max(cfg.max_length - prompt_length, 1),
                min_new_tokens=max(cfg.min_length - prompt_length, 0),
                repetition_penalty=1.0,
                eos_token_id=captioner.eos_id,
                pad_token_id=captioner.pad_id,
                # beams share their image's cross-attention keys and values: no copy per step
                **({"cache": beam_search_cache(captioner.model.text_decoder)} if cfg.num_beams > 1 else {}),
            )
        return captioner.texts(output)

    def cleanup(self) -> None:
        self._captioner = self._blip2 = None
        self.captions_by_image.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
