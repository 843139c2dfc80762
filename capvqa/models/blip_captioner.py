"""BLIP captioner model I/O shared by question-guided patch captioning and whole-image captioning.

Both stages load the same model class the same way (optionally from an original BLIP ``.pth``), encode
images with its ViT, decode from ``[DEC] prompt`` and strip the prompt from the text; only what the
decoder attends to (20 sampled patches, or the whole image) and how it decodes (seeded sampling, or beam
search) differ, and those stay in the stages. Seeded sampling from sampled patches
(:meth:`BlipCaptioner.sample_from_patches`) is shared by PNP-VQA's captioning and Img2LLM's in-loop
filtered captioning, which also needs the decoder ids and the patch memory each caption came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from capvqa.engine.runtime import Runtime
from capvqa.models.blip_vision_attention import use_fused_vision_attention
from capvqa.models.loading import ModelRef, load_model, load_processor
from capvqa.ops.seeded_sampling import SeededSamplingProcessor


@dataclass(frozen=True)
class SampledDecoding:
    """How captions are sampled: top-k/top-p with a repetition penalty, lengths counting the prompt
    tokens (``[DEC] a picture of`` is 4), as LAVIS's ``generate(min_length=..., max_length=...)``."""

    top_k: int
    top_p: float
    repetition_penalty: float
    min_length: int
    max_length: int

    @classmethod
    def of(cls, config: Any) -> SampledDecoding:
        """The decoding settings a captioning stage's config holds under these field names."""
        return cls(top_k=config.top_k, top_p=config.top_p, repetition_penalty=config.repetition_penalty,
                   min_length=config.min_length, max_length=config.max_length)


@dataclass(frozen=True)
class PatchDecoding:
    """One ``generate`` call over caption rows, each decoded from its own sampled patches.

    ``output_ids`` are the whole decoder sequences (prompt included, padding after ``[SEP]``);
    ``memory`` / ``memory_mask`` are the patch embeddings each row attended to (rows with fewer patches
    are padded and masked). Img2LLM's in-loop filter scores a caption against exactly this memory.
    """

    texts: list[str]
    output_ids: torch.Tensor
    memory: torch.Tensor
    memory_mask: torch.Tensor


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
        """Decoded captions without the prompt: the first ``len(prompt)`` characters cut, as LAVIS cuts
        them (``output[len(prompt):]``). Not a prefix match: when the first new word piece continues the
        prompt's last word ("of" + "##es" decodes as "ofes"), LAVIS's cut keeps "s", and so must we
        (tests/parity/test_blip_parity.py)."""
        decoded = self.processor.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        return [text[len(self.prompt):] for text in decoded]

    def sample_from_patches(
        self,
        image_embeds: torch.Tensor,
        row_images: Sequence[int],
        row_patches: Sequence[np.ndarray],
        row_seeds: Sequence[int],
        decoding: SampledDecoding,
    ) -> PatchDecoding:
        """Sample one caption per row from the patches ``row_patches[r]`` (0-based, CLS excluded) of image
        ``row_images[r]`` of ``image_embeds`` (N, 1+P, D), with the row's own random stream
        ``row_seeds[r]`` (:mod:`capvqa.ops.seeded_sampling`): a row's caption does not depend on the
        other rows."""
        device = self.runtime.device
        num_rows = len(row_images)
        width = max(len(p) for p in row_patches)
        # gather each row's patch embeddings (+1 skips the image CLS token); pad ragged rows and mask them
        gather_index = torch.zeros((num_rows, width), dtype=torch.long)
        memory_mask = torch.zeros((num_rows, width), dtype=torch.long)
        for r, patches in enumerate(row_patches):
            gather_index[r, : len(patches)] = torch.from_numpy(patches + 1)
            memory_mask[r, : len(patches)] = 1
        images = torch.as_tensor(list(row_images), device=device)
        memory = image_embeds[images[:, None], gather_index.to(device)]
        memory_mask = memory_mask.to(device)
        prompt_length = len(self.prompt_ids)
        input_ids = self.prompt_batch(num_rows)
        min_new = max(decoding.min_length - prompt_length, 0)
        sampler = SeededSamplingProcessor(np.asarray(row_seeds, dtype=np.uint64), prompt_length, decoding.top_k,
                                          decoding.top_p, eos_token_id=self.eos_id, min_new_tokens=min_new)
        from transformers import LogitsProcessorList

        with torch.inference_mode():
            output = self.model.text_decoder.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max(decoding.max_length - prompt_length, 0),
                min_new_tokens=0,  # the sampler bans EOS until min_length (see SeededSamplingProcessor)
                repetition_penalty=decoding.repetition_penalty,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([sampler]),
            )
        return PatchDecoding(texts=self.texts(output), output_ids=output, memory=memory, memory_mask=memory_mask)


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
