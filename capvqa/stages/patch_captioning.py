"""Question-guided patch captioning with the BLIP captioner (docs/methods.md#question-guided-captioning).

Each distinct image is encoded once. For every caption draw, ``num_patches`` patch embeddings are
sampled by relevance and fed alone as the decoder's cross-attention memory; all draws of all items in a
batch decode together in a few ``generate`` calls (KV cache on). Sampling randomness is per item and per
draw (:mod:`capvqa.ops.seeded_sampling`), so an item's captions do not depend on its batch.

Distinct-caption filling follows LAVIS -- each round draws ``num_captions`` candidates per unfinished
item and keeps those that are not a substring of a caption already kept -- with a cap on the number of
rounds (LAVIS loops forever on degenerate models); how many rounds and draws ran is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from capvqa.data.images import distinct_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.models.blip_captioner import BlipCaptioner, load_blip_captioner
from capvqa.ops.patch_sampling import item_rng, sample_patch_sets
from capvqa.ops.seeded_sampling import SeededSamplingProcessor, row_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchCaptioningConfig:
    model: str = "Salesforce/blip-image-captioning-large"
    revision: str | None = None
    checkpoint: str | None = None  # an original BLIP .pth (path or URL), converted into `model`
    prompt: str = "a picture of "
    num_captions: int = 100
    num_patches: int = 20
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_length: int = 10  # counts the prompt tokens ([DEC] a picture of), as in LAVIS
    max_length: int = 20
    max_rounds: int = 10
    seed: int = 42
    batch_size: int = non_semantic(8)
    max_rows_per_generate: int = non_semantic(1600)

    def __post_init__(self) -> None:
        if self.num_captions < 1 or self.num_patches < 1 or self.max_rounds < 1:
            raise ValueError("captioning: num_captions, num_patches and max_rounds must be >= 1")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"captioning: need min_length <= max_length, got {self.min_length} > {self.max_length}")


@dataclass(frozen=True)
class Captions:
    """Distinct question-guided captions of one item, in the order they were kept."""

    captions: list[str]
    rounds: int
    draws: int
    patches_per_caption: int


class PatchCaptioning:
    NAME: ClassVar[str] = "patch_captioning"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("relevance",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = PatchCaptioningConfig
    Output = Captions

    def __init__(self, config: PatchCaptioningConfig | None = None, **overrides: Any) -> None:
        self.config = config or PatchCaptioningConfig(**overrides)
        self._captioner: BlipCaptioner | None = None

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        self.runtime = runtime
        self._captioner = load_blip_captioner(cfg.model, cfg.revision, runtime, cfg.prompt, cfg.checkpoint)
        log.info("captioning: BLIP %s, %d captions x %d patches per question",
                 cfg.model, cfg.num_captions, cfg.num_patches)

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    def run(self, batch: Sequence[StageInput]) -> list[Captions]:
        cfg = self.config
        images, image_index = distinct_images(batch)
        relevance = [np.asarray(entry.upstream["relevance"].relevance) for entry in batch]
        for entry, weights in zip(batch, relevance):
            if weights.shape[0] != self._captioner.num_image_patches:
                raise ValueError(
                    f"question {entry.item.question_id}: relevance has {weights.shape[0]} patches but the "
                    f"captioner's ViT has {self._captioner.num_image_patches}; matching and captioning models must "
                    "share the image size and patch size"
                )
        image_embeds = self._captioner.encode_images(images)

        rngs = [item_rng(cfg.seed, entry.item_key, "patches") for entry in batch]
        kept: list[list[str]] = [[] for _ in batch]
        draws = [0] * len(batch)
        rounds = [0] * len(batch)
        patches_used = [0] * len(batch)
        for round_index in range(cfg.max_rounds):
            active = [i for i in range(len(batch)) if len(kept[i]) < cfg.num_captions]
            if not active:
                break
            rows_item, rows_patches, rows_seed = [], [], []
            for i in active:
                patch_sets = sample_patch_sets(relevance[i], cfg.num_patches, cfg.num_captions, rngs[i])
                patches_used[i] = patch_sets.shape[1]
                for d in range(cfg.num_captions):
                    rows_item.append(i)
                    rows_patches.append(patch_sets[d])
                    rows_seed.append(row_seed(cfg.seed, batch[i].item_key, round_index * cfg.num_captions + d))
                rounds[i] += 1
                draws[i] += cfg.num_captions
            texts = self._decode_rows(image_embeds, image_index, rows_item, rows_patches, rows_seed)
            for i, caption in zip(rows_item, texts):
                if len(kept[i]) >= cfg.num_captions or not caption:
                    continue
                if not any(caption in previous for previous in kept[i]):
                    kept[i].append(caption)
        return [
            Captions(captions=kept[i], rounds=rounds[i], draws=draws[i], patches_per_caption=patches_used[i])
            for i in range(len(batch))
        ]

    def _decode_rows(
        self,
        image_embeds: torch.Tensor,
        image_index: list[int],
        rows_item: list[int],
        rows_patches: list[np.ndarray],
        rows_seed: list[int],
    ) -> list[str]:
        """Caption every row (one patch subset each) in chunks of ``max_rows_per_generate``."""
        texts: list[str] = []
        step = self.config.max_rows_per_generate
        for start in range(0, len(rows_item), step):
            stop = start + step
            texts.extend(
                self._generate(image_embeds, image_index, rows_item[start:stop], rows_patches[start:stop],
                               rows_seed[start:stop])
            )
        return texts

    def _generate(self, image_embeds, image_index, rows_item, rows_patches, rows_seed) -> list[str]:
        cfg, device = self.config, self.runtime.device
        num_rows = len(rows_item)
        width = max(len(p) for p in rows_patches)
        # gather each row's patch embeddings (+1 skips the image CLS token); pad ragged rows and mask them
        gather_index = torch.zeros((num_rows, width), dtype=torch.long)
        memory_mask = torch.zeros((num_rows, width), dtype=torch.long)
        for r, patches in enumerate(rows_patches):
            gather_index[r, : len(patches)] = torch.from_numpy(patches + 1)
            memory_mask[r, : len(patches)] = 1
        row_images = torch.as_tensor([image_index[i] for i in rows_item], device=device)
        memory = image_embeds[row_images[:, None], gather_index.to(device)]
        captioner = self._captioner
        prompt_length = len(captioner.prompt_ids)
        input_ids = captioner.prompt_batch(num_rows)
        min_new = max(cfg.min_length - prompt_length, 0)
        sampler = SeededSamplingProcessor(np.asarray(rows_seed, dtype=np.uint64), prompt_length, cfg.top_k,
                                          cfg.top_p, eos_token_id=captioner.eos_id, min_new_tokens=min_new)
        from transformers import LogitsProcessorList

        with torch.inference_mode():
            output = captioner.model.text_decoder.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max(cfg.max_length - prompt_length, 0),
                min_new_tokens=0,  # the sampler bans EOS until min_length (see SeededSamplingProcessor)
                repetition_penalty=cfg.repetition_penalty,
                eos_token_id=captioner.eos_id,
                pad_token_id=captioner.pad_id,
                logits_processor=LogitsProcessorList([sampler]),
            )
        return captioner.texts(output)

    def cleanup(self) -> None:
        self._captioner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
