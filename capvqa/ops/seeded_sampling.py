"""Top-k / top-p sampling whose randomness belongs to each sequence, not to the batch.

Hugging Face ``generate(do_sample=True)`` draws from the global torch generator, so a caption depends on
every other row in the batch (and on batch size, GPU count, resumption). Here each row carries a 64-bit
seed; the uniform number for row r at step t is a counter-based hash of (seed_r, t), and the token is
chosen by inverse-CDF over the filtered distribution. The logits processor then leaves only that token
finite, and greedy decoding picks it: same distribution as sampling, batch-independent results.

Reproducibility. A token is a function of (row seed, step, logits), so captions are bit-identical
whenever the logits are: on one machine with the same software, batch layout and thread count. Logits
computed in another batch layout or on another machine can differ in their last float32 bits; a token
then changes only if the uniform number falls between a CDF boundary and its moved position (or two
near-tied tokens swap places). Averaged over the uniform, that probability is the total movement of the
CDF plus the swaps: for a relative logit difference ``delta``, about ``10 * delta`` per token for a
peaked, BLIP-like distribution, ``70 * delta`` for a moderate one and up to ``250 * delta`` for flat ones
(computed over synthetic 30k-word vocabularies with top-k 50; the random-weight tiny zoo measured
``80 * delta``). At delta = 1e-6 that is 1e-5 to 2.5e-4 per token: one caption in a few hundred to a few
thousand differs (a caption samples up to 16 tokens and differs from the first changed one on), so at
100 captions per item roughly 1-10% of the items (more where distributions are flat) have a caption that
differs; whether the answer follows depends on the reader. Neither rounding the
probabilities to a coarser grid (2-10x more changes) nor laying the CDF out in token-id order (no gain
for peaked and moderate distributions, 2-4x for flat ones) is worth changing every cached caption for,
so neither is done. These rates are for float32 on a CPU; half precision on a GPU was not measured.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def row_seed(seed: int, item_key: str, draw: int) -> int:
    """The 64-bit seed of one sampled sequence (one caption draw of one item)."""
    digest = hashlib.sha256(f"{seed}\0{item_key}\0caption\0{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (values + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def step_uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per row, a pure function of (row seed, step)."""
    with np.errstate(over="ignore"):
        mixed = _splitmix64(seeds.astype(np.uint64) ^ _splitmix64(np.full(seeds.shape, step, dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def choose_tokens(scores: torch.Tensor, uniforms: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Token ids (rows,) drawn by inverse CDF from top-k/top-p filtered softmax(scores)."""
    k = min(top_k, scores.shape[-1]) if top_k > 0 else scores.shape[-1]
    top_scores, top_ids = scores.float().topk(k, dim=-1)  # sorted descending
    probs = torch.softmax(top_scores, dim=-1)
    if top_p < 1.0:
        cumulative = probs.cumsum(dim=-1)
        keep = (cumulative - probs) < top_p  # always keeps the most likely token
        probs = probs * keep
    cdf = probs.cumsum(dim=-1)
    targets = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    position = torch.searchsorted(cdf, targets, right=True).clamp(max=k - 1)
    # skip zero-probability tails that searchsorted can land on through rounding
    position = torch.minimum(position, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return top_ids.gather(-1, position).squeeze(-1)


class SeededSamplingProcessor:
    """A ``generate`` logits processor implementing per-row seeded top-k/top-p sampling.

    Use with ``do_sample=False``; it must run after the length/penalty processors, which is where
    ``generate`` appends user processors. It overwrites the scores it is given (generate's own copy).
    """

    def __init__(
        self, seeds: np.ndarray, prompt_length: int, top_k: int, top_p: float,
        eos_token_id: int | None = None, min_new_tokens: int = 0,
    ) -> None:
        """``min_new_tokens``: EOS is banned until that many tokens are generated (done here rather than
        by ``generate``'s own min-length processors, which would each pass over the full logits again)."""
        self.seeds = np.asarray(seeds, dtype=np.uint64)
        self.prompt_length = prompt_length
        self.top_k = top_k
        self.top_p = top_p
        self.eos_token_id = eos_token_id
        self.min_new_tokens = min_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != self.seeds.shape[0]:
            raise RuntimeError("seeded sampling expects one seed per generated row (no beams, no expansion)")
        step = input_ids.shape[1] - self.prompt_length
        # ``scores`` is generate's own per-step copy of the logits, so it is overwritten in place rather
        # than cloned: at 400 rows x 30,524 words each full-size temporary is 49 MB per decoding step.
        if self.eos_token_id is not None and step < self.min_new_tokens:
            scores[:, self.eos_token_id] = float("-inf")
        uniforms = torch.from_numpy(step_uniforms(self.seeds, step)).to(scores.device)
        tokens = choose_tokens(scores, uniforms, self.top_k, self.top_p)
        return scores.fill_(float("-inf")).scatter_(1, tokens[:, None], 0.0)
