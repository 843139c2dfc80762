"""Fused attention for BLIP's ViT at inference.

transformers' ``BlipAttention`` is hand-written eager attention: it materialises the (heads, 577, 577)
score matrix of every image at 384 px, scales it, softmaxes it and multiplies it back -- about a third
of ViT-L's time on a CPU (profiled with ``capvqa bench``) and the same share of memory traffic on a
GPU. ``torch.nn.functional.scaled_dot_product_attention`` computes the same function in one fused
kernel (flash attention on CPU and GPU). Same weights, same math, float-rounding differences only.

We swap the class of each vision attention module for a subclass whose ``forward`` calls SDPA. It
returns no attention probabilities (no capvqa stage reads the ViT's; the models are private to their
stages), and it falls back to the eager parent while training (dropout on probabilities).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.nn import functional

log = logging.getLogger(__name__)

_REQUIRED = ("qkv", "projection", "num_heads", "head_dim", "scale")


def _fused_forward(self: Any, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
    if self.training:
        return super(type(self), self).forward(hidden_states, **kwargs)
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


@functools.cache
def _fused_class() -> type:
    from transformers.models.blip.modeling_blip import BlipAttention

    return type("FusedBlipAttention", (BlipAttention,), {"forward": _fused_forward, "__module__": __name__})


def use_fused_vision_attention(model: Any) -> int:
    """Switch every ``BlipAttention`` inside ``model`` to fused attention; returns how many were switched.

    Only modules of exactly transformers' ``BlipAttention`` class with the attributes the fused forward
    reads are switched, so a future transformers that changes the module (or already fuses it) is left
    alone rather than broken.
    """
    from transformers.models.blip.modeling_blip import BlipAttention

    fused_class = _fused_class()
    switched = 0
    for module in model.modules():
        if type(module) is BlipAttention and all(hasattr(module, name) for name in _REQUIRED):
            module.__class__ = fused_class
            switched += 1
    if switched:
        log.debug("BLIP vision: fused SDPA attention in %d layers", switched)
    return switched
