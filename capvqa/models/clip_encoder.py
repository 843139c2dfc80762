"""CLIP model I/O: L2-normalised text and image features, shared by PICa's example selection and the
CLIP tags stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from capvqa.data.items import ImageRef
from capvqa.engine.runtime import Runtime
from capvqa.models.loading import ModelRef, load_model, load_processor


class ClipEncoder:
    """L2-normalised CLIP text and image features (float32), batched.

    transformers v5 returns a ``BaseModelOutputWithPooling`` from ``get_*_features``; the projected
    features are its ``pooler_output``.
    """

    def __init__(self, model: Any, processor: Any, runtime: Runtime) -> None:
        self.model = model
        self.processor = processor
        self.runtime = runtime
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, ref: ModelRef, runtime: Runtime) -> ClipEncoder:
        from transformers import CLIPModel, CLIPProcessor

        processor = load_processor(CLIPProcessor, ref)
        model = load_model(CLIPModel, ref, device=runtime.device, dtype=runtime.dtype)
        return cls(model, processor, runtime)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    def encode_texts(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        """(len(texts), D) on the runtime device; texts longer than CLIP's 77 positions are truncated."""
        chunks = []
        for start in range(0, len(texts), max(1, batch_size)):
            tokens = self.processor.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(self.runtime.device)
            with torch.inference_mode():
                output = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            chunks.append(_normalised(output))
        return _concat(chunks, self.model.config.projection_dim, self.runtime.device)

    def encode_images(self, images: Sequence[Any], batch_size: int) -> torch.Tensor:
        """(len(images), D) for decoded PIL images."""
        chunks = []
        for start in range(0, len(images), max(1, batch_size)):
            chunks.append(self._encode_image_batch(list(images[start : start + batch_size])))
        return _concat(chunks, self.model.config.projection_dim, self.runtime.device)

    def encode_image_refs(self, refs: Sequence[ImageRef], batch_size: int) -> torch.Tensor:
        """Like :meth:`encode_images`, decoding only one batch of images at a time (pools are large)."""
        from capvqa.data.images import load_image

        chunks = []
        for start in range(0, len(refs), max(1, batch_size)):
            images = [load_image(ref) for ref in refs[start : start + batch_size]]
            chunks.append(self._encode_image_batch(images))
        return _concat(chunks, self.model.config.projection_dim, self.runtime.device)

    def _encode_image_batch(self, images: list[Any]) -> torch.Tensor:
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            output = self.model.get_image_features(
                pixel_values=pixel_values.to(self.runtime.device, self.runtime.dtype)
            )
        return _normalised(output)


def _normalised(output: Any) -> torch.Tensor:
    features = getattr(output, "pooler_output", output)
    return torch.nn.functional.normalize(features.float(), dim=-1)


def _concat(chunks: list[torch.Tensor], dim: int, device: torch.device) -> torch.Tensor:
    if not chunks:
        return torch.zeros((0, dim), dtype=torch.float32, device=device)
    return torch.cat(chunks)
