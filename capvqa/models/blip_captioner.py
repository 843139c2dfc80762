"""BLIP captioner model I/O shared by question-guided patch captioning and whole-image captioning.

Both stages load the same model class the same way (optionally from an original BLIP ``.pth``), encode
images with its ViT, decode from ``[DEC] prompt`` and strip the prompt from the text; only what the
decoder attends to (20 sampled patches, or the whole image) and how it decodes (seeded sampling, or beam
search) differ, and those stay in the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from capvqa.engine.runtime import Runtime
from capvqa.models.blip_vision_attention import use_fused_vision_attention
from capvqa.models.loading import ModelRef, load_model, load_processor


@dataclass
class BlipCaptioner:
    """A loaded BLIP captioner with its decoding prompt as token ids."""

    processor: Any
    model: Any
    prompt: str
    prompt_ids: list[int]  # [DEC] followed by the prompt's word pieces
    eos_id: int
    pad_id: int
    runtime: Runtime

    @property
    def num_image_patches(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def encode_images(self, images: list) -> torch.Tensor:
        """ViT embeddings (N, 1+P, D) of decoded images, without gradient."""
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return self.model.vision_model(pixel_values=pixel_values.to(self.runtime.device, self.runtime.dtype))[0]

    def prompt_batch(self, rows: int) -> torch.Tensor:
        """The prompt ids repeated for ``rows`` decoder rows, on the runtime device."""
        return torch.tensor([self.prompt_ids] * rows, device=self.runtime.device)

    def texts(self, output_ids: torch.Tensor) -> list[str]:
        """Decoded captions without the prompt words."""
        decoded = self.processor.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        prefix = self.prompt.strip()
        return [text.removeprefix(prefix).strip() for text in decoded]


def load_blip_captioner(
    model_id: str, revision: str | None, runtime: Runtime, prompt: str, checkpoint: str | None = None
) -> BlipCaptioner:
    """The captioner ``model_id``, or -- with ``checkpoint`` -- an original BLIP ``.pth`` (path or URL)
    converted once into ``model_id``'s architecture and processor."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    ref = ModelRef(model_id, revision)
    if checkpoint:  # the paper's COCO-train2014 BLIP, converted into the hub architecture
        from capvqa.models.blip_checkpoint import ensure_blip_model

        ref = ModelRef(str(ensure_blip_model(checkpoint, "captioner", ref)))
    processor = load_processor(BlipProcessor, ref)
    model = load_model(BlipForConditionalGeneration, ref, device=runtime.device, dtype=runtime.dtype)
    use_fused_vision_attention(model)
    text_config = model.config.text_config
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    # HF BLIP: [CLS] prompt [SEP] -> [DEC] prompt (the decoder's BOS replaces CLS, SEP dropped)
    return BlipCaptioner(
        processor=processor,
        model=model,
        prompt=prompt,
        prompt_ids=[text_config.bos_token_id, *prompt_ids[1:-1]],
        eos_id=text_config.sep_token_id,
        pad_id=text_config.pad_token_id,
        runtime=runtime,
    )
