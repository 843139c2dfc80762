"""GradCAM patch relevance from one cross-attention map of BLIP's ITM text encoder (PNP-VQA).

Pure tensor math, separate from model I/O so it can be tested on hand-made tensors. The rule
(docs/methods.md#matching-gradcam, as in LAVIS ``compute_gradcam``): drop the image-CLS key, mask
both the attention probabilities A and their gradients G by the text attention mask, clamp G at 0,
average A*G over heads, then average over the text tokens 1..n-2 (skipping the leading [ENC] token and
the final [SEP]).
"""

from __future__ import annotations

import torch


def gradcam_patch_relevance(
    attention: torch.Tensor, gradient: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """Per-patch relevance, shape (B, P), from A and dA of shape (B, heads, T, 1+P) and a (B, T) mask.

    No normalisation is applied: the captioner samples patches proportionally to these raw values.
    """
    if attention.shape != gradient.shape:
        raise ValueError(f"attention {tuple(attention.shape)} and gradient {tuple(gradient.shape)} differ")
    if attention.dim() != 4 or text_mask.shape != attention.shape[:1] + attention.shape[2:3]:
        raise ValueError(
            f"expected attention (B, heads, T, 1+P) and mask (B, T); got {tuple(attention.shape)} and "
            f"{tuple(text_mask.shape)}"
        )
    mask = text_mask.to(attention.dtype)[:, None, :, None]
    cams = attention[..., 1:] * mask
    grads = gradient[..., 1:].clamp(min=0) * mask
    per_token = (cams * grads).mean(dim=1)  # (B, T, P)
    # tokens 1..n-2 where n = number of real tokens: [ENC] at 0 and the final [SEP] are excluded
    num_words = text_mask.sum(dim=1).to(torch.long) - 2
    positions = torch.arange(per_token.shape[1], device=per_token.device)[None, :]
    word_mask = (positions >= 1) & (positions <= num_words[:, None])
    summed = (per_token * word_mask[..., None].to(per_token.dtype)).sum(dim=1)
    return summed / num_words.clamp(min=1)[:, None].to(summed.dtype)
