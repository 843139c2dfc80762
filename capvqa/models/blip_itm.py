"""BLIP image-text matching model I/O shared by GradCAM matching and caption filtering.

BLIP's ITM head reads text encoded with the ``[ENC]`` token in place of ``[CLS]`` (LAVIS does this;
Hugging Face's ``BlipForImageTextRetrieval.forward`` does not, and leaving ``[CLS]`` shifts the match
logits by up to 0.36), so every ITM caller tokenises through :meth:`BlipItm.text_inputs` -- or, for text
that is already decoder output (Img2LLM's in-loop caption filter), :func:`itm_inputs_from_decoder_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from capvqa.engine.runtime import Runtime
from capvqa.models.blip_vision_attention import use_fused_vision_attention
from capvqa.models.loading import ModelRef, load_model, load_processor

BLIP_ENC_TOKEN_ID = 30523


@dataclass
class BlipItm:
    processor: Any
    model: Any
    enc_token_id: int
    runtime: Runtime

    @property
    def grid(self) -> list[int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return [side, side]

    def encode_images(self, images: list) -> torch.Tensor:
        """ViT embeddings (N, 1+P, D) of distinct images, without gradient."""
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return self.model.vision_model(pixel_values=pixel_values.to(self.runtime.device, self.runtime.dtype))[0]

    def text_inputs(self, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids with ``[ENC]`` at position 0 and the attention mask, truncated identically."""
        tokens = self.processor.tokenizer(
            texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(self.runtime.device)
        input_ids[:, 0] = self.enc_token_id
        return input_ids, tokens["attention_mask"].to(self.runtime.device)

    def match_probabilities(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor,
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        """P(match) per row (float32, on the model's device): softmax of the ITM head over the text
        encoder's first position, the text cross-attending to ``memory`` (rows, keys, vision width)."""
        with torch.inference_mode():
            hidden = self.model.text_encoder(
                input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
            )[0]
            logits = self.model.itm_head(hidden[:, 0, :]).float()
            return torch.softmax(logits, dim=-1)[:, 1]


def itm_inputs_from_decoder_ids(
    output_ids: torch.Tensor, prompt_length: int, enc_token_id: int, pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM text input made from captioner decoder output, as LAVIS's Img2Prompt caption filter does
    (``BlipITM.itm_rank``; docs/methods.md#captions-and-the-itm-filter).

    ``output_ids`` (rows, L) start with the decoder prompt (``[DEC] a picture of``, ``prompt_length`` = 4
    tokens). The text keeps positions ``prompt_length - 1`` onwards -- ``[DEC] a picture`` dropped -- with
    the first kept id (the prompt's last word, "of") overwritten by ``[ENC]``; the mask is "id is not
    padding", so the ``[SEP]`` that ended a caption is attended to and the padding after it is not.
    LAVIS slices at the fixed position 3, which is ``prompt_length - 1`` for its prompt. Returns new
    tensors (``output_ids`` is left unchanged).
    """
    if not 1 <= prompt_length <= output_ids.shape[1]:
        raise ValueError(f"prompt_length {prompt_length} must be between 1 and the sequence length {output_ids.shape[1]}")
    input_ids = output_ids[:, prompt_length - 1 :].clone()
    attention_mask = (input_ids != pad_token_id).long()
    input_ids[:, 0] = enc_token_id
    return input_ids, attention_mask


def load_blip_itm(
    model_id: str, revision: str | None, runtime: Runtime, enc_token_id: int | None = None,
    checkpoint: str | None = None,
) -> BlipItm:
    """The ITM model ``model_id``, or -- with ``checkpoint`` -- an original BLIP ``.pth`` (path or URL)
    converted once into ``model_id``'s architecture and processor."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    ref = ModelRef(model_id, revision)
    if checkpoint:
        from capvqa.models.blip_checkpoint import ensure_blip_model

        ref = ModelRef(str(ensure_blip_model(checkpoint, "itm", ref)))
    processor = load_processor(BlipProcessor, ref)
    model = load_model(BlipForImageTextRetrieval, ref, device=runtime.device, dtype=runtime.dtype)
    use_fused_vision_attention(model)
    resolved = enc_token_id if enc_token_id is not None else _enc_token_id(processor.tokenizer, model)
    return BlipItm(processor=processor, model=model, enc_token_id=resolved, runtime=runtime)


def _enc_token_id(tokenizer: Any, model: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    if token_id is not None and token_id != tokenizer.unk_token_id:
        return int(token_id)
    if model.config.text_config.vocab_size > BLIP_ENC_TOKEN_ID:
        return BLIP_ENC_TOKEN_ID
    raise ValueError(
        "the ITM tokenizer has no [ENC] token and the vocabulary is smaller than BLIP's; set enc_token_id "
        "explicitly"
    )
