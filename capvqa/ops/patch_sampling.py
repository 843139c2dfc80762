"""Relevance-weighted patch sampling for question-guided captioning (PNP-VQA).

Each caption draw keeps ``num_patches`` image patches sampled without replacement with probability
proportional to their relevance (as ``torch.multinomial`` on unnormalised weights does in LAVIS). We use
the equivalent Gumbel-top-k form, vectorised over all draws of an item, with the item's own random
generator so an item's patches never depend on its batch.

Reproducibility. The draws are a function of (seed, item, relevance values), so they are bit-identical
whenever the relevance is: on one machine with the same software, batch size, world size and thread
count (and on any rerun over the same cache). Computed in another batch layout or on another CPU, an
item's relevance can differ in its last float32 bits (1e-7 to 1e-6 relative was seen on an AVX2-only
CPU); a draw then keeps other patches only if that swaps its k-th and (k+1)-th largest keys. A relative
difference ``eps`` moves a key (log weight + Gumbel noise) by about ``eps``, and the gap between those
two keys has a density of about k at zero, so a draw changes with probability about ``0.56 * k * eps``:
1e-5 per caption for k = 20 and eps = 1e-6, about one item in a thousand at 100 captions per item
(measured on 576 lognormal weights: 8e-4 per draw at eps = 1e-4, linear in eps). Rounding the weights to
a coarser grid first does not help -- fewer values differ, but by a whole grid step, and the expected
movement of the keys sets the rate (a 1e-3 relative grid gave 1.4x more changes) -- so it is not done.
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
