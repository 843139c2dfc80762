"""Answering with an end-to-end vision-language model: the one stage of BLIP-2, InstructBLIP, LLaVA and
Qwen2-VL pipelines (docs/methods.md#end-to-end-vision-language-models).

The model sees the image and the question, asked in its family's VQA prompt
(:mod:`capvqa.text.vlm_prompts`: plain text for BLIP-2 and InstructBLIP, a user turn rendered by the
model's chat template for LLaVA, Qwen2-VL and Idefics), and decodes a short answer deterministically:
greedy by default, beam search where the family's evaluation used it (``num_beams``, ``length_penalty``,
``newline_ends``: BLIP-2 and InstructBLIP's LAVIS configs use 5 beams, with length penalty -1 for FLAN-T5,
and 0 and the line break as end of sequence for OPT). A batch's items are decoded together
(:class:`capvqa.models.vlm.VisionLanguageModel`: left padding for decoder-only LMs), under
``torch.inference_mode``, in the run's dtype (bf16/fp16 on CUDA). The answer is the first line of the
decoded text (:func:`capvqa.text.vlm_prompts.clean_answer`); OK-VQA's lemmatisation, which LAVIS applies
to BLIP-2's answers, is the evaluator's ``--lemmatize`` as for every method.

The record keeps the exact prompt text the processor got (chat template applied), the raw decoded text
and its token count, so a run's records show what the model read and wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from capvqa.data.images import distinct_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.models.vlm import VisionLanguageModel, VlmDecoding, load_vision_language_model
from capvqa.text.vlm_prompts import FAMILY_MODEL_TYPES, clean_answer, prompt_format, render_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLMAnswerConfig:
    """``prompt_format`` names the family's VQA prompt (:data:`capvqa.text.vlm_prompts.PROMPT_FORMATS`);
    it is stated in the pipeline, not guessed from the model, so a swapped model keeps the cache key
    honest (setup warns when the model is of another family). ``max_new_tokens``, ``num_beams`` and
    ``length_penalty`` are the decoding, and ``newline_ends`` makes the line break the end-of-sequence
    token instead of the model's eos (LAVIS's BLIP-2 OPT); ``device_map`` (e.g. "auto") spreads a large model over
    devices and cannot change an answer."""

    model: str = "Salesforce/blip2-flan-t5-xl"
    revision: str | None = None
    prompt_format: str = "blip2"
    max_new_tokens: int = 10
    num_beams: int = 1
    length_penalty: float = 1.0
    newline_ends: bool = False
    device_map: str | None = non_semantic(None)
    trust_remote_code: bool = non_semantic(False)
    batch_size: int = non_semantic(8)

    def __post_init__(self) -> None:
        prompt_format(self.prompt_format)  # raises on an unknown name
        if self.max_new_tokens < 1:
            raise ConfigError(f"vlm_answer: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"vlm_answer: num_beams must be >= 1, got {self.num_beams}")
        if self.batch_size < 1:
            raise ConfigError(f"vlm_answer: batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class VLMAnswer:
    """The answer, the decoded text it was cut from, the exact prompt text, and how many tokens the
    model generated."""

    answer: str
    raw: str
    prompt: str
    num_tokens: int


class VLMAnswerer:
    NAME: ClassVar[str] = "vlm_answer"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = VLMAnswerConfig
    Output = VLMAnswer

    def __init__(
        self, config: VLMAnswerConfig | None = None, *, vlm: VisionLanguageModel | None = None, **overrides: Any
    ) -> None:
        """``vlm`` injects a loaded model (tests); setup then loads nothing."""
        self.config = config or VLMAnswerConfig(**overrides)
        self.format = prompt_format(self.config.prompt_format)
        self._vlm = vlm
        self._injected = vlm is not None

    @property
    def decoding(self) -> VlmDecoding:
        cfg = self.config
        return VlmDecoding(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                           length_penalty=cfg.length_penalty, newline_ends=cfg.newline_ends)

    @property
    def vlm(self) -> VisionLanguageModel:
        if self._vlm is None:
            raise RuntimeError("VLMAnswerer.setup() must run before run()")
        return self._vlm

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        if self._vlm is None:
            from capvqa.models.loading import ModelRef

            self._vlm = load_vision_language_model(
                ModelRef(cfg.model, cfg.revision), runtime, device_map=cfg.device_map,
                trust_remote_code=cfg.trust_remote_code,
            )
        vlm = self.vlm
        expected = FAMILY_MODEL_TYPES.get(self.format.name, ())
        if expected and vlm.model_type not in expected:
            log.warning("vlm: prompt format %r is for %s models, but %s is a %r model",
                        self.format.name, "/".join(expected), cfg.model, vlm.model_type)
        if self.format.chat and vlm.chat_template is None:
            log.warning("vlm: %s has no chat template; prompts use the %r format's plain form",
                        cfg.model, self.format.name)
        log.info("vlm: %s (%s, %s LM), prompt %r, %s <= %d new tokens", cfg.model, vlm.model_type,
                 "decoder-only" if vlm.decoder_only else "encoder-decoder", self.format.name,
                 "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}", cfg.max_new_tokens)

    def prompt_for(self, question: str) -> str:
        """The exact text the processor gets for ``question``."""
        return render_prompt(self.format, question, self.vlm.chat_template)

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    def run(self, batch: Sequence[StageInput]) -> list[VLMAnswer]:
        images, image_index = distinct_images(batch)
        prompts = [self.prompt_for(entry.item.question) for entry in batch]
        completions = self.vlm.generate([images[i] for i in image_index], prompts, self.decoding)
        return [
            VLMAnswer(answer=clean_answer(c.text), raw=c.text, prompt=prompt, num_tokens=c.num_tokens)
            for prompt, c in zip(prompts, completions)
        ]

    def cleanup(self) -> None:
        if not self._injected:
            self._vlm = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
