"""Frozen language models behind one small interface: prompts in, greedy completions out, aligned.

Two kinds of backend implement :class:`LLMBackend`:

* :mod:`capvqa.llm.huggingface` runs a causal LM (OPT, Llama, ...) or a seq2seq LM (FLAN-T5, ...) locally
  with batched greedy decoding;
* :mod:`capvqa.llm.openai_api` calls an OpenAI-compatible ``/completions`` endpoint (OpenAI, vLLM, TGI,
  llama.cpp server) with the standard library only.

Both return, per prompt, the completion *cut at the first stop string* and the summed log-probability of
the tokens that produced the kept text (see :func:`covering_prefix_length`), so the ensemble of PICa and
the single answer of Img2LLM read the same numbers whichever backend ran. This module holds the value
objects and the pure helpers both backends share; it imports nothing heavy.

The context length a local model respects when none is configured is decided here too
(:func:`default_context_length`), so that a stage fitting a prompt *before* the answer stage
(Img2LLM's, :func:`smallest_context_length`) never allows more than the backend will.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Completion",
    "GenerationSettings",
    "LLMBackend",
    "covering_prefix_length",
    "cut_at_stop",
    "default_context_length",
    "kept_completion",
    "smallest_context_length",
]

# Tokenizers without a known limit report ~1e30 (transformers' VERY_LARGE_INTEGER): "not set".
UNSET_MAX_LENGTH = 10**8
# config attributes that hold a model's number of learned/rotary positions, in the order they are read
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: always greedy; at most ``max_new_tokens`` new tokens; cut at the first of ``stop``."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One prompt's greedy completion.

    ``text`` is the generated text (special tokens removed) cut before the first stop string; ``logprob``
    sums the log-probabilities of the ``num_tokens`` generated tokens that produced ``text`` (None when an
    API returned none); ``prompt_tokens_dropped`` counts prompt tokens removed from the left so that the
    prompt plus ``max_new_tokens`` fit the model's context (0 when nothing was removed or not known).
    ``token_ids`` are those tokens, when the backend knows them (local models), for inspection and tests.
    """

    text: str
    logprob: float | None
    num_tokens: int
    prompt_tokens_dropped: int = 0
    token_ids: tuple[int, ...] | None = None


@runtime_checkable
class LLMBackend(Protocol):
    """Greedy completion of many prompts; results aligned to ``prompts``."""

    name: str

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]: ...

    def close(self) -> None: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest occurrence of any stop string, and whether one occurred.

    "Earliest" is by position in the text, not by order in ``stop``: with stops ("\\n", ".") the text
    "a.b\\nc" is cut to "a".
    """
    positions = [text.find(s) for s in stop if s]
    positions = [p for p in positions if p >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


def covering_prefix_length(prefix_texts: Sequence[str], text: str) -> int:
    """How many generated tokens produced ``text``: the smallest k whose decoded prefix covers it.

    ``prefix_texts[k - 1]`` is the decoding of the first k generated tokens. A token that straddles the
    stop string (e.g. "dog." when the stop is ".") counts, because it produced kept characters; tokens
    made only of the stop string or of what follows it do not. This is what PICa sums ("token
    log-probabilities until the newline token") and it is the same rule for local and API backends.
    An empty ``text`` is produced by no token (sum 0). When no prefix starts with ``text`` (byte-level
    tokens that decode to replacement characters until a later token completes them), the first prefix
    at least as long as ``text`` is taken; failing that, all tokens.
    """
    if not text:
        return 0
    for k, prefix in enumerate(prefix_texts, start=1):
        if prefix.startswith(text):
            return k
    for k, prefix in enumerate(prefix_texts, start=1):
        if len(prefix) >= len(text):
            return k
    return len(prefix_texts)


def kept_completion(
    decode: Callable[[Sequence[int]], str], tokens: Sequence[int], token_logprobs: Sequence[float],
    stop: Sequence[str],
) -> tuple[list[int], float, str]:
    """(kept token ids, their summed log-probability, kept text) of one generated row.

    ``tokens`` are the generated ids up to (excluding) end-of-sequence and ``token_logprobs`` theirs;
    ``decode`` turns ids into text without special tokens. The text is cut at the first stop string and
    the tokens that produced it are those of :func:`covering_prefix_length`. Every local backend ends
    its rows here, so they keep and score the same tokens.
    """
    text, _ = cut_at_stop(decode(tokens), stop)
    kept = covering_prefix_length([decode(tokens[:k]) for k in range(1, len(tokens) + 1)], text)
    return list(tokens[:kept]), float(sum(token_logprobs[:kept])), text


# ---------------------------------------------------------------------------------------------------
# Context length


def tokenizer_limit(tokenizer_max_length: int | None) -> int | None:
    """A tokenizer's ``model_max_length`` when it is a real limit (None for the ~1e30 "not set")."""
    if isinstance(tokenizer_max_length, int) and 0 < tokenizer_max_length < UNSET_MAX_LENGTH:
        return tokenizer_max_length
    return None


def position_limits(model_config: Any) -> list[int]:
    """Every positive position limit the model config declares (:data:`POSITION_ATTRIBUTES`), the
    config's own before its text config's (multimodal configs keep the LM's in ``get_text_config()``)."""
    if model_config is None:
        return []
    configs = [model_config]
    text_config = getattr(model_config, "get_text_config", None)
    if callable(text_config):
        configs.append(text_config())
    limits = []
    for config in configs:
        for attribute in POSITION_ATTRIBUTES:
            value = getattr(config, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                limits.append(value)
    return limits


def default_context_length(model_config: Any, tokenizer_max_length: int | None, kind: str) -> int | None:
    """The context length a local backend respects when none is configured (None: no known limit).

    A causal LM's is its number of learned/rotary positions from the config (``max_position_embeddings``
    and its aliases, the first one found), else the tokenizer's ``model_max_length``. A seq2seq LM (T5 has
    relative positions and no hard limit) uses the tokenizer's ``model_max_length``, the input length it
    was trained with.
    """
    if kind == "seq2seq":
        return tokenizer_limit(tokenizer_max_length)
    positions = position_limits(model_config)
    return positions[0] if positions else tokenizer_limit(tokenizer_max_length)


def smallest_context_length(model_config: Any, tokenizer_max_length: int | None) -> int | None:
    """The smallest limit the config or the tokenizer declares (None when neither does).

    Never more than :func:`default_context_length` of either kind, so a prompt fitted to it minus the
    answer's tokens is never truncated by the answer stage, whichever backend kind it resolves to.
    """
    limits = [*position_limits(model_config), tokenizer_limit(tokenizer_max_length)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None
