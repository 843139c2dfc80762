"""Question-image patch matching: GradCAM relevance on BLIP's ITM head (docs/methods.md#matching-gradcam).

Cost structure: the ViT runs once per distinct image without gradient (once, not once per batch:
:mod:`capvqa.data.image_memo`); only the text encoder runs with autograd, and only the gradient at one cross-attention map is requested (``torch.autograd.grad``), so
backward never touches the vision encoder or any weight gradient -- the relevance is identical to a
full backward pass at a fraction of the cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from capvqa.data.image_memo import ImageMemo, memo_encoded_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.models.blip_itm import load_blip_itm
from capvqa.ops.gradcam import gradcam_patch_relevance
from capvqa.text.pnp_vqa_formats import matching_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradCamMatchingConfig:
    model: str = "Salesforce/blip-itm-large-coco"
    revision: str | None = None
    checkpoint: str | None = None  # an original BLIP .pth (path or URL), converted into `model`
    block_num: int = 7
    max_text_tokens: int = 35
    max_question_words: int = 50
    enc_token_id: int | None = None  # None: the tokenizer's [ENC], else 30523 (BLIP's vocabulary)
    batch_size: int = non_semantic(16)


@dataclass(frozen=True)
class PatchRelevance:
    """GradCAM relevance of each image patch to the question (row-major over the patch grid)."""

    relevance: np.ndarray  # (P,) float32, unnormalised
    grid: list[int]  # [rows, cols]
    matching_text: str
    match_logit: float


class GradCamMatching:
    NAME: ClassVar[str] = "gradcam_matching"
    VERSION: ClassVar[str] = "2"  # 2: '?' stripped at both ends of the question, as LAVIS does
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = GradCamMatchingConfig
    Output = PatchRelevance

    def __init__(self, config: GradCamMatchingConfig | None = None, **overrides: Any) -> None:
        self.config = config or GradCamMatchingConfig(**overrides)
        self.itm: Any = None
        self.image_embeddings: ImageMemo[torch.Tensor] = ImageMemo()

    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.image_embeddings = ImageMemo()
        self.itm = load_blip_itm(self.config.model, self.config.revision, runtime, self.config.enc_token_id,
                                 self.config.checkpoint)
        text_config = self._model.config.text_config
        if not 0 <= self.config.block_num < text_config.num_hidden_layers:
            raise ValueError(
                f"block_num {self.config.block_num} is outside the text encoder's "
                f"{text_config.num_hidden_layers} layers"
            )
        self.grid = self.itm.grid
        log.info("matching: BLIP ITM %s, cross-attention layer %d, %dx%d patches",
                 self.config.model, self.config.block_num, *self.grid)

    @property
    def _model(self) -> Any:
        return self.itm.model

    @property
    def processor(self) -> Any:
        return self.itm.processor

    @property
    def enc_token_id(self) -> int:
        return self.itm.enc_token_id

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    def run(self, batch: Sequence[StageInput]) -> list[PatchRelevance]:
        unique_embeds, image_index = memo_encoded_images(self.image_embeddings, batch, self.itm.encode_images)
        texts = [matching_text(entry.item.question, self.config.max_question_words) for entry in batch]
        relevance, logits = self.relevance(unique_embeds, image_index, texts)
        return [
            PatchRelevance(relevance=relevance[i], grid=list(self.grid), matching_text=texts[i],
                           match_logit=float(logits[i]))
            for i in range(len(batch))
        ]

    @property
    def images_encoded(self) -> int:
        return self.image_embeddings.computed

    def relevance(
        self, unique_embeds: torch.Tensor, image_index: list[int], texts: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """GradCAM relevance (len(texts), P) and ITM match logits for each (image, text) pair, given the
        ViT embeddings of the distinct images and each text's image index."""
        model, device = self._model, self.runtime.device
        input_ids, text_mask = self.itm.text_inputs(texts, self.config.max_text_tokens)
        image_embeds = unique_embeds[torch.as_tensor(image_index, device=device)].clone()
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device)

        captured: dict[str, torch.Tensor] = {}
        attention_module = model.text_encoder.encoder.layer[self.config.block_num].crossattention.self

        def keep_probs(_module: Any, _args: Any, output: Any) -> None:
            captured["probs"] = output[1]

        hook = attention_module.register_forward_hook(keep_probs)
        try:
            with torch.enable_grad():
                # a leaf that requires grad puts the cross-attention maps on the autograd tape; it is
                # never differentiated itself, so no ViT or weight gradients are computed
                image_embeds.requires_grad_(True)
                text_out = model.text_encoder(
                    input_ids=input_ids,
                    attention_mask=text_mask,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_mask,
                )
                logits = model.itm_head(text_out[0][:, 0, :])
                probs = captured["probs"]
                (gradient,) = torch.autograd.grad(logits[:, 1].sum(), probs)
        finally:
            hook.remove()
        relevance = gradcam_patch_relevance(probs.detach().float(), gradient.float(), text_mask)
        return (
            relevance.cpu().numpy().astype(np.float32),
            logits[:, 1].detach().float().cpu().numpy(),
        )

    def cleanup(self) -> None:
        self.itm = None
        self.image_embeddings.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
