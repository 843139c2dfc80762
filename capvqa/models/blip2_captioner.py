"""BLIP-2 whole-image captioning model I/O: PICa's query and pool captions from BLIP-2
(docs/methods.md#query-context-caption-and-tags).

BLIP-2 captions as LAVIS's BLIP-2 COCO captioning evaluation does
(``lavis/projects/blip2/eval/caption_coco_flant5xl_eval.yaml`` and ``caption_coco_opt2.7b_eval.yaml``: 5
beams, ``max_len`` 30, ``min_len`` 8; the prompt ``"a photo of"`` is the caption models' own,
``lavis/configs/models/blip2/blip2_caption_flant5xl.yaml``): the Q-Former's query tokens, then the prompt,
go into the LM, which continues with the caption; an empty prompt is BLIP-2's prompt-less captioning.
The caption is the decoded new text, without the prompt, stripped. How the lengths reach the LM follows
LAVIS's ``generate``:

- FLAN-T5 (``Blip2T5.generate``): ``max_new_tokens=max_len`` and ``min_length=min_len``, the latter
  counting the decoder's start token;
- OPT (``Blip2OPT.generate``): the token of ``"\\n"`` ends a caption (``Blip2OPT.eos_token_id``); LAVIS
  passes ``max_length``/``min_length`` with the prompt given as embeddings, which transformers versions
  count differently, so capvqa counts both as new tokens (docs/methods.md#deviations-in-pica).

Any ``Blip2ForConditionalGeneration`` checkpoint loads (``Salesforce/blip2-*``, the COCO-finetuned
``*-coco`` ones included) with its ``Blip2Processor``. Which captioner a caption stage runs follows from
its checkpoint's architecture (:func:`checkpoint_model_type`), whose identity is in the stage's cache key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from capvqa.engine.runtime import Runtime
from capvqa.models.loading import ModelRef, load_model, load_processor

#: transformers' ``model_type`` of BLIP-2 checkpoints
BLIP2_MODEL_TYPE = "blip-2"


def checkpoint_model_type(ref: ModelRef) -> str:
    """The ``model_type`` in the checkpoint's ``config.json`` (hub id or folder), read without weights."""
    from transformers import AutoConfig

    return str(load_processor(AutoConfig, ref).model_type)


@dataclass
class Blip2Captioner:
    """A loaded BLIP-2 with its processor and captioning prompt, in eval mode."""

    processor: Any
    model: Any
    prompt: str
    runtime: Runtime

    @property
    def decoder_only(self) -> bool:
        return not bool(getattr(self.model.config.get_text_config(), "is_encoder_decoder", False))

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def newline_id(self) -> int:
        """The first token of ``"\\n"`` without special tokens (LAVIS's ``Blip2OPT.eos_token_id``)."""
        return int(self.tokenizer("\n", add_special_tokens=False).input_ids[0])

    def length_arguments(self, max_length: int, min_length: int) -> dict[str, int]:
        """The length settings ``generate`` gets, as LAVIS passes them for the model's LM (module doc)."""
        if self.decoder_only:
            return {"max_new_tokens": max_length, "min_new_tokens": min_length, "eos_token_id": self.newline_id()}
        return {"max_new_tokens": max_length, "min_length": min_length}

    def caption(self, images: Sequence[Any], *, num_beams: int, max_length: int, min_length: int) -> list[str]:
        """One deterministic caption per PIL image, in order (every row has the same prompt: no padding)."""
        if not images:
            return []
        encoded = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt")
        inputs = {}
        for key, value in encoded.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.runtime.device)
                if value.is_floating_point():
                    value = value.to(self.model.dtype)
            inputs[key] = value
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, num_beams=num_beams, repetition_penalty=1.0,
                                         length_penalty=1.0, pad_token_id=pad_id,
                                         **self.length_arguments(max_length, min_length))
        # a decoder-only LM returns the query placeholders and the prompt in front of the caption
        new_ids = output[:, inputs["input_ids"].shape[1]:] if self.decoder_only else output
        return [text.strip() for text in tokenizer.batch_decode(new_ids, skip_special_tokens=True)]


def load_blip2_captioner(ref: ModelRef, runtime: Runtime, prompt: str) -> Blip2Captioner:
    """``Blip2ForConditionalGeneration`` + ``Blip2Processor`` from a hub id or folder, in the run's dtype."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = load_processor(Blip2Processor, ref)
    model = load_model(Blip2ForConditionalGeneration, ref, device=runtime.device, dtype=runtime.dtype)
    return Blip2Captioner(processor=processor, model=model, prompt=prompt, runtime=runtime)
