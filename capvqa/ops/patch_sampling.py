"""Relevance-weighted patch sampling for question-guided captioning (PNP-VQA).

Each caption draw keeps ``num_patches`` image patches sampled without replacement with probability
proportional to their relevance (as ``torch.multinomial`` on unnormalised weights does in LAVIS). We use
the equivalent Gumbel-top-k form, vectorised over all draws of an item, with the item's own random
generator so an item's patches never depend on its batch.
"""

from __future__ import annotations

import hashlib

import numpy as np


def item_rng(seed: int, item_key: str, purpose: str) -> np.random.Generator:
    """A random generator that is a function of (seed, item, purpose) only."""
    digest = hashlib.sha256(f"{seed}\0{item_key}\0{purpose}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype=np.uint32))


def sample_patch_sets(
    relevance: np.ndarray, num_patches: int, num_draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Patch indices (0-based over the P patches, CLS excluded), shape (num_draws, k), each row sorted.

    Patches with zero relevance are never drawn. When fewer than ``num_patches`` patches have positive
    relevance, every draw keeps all of them (k is smaller); when none has, patches are drawn uniformly.
    """
    weights = np.asarray(relevance, dtype=np.float64)
    if weights.ndim != 1:
        raise ValueError(f"relevance must be 1-D (P,), got shape {weights.shape}")
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    if not weights.any():
        weights = np.ones_like(weights)
    k = min(num_patches, int(np.count_nonzero(weights)))
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    keys = log_weights[None, :] + rng.gumbel(size=(num_draws, weights.shape[0]))
    chosen = np.argpartition(-keys, kth=k - 1, axis=1)[:, :k]
    return np.sort(chosen, axis=1)
