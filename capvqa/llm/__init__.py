"""Frozen language models behind one small interface: prompts in, greedy completions out, aligned.

Two kinds of backend implement :class:`LLMBackend`:

* :mod:`capvqa.llm.huggingface` runs a causal LM (OPT, Llama, ...) or a seq2seq LM (FLAN-T5, ...) locally
  with batched greedy decoding;
* :mod:`capvqa.llm.openai_api` calls an OpenAI-compatible ``/completions`` endpoint (OpenAI, vLLM, TGI,
  llama.cpp server) with the standard library only.

Both return, per prompt, the completion *cut at the first stop string*, whether a stop string cut it
(``Completion.stopped``), the summed log-probability of the tokens that produced the kept text (see
:func:`covering_prefix_length`; what Img2LLM records) and every generated token, as text, with its
log-probability, through the one that ended generation (``Completion.generated_tokens``; what PICa's
ensemble score reads, :func:`logprob_until_newline`), so each method reads the same numbers whichever
backend ran. This module holds the value objects and the pure helpers both backends share; it imports
nothing heavy.

The context length a local model respects when none is configured is decided here too
(:func:`default_context_length`), so that a stage fitting a prompt *before* the answer stage
(Img2LLM's, :func:`smallest_context_length`) never allows more than the backend will.

**Segmented prompts.** A prompt may come with *segments*: strings whose concatenation is the prompt and
that a local backend tokenises one by one, concatenating the ids (:func:`encode_segments`). This is how
the Img2LLM authors fed OPT (their instruction tokenised on its own, then the rest), so OPT sees its BOS
``</s>`` at the start of each segment. Precisely: every segment contributes the special tokens the
tokenizer puts *before* a text (OPT's and Llama's BOS) and its own tokens; the special tokens it puts
*after* a text (T5's EOS) come once, after the last segment. So a tokenizer that adds no BOS (T5,
GPT-2) gets no repeated special token, and the only effect of the split is that no token spans a segment
boundary (a SentencePiece tokenizer also starts each segment as it starts a text, e.g. with its
word-start marker). An empty segment contributes nothing. An API backend receives text only: it sends
the joined prompt, and the repeated BOS cannot be expressed there.

**Image+text requests.** End-to-end vision-language models (docs/methods.md#served-vision-language-models)
go through :class:`VisionLanguageBackend`: one image and one prompt per request, a short answer back
(:class:`VlmCompletion`), decoded as :class:`VlmDecoding` says. The Hugging Face model in-process
(:class:`capvqa.models.vlm.VisionLanguageModel`), vLLM's offline engine
(:class:`capvqa.llm.vllm_backend.VLLMVisionBackend`) and an OpenAI-compatible chat completions server
(:class:`capvqa.llm.openai_api.OpenAIChatVisionClient`) implement it. Each renders the family's prompt
itself (:meth:`VisionLanguageBackend.render`), because where the chat template is applied differs: a
local backend applies the processor's template and its model reads that text; a server applies its own,
so the client sends the family's user turn (image, then text) as chat messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from capvqa.errors import ConfigError

__all__ = [
    "Completion",
    "GenerationSettings",
    "LLMBackend",
    "Segments",
    "VisionLanguageBackend",
    "VlmCompletion",
    "VlmDecoding",
    "check_greedy",
    "check_segments",
    "covering_prefix_length",
    "cut_at_stop",
    "default_context_length",
    "encode_segments",
    "generated_through_end",
    "generation_end",
    "kept_completion",
    "logprob_until_newline",
    "smallest_context_length",
    "split_special_tokens",
    "token_texts",
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
    ``stopped`` says whether generation ended at a stop string, so that ``text`` was cut there (False:
    it ran to ``max_new_tokens`` or to end-of-sequence, or no stop strings were given); Img2LLM's answer
    rule needs it because the cut removed the "." or line break the reference looks for. Local backends
    take it from :func:`kept_completion`; the API backend from the response
    (:func:`capvqa.llm.openai_api.completion_from_response`). It defaults to True, so a backend that does
    not report it is treated as before the flag existed (as if cut at a stop string).

    ``generated_tokens`` and ``generated_logprobs`` are every generated token in order, as text, and its
    log-probability, *through the token that ended generation* (the one that completed a stop string,
    or end-of-sequence, which a local backend has scored too); an API's are the ``logprobs.tokens`` and
    ``token_logprobs`` the server listed, as they are. PICa's ensemble score is read from them
    (:func:`logprob_until_newline`). None when the backend does not report them (an API without
    per-token log-probabilities, or a backend written before the fields existed).
    """

    text: str
    logprob: float | None
    num_tokens: int
    prompt_tokens_dropped: int = 0
    token_ids: tuple[int, ...] | None = None
    stopped: bool = True
    generated_tokens: tuple[str, ...] | None = None
    generated_logprobs: tuple[float, ...] | None = None


Segments = Sequence[str]  # one prompt as strings tokenised one by one (see the module docstring)


@runtime_checkable
class LLMBackend(Protocol):
    """Greedy completion of many prompts; results aligned to ``prompts``.

    ``segments``, when given, is aligned to ``prompts``: None for a plain prompt, else that prompt's
    segments (their concatenation is the prompt; see the module docstring). Callers pass it only when
    some prompt is segmented, so a backend written before segments existed keeps working for plain
    prompts.
    """

    name: str

    def complete(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        segments: Sequence[Segments | None] | None = None,
    ) -> list[Completion]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class VlmDecoding:
    """How a vision-language model decodes answers: deterministic (greedy, or beam search when
    ``num_beams`` > 1; served backends decode greedily only). ``newline_ends`` makes the token of
    ``"\n"`` the end-of-sequence token instead of the model's eos, as LAVIS's BLIP-2 OPT generates
    (``Blip2OPT.eos_token_id``)."""

    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    newline_ends: bool = False


@dataclass(frozen=True)
class VlmCompletion:
    """The decoded new text of one image+text request and how many tokens produced it (eos and padding
    excluded; an API backend reports the server's ``usage.completion_tokens``)."""

    text: str
    num_tokens: int


@runtime_checkable
class VisionLanguageBackend(Protocol):
    """Short answers about images; results aligned to the requests (see the module docstring).

    ``render(fmt, question)`` is the prompt text of ``question`` in the family's format ``fmt`` (a
    :class:`capvqa.text.vlm_prompts.VlmPromptFormat`) as this backend passes it on: a local backend's is
    the exact text its model reads (chat template applied), an API backend's the user turn's text (the
    server applies its template). ``generate(images, prompts, decoding)`` answers ``prompts[i]`` (as
    ``render`` made them) about ``images[i]`` (decoded RGB ``PIL.Image`` s).
    """

    name: str

    def render(self, fmt: Any, question: str) -> str: ...

    def generate(
        self, images: Sequence[Any], prompts: Sequence[str], decoding: VlmDecoding
    ) -> list[VlmCompletion]: ...

    def close(self) -> None: ...


def check_greedy(decoding: VlmDecoding, backend: str) -> None:
    """A served backend decodes greedily: beam search (``num_beams`` > 1) is refused with what to set."""
    if decoding.num_beams != 1:
        raise ConfigError(
            f"vlm backend {backend!r} decodes greedily only, but num_beams is {decoding.num_beams}; set "
            "num_beams 1 (e.g. --set vlm.num_beams=1; the BLIP-2 and InstructBLIP configs use LAVIS's beam 5) "
            "or use backend hf"
        )


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
    made only of the stop string or of what follows it do not. It is the same rule for local and API
    backends, and what ``Completion.logprob`` (Img2LLM's recorded log-probability) sums. It is *not*
    PICa's rule, which also counts a token that merely contains the line break ("\\n\\n", ".\\n"):
    see :func:`logprob_until_newline`. An empty ``text`` is produced by no token (sum 0). When no
    prefix starts with ``text`` (byte-level tokens that decode to replacement characters until a later
    token completes them), the first prefix at least as long as ``text`` is taken; failing that, all
    tokens.
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


def logprob_until_newline(tokens: Sequence[str], token_logprobs: Sequence[float | None]) -> float:
    """PICa's ensemble score of one completion: its token log-probabilities summed in order, stopping
    before the first token that *is* a line break ("\\n", compared whole).

    This is the reference's rule (``microsoft/PICa`` ``gpt3_api_okvqa.py``), applied to the tokens the
    backend reports through the one that ended generation (``Completion.generated_tokens``). So a token
    that merely contains the line break ("\\n\\n", ".\\n") counts, and so does every token before a
    line break that comes later or not at all (the API's listed tokens as they are; a local model's
    end-of-sequence token). An immediate "\\n" scores 0. A missing value (None, as some servers give
    for a token they did not score) adds nothing.
    """
    total = 0.0
    for token, value in zip(tokens, token_logprobs):
        if token == "\n":
            break
        if value is not None:
            total += float(value)
    return total


def token_texts(decode: Callable[[Sequence[int]], str], tokens: Sequence[int]) -> list[str]:
    """Each generated token as text, the way an API lists it: what it adds to the decoded text of the
    tokens before it (so a SentencePiece token keeps its leading space, and "\\n" is "\\n" whatever
    the tokenizer's own spelling, e.g. GPT-2's "Ċ" or Llama's "<0x0A>"). A token whose prefix decoding
    does not extend the previous one (a byte-level piece of a character) is decoded alone; a special
    token (end-of-sequence) is "" -- neither is ever a line break.
    """
    texts, before = [], ""
    for k in range(1, len(tokens) + 1):
        after = decode(tokens[:k])
        texts.append(after[len(before) :] if after.startswith(before) else decode(tokens[k - 1 : k]))
        before = after
    return texts


def generation_end(
    decode: Callable[[Sequence[int]], str], tokens: Sequence[int], eos_ids: frozenset[int],
    stop: Sequence[str],
) -> int:
    """How many of a local row's generated ``tokens`` were generated before the model stopped: through
    the first whose decoded prefix contains a stop string (what the backends' stop check looks at) or
    the first end-of-sequence, whichever comes first; all of them when neither occurs.

    A batched ``generate`` pads a finished row until the others finish; this cuts that padding off and
    keeps the token that ended the row, so it is scored as an API that stopped there would list it.
    """
    stops = tuple(s for s in stop if s)
    for k, token in enumerate(tokens, start=1):
        if token in eos_ids or (stops and any(s in decode(tokens[:k]) for s in stops)):
            return k
    return len(tokens)


def generated_through_end(
    decode: Callable[[Sequence[int]], str], tokens: Sequence[int], token_logprobs: Sequence[float],
    eos_ids: frozenset[int], stop: Sequence[str],
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """A local row's ``Completion.generated_tokens`` and ``generated_logprobs``: its tokens as text
    (:func:`token_texts`) and their log-probabilities through the one that ended it
    (:func:`generation_end`)."""
    end = generation_end(decode, tokens, eos_ids, stop)
    return tuple(token_texts(decode, tokens[:end])), tuple(float(v) for v in token_logprobs[:end])


def kept_completion(
    decode: Callable[[Sequence[int]], str], tokens: Sequence[int], token_logprobs: Sequence[float],
    stop: Sequence[str],
) -> tuple[list[int], float, str, bool]:
    """(kept token ids, their summed log-probability, kept text, whether a stop string cut it) of one
    generated row.

    ``tokens`` are the generated ids up to (excluding) end-of-sequence and ``token_logprobs`` theirs;
    ``decode`` turns ids into text without special tokens. The text is cut at the first stop string and
    the tokens that produced it are those of :func:`covering_prefix_length`. A row that ended at
    end-of-sequence before any stop string is not stopped (its ids were cut at the end-of-sequence
    before they came here). Every local backend ends its rows here, so they keep and score the same
    tokens and say ``stopped`` alike.
    """
    text, stopped = cut_at_stop(decode(tokens), stop)
    kept = covering_prefix_length([decode(tokens[:k]) for k in range(1, len(tokens) + 1)], text)
    return list(tokens[:kept]), float(sum(token_logprobs[:kept])), text, stopped


# ---------------------------------------------------------------------------------------------------
# Segmented prompts


def check_segments(
    prompts: Sequence[str], segments: Sequence[Segments | None] | None
) -> list[tuple[str, ...] | None]:
    """``segments`` aligned to ``prompts`` (all None when not given), each checked to join to its prompt.

    A mismatch is a bug in the stage that built the prompt; it raises ValueError naming the prompt.
    """
    if segments is None:
        return [None] * len(prompts)
    if len(segments) != len(prompts):
        raise ValueError(f"{len(segments)} segment lists for {len(prompts)} prompts")
    checked: list[tuple[str, ...] | None] = []
    for index, (prompt, parts) in enumerate(zip(prompts, segments)):
        if parts is None:
            checked.append(None)
            continue
        if isinstance(parts, str) or any(not isinstance(part, str) for part in parts):
            raise ValueError(f"prompt {index}: segments must be a list of strings, got {parts!r}")
        if "".join(parts) != prompt:
            raise ValueError(
                f"prompt {index}: its segments do not join to the prompt text "
                f"({''.join(parts)[:60]!r}... vs {prompt[:60]!r}...)"
            )
        checked.append(tuple(parts))
    return checked


def split_special_tokens(ids: Sequence[int], content_ids: Sequence[int]) -> tuple[int, int] | None:
    """(number of special tokens before, after) the content in a text's ids, or None when ``content_ids``
    (the text tokenised without special tokens) does not occur in ``ids`` (with them) as one run."""
    n = len(content_ids)
    content = list(content_ids)
    for start in range(len(ids) - n + 1):
        if list(ids[start : start + n]) == content:
            return start, len(ids) - start - n
    return None


def encode_segments(tokenizer: Any, segments: Sequence[str]) -> tuple[list[int], int, int]:
    """Token ids of a segmented prompt (see the module docstring), with how many special tokens lead
    and trail them (what left-truncation keeps).

    Each segment is tokenised on its own with and without special tokens to tell its special prefix and
    suffix from its content. A segment without tokens of its own (empty, or whitespace a tokenizer
    drops) contributes nothing; a tokenizer whose special tokens cannot be told apart that way (the
    content does not occur in one run) has that segment's ids used whole. A prompt without any token of
    its own is tokenised as the empty text.
    """
    parts = [part for part in segments if part]
    full = tokenizer(parts, add_special_tokens=True)["input_ids"] if parts else []
    plain = tokenizer(parts, add_special_tokens=False)["input_ids"] if parts else []
    pieces = [(list(ids), list(content)) for ids, content in zip(full, plain) if content]
    if not pieces:
        ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        return ids, len(ids), 0
    out: list[int] = []
    head, suffix = 0, []
    for index, (ids, content) in enumerate(pieces):
        split = split_special_tokens(ids, content)
        before, after = split if split is not None else (0, 0)
        if index == 0:
            head = before
        out.extend(ids[: len(ids) - after])
        suffix = ids[len(ids) - after :]
    out.extend(suffix)  # the last segment's trailing special tokens only
    return out, head, len(suffix)


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
