"""Model I/O of end-to-end vision-language models: one image and one prompt in, a short answer out.

Any ``AutoModelForImageTextToText`` checkpoint with its ``AutoProcessor`` (BLIP-2, InstructBLIP, LLaVA,
Qwen2-VL, Idefics2/3 in transformers 5; Qwen2-VL's without torchvision is
:class:`capvqa.models.qwen2_vl_image_processor.Qwen2VLImageOnlyProcessor`). What the prompts say lives in
:mod:`capvqa.text.vlm_prompts`; this module only batches, pads and decodes
(docs/methods.md#end-to-end-vision-language-models). It is the in-process (``hf``)
:class:`capvqa.llm.VisionLanguageBackend`; the served ones live in :mod:`capvqa.llm`.

Padding: a decoder-only language model is padded on the left, so every row's last position is its own
last prompt token and generation continues from there. An encoder-decoder one (BLIP-2 and InstructBLIP
with FLAN-T5) is padded on the right, as LAVIS does: the encoder reads the whole row, and T5's relative
positions between the query tokens and the text would shift with padding between them. BLIP-2 and
InstructBLIP's processors put the query-token placeholders in front of the padded text, so with OPT the
pads sit between the image and the text; they are masked, and OPT's positions count unmasked tokens only,
so each row is computed as without padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from capvqa.engine.runtime import Runtime
from capvqa.llm import VlmCompletion, VlmDecoding
from capvqa.models.loading import ModelRef, load_model, load_processor
from capvqa.text.vlm_prompts import VlmPromptFormat, render_prompt

log = logging.getLogger(__name__)

__all__ = ["VisionLanguageModel", "VlmCompletion", "VlmDecoding", "chat_template_of", "load_vision_language_model"]

#: model types whose processors take one list of images per prompt
_NESTED_IMAGE_TYPES = frozenset({"idefics2", "idefics3", "smolvlm"})


def chat_template_of(processor: Any) -> Callable[[list[dict[str, Any]]], str] | None:
    """Renders a message list with the processor's chat template and the generation prompt, or None when
    the processor has no template. The vLLM backend renders with it too, so both feed the same text."""
    if not getattr(processor, "chat_template", None):
        return None

    def render(messages: list[dict[str, Any]]) -> str:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return render


class VisionLanguageModel:
    """A loaded image-text-to-text model and its processor, in eval mode: the in-process (``hf``)
    :class:`capvqa.llm.VisionLanguageBackend`."""

    def __init__(self, model: Any, processor: Any, device: torch.device, name: str = "hf") -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.name = name
        self.model_type: str = str(getattr(model.config, "model_type", ""))
        self.decoder_only: bool = not bool(getattr(model.config.get_text_config(), "is_encoder_decoder", False))
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left" if self.decoder_only else "right"
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def chat_template(self) -> Callable[[list[dict[str, Any]]], str] | None:
        """Renders a message list with the generation prompt, or None when the processor has no template."""
        return chat_template_of(self.processor)

    def render(self, fmt: VlmPromptFormat, question: str) -> str:
        """The exact text the processor gets for ``question`` (the processor's chat template applied)."""
        return render_prompt(fmt, question, self.chat_template)

    def newline_id(self) -> int:
        """The first token of ``"\n"`` without special tokens (how LAVIS finds BLIP-2 OPT's eos)."""
        return int(self.tokenizer("\n", add_special_tokens=False).input_ids[0])

    def _inputs(self, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        nested = self.model_type in _NESTED_IMAGE_TYPES
        image_arg: list[Any] = [[image] for image in images] if nested else list(images)
        encoded = self.processor(images=image_arg, text=list(prompts), padding=True, return_tensors="pt")
        dtype = self.model.dtype
        inputs = {}
        for key, value in encoded.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(dtype)  # pixel values in the model's precision
            inputs[key] = value
        return inputs

    def generate(
        self, images: Sequence[Any], prompts: Sequence[str], decoding: VlmDecoding
    ) -> list[VlmCompletion]:
        """One completion per (image, prompt) pair, in order, decoded deterministically in one batch."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not prompts:
            return []
        inputs = self._inputs(images, prompts)
        extra: dict[str, Any] = {}
        if decoding.newline_ends:
            extra["eos_token_id"] = self.newline_id()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=decoding.num_beams,
                max_new_tokens=decoding.max_new_tokens,
                length_penalty=decoding.length_penalty,
                pad_token_id=self._pad_id,
                **extra,
            )
        # a decoder-only model returns the prompt ids in front of the new ones
        new_ids = output[:, inputs["input_ids"].shape[1]:] if self.decoder_only else output
        tokenizer = self.tokenizer
        start_id = getattr(self.model.config.get_text_config(), "decoder_start_token_id", None)
        ends = self.newline_id() if decoding.newline_ends else tokenizer.eos_token_id
        special = {i for i in (self._pad_id, ends, start_id) if i is not None}
        texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        counts = [sum(1 for token in row.tolist() if token not in special) for row in new_ids]
        return [VlmCompletion(text=text, num_tokens=count) for text, count in zip(texts, counts)]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_vision_language_model(
    ref: ModelRef, runtime: Runtime, *, device_map: str | None = None, trust_remote_code: bool = False
) -> VisionLanguageModel:
    """``AutoModelForImageTextToText`` + its processor (:func:`load_vision_processor`) from a hub id or
    folder, in the run's dtype."""
    from transformers import AutoModelForImageTextToText

    extra: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    processor = load_vision_processor(ref, **extra)
    if device_map:
        extra["device_map"] = device_map
    model = load_model(AutoModelForImageTextToText, ref, device=runtime.device, dtype=runtime.dtype, **extra)
    device = next(model.parameters()).device
    return VisionLanguageModel(model, processor, device, name=f"hf:{ref.id}")


def load_vision_processor(ref: ModelRef, **extra: Any) -> Any:
    """The checkpoint's ``AutoProcessor``; for Qwen2-VL without torchvision, its image-only processor
    (every backend that renders prompts or encodes images locally loads it this way)."""
    from transformers import AutoProcessor

    try:
        return load_processor(AutoProcessor, ref, **extra)
    except ImportError as error:
        return _image_only_processor(ref, error, **extra)


def _image_only_processor(ref: ModelRef, error: ImportError, **extra: Any) -> Any:
    """Qwen2-VL's processor without its video processor, when ``AutoProcessor`` failed for want of
    torchvision (transformers 5 builds Qwen2-VL's video processor on it); any other ImportError, or
    another model type, is raised as it was. capvqa feeds one image per prompt, so nothing is lost."""
    from transformers import AutoConfig

    from capvqa.models.qwen2_vl_image_processor import (
        QWEN2_VL_MODEL_TYPES,
        Qwen2VLImageOnlyProcessor,
        needs_torchvision,
    )

    if not needs_torchvision(error):
        raise error
    config = AutoConfig.from_pretrained(ref.id, **ref.pretrained_kwargs(), **extra)
    model_type = getattr(config, "model_type", "")
    if model_type not in QWEN2_VL_MODEL_TYPES:
        raise error
    log.warning("%s: transformers' %s processor needs torchvision for videos, which is not installed; "
                "loading its image processor, tokenizer and chat template only (videos unavailable)",
                ref.id, model_type)
    return load_processor(Qwen2VLImageOnlyProcessor, ref, **extra)
