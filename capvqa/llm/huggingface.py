"""Local Hugging Face language models: batched greedy completion with stop strings and log-probabilities.

Causal LMs (OPT, Llama, ...) are fed left-padded batches, so every row's next token sits in the last
column and one ``generate`` call serves prompts of different lengths; the attention mask (and the
position ids the model derives from it) makes a padded row compute what it would alone. Seq2seq LMs
(FLAN-T5, ...) take right-padded encoder inputs, as they were trained. Within a call, prompts are sorted
by length (longest first) and cut into groups of ``prompts_per_generate``, so padding stays small and an
out-of-memory error shows on the first group; results are put back in input order.

Decoding is greedy. A stopping criterion marks a row finished once its decoded text contains a stop
string (or the model emits end-of-sequence), and generation ends when every row is finished or
``max_new_tokens`` is reached. Afterwards each row is cut at its first end-of-sequence and its decoded
text at the first stop string (``Completion.stopped`` says whether one cut it: a row that ended at
end-of-sequence or ran to ``max_new_tokens`` first is not stopped, whatever it would have generated
next); the completion's log-probability is the sum, over the generated tokens
that produced the kept text (:func:`capvqa.llm.covering_prefix_length`), of log-softmax of the model's
raw logits (``output_logits``, i.e. before any logits processor) at the chosen token. Every generated
token through the one that ended the row -- the token that completed a stop string, or end-of-sequence
-- is also returned as text with that log-probability (``Completion.generated_tokens``, what PICa's
ensemble score reads); the padding a finished row gets while others still run is not.

The context rule of Img2LLM (prompt + answer <= context length) is enforced by left-truncating a causal
LM's prompt to ``context_length - max_new_tokens`` tokens, keeping the tokenizer's special prefix (e.g.
OPT's ``</s>``); for a seq2seq LM the encoder input is left-truncated to ``context_length``. The number of
dropped tokens is returned with each completion, so it is recorded with the answer. A segmented prompt
(:mod:`capvqa.llm`: Img2LLM's instruction tokenised on its own, so OPT sees BOS twice) is tokenised
segment by segment and then truncated by the same rule, its first BOS kept. Img2LLM's prompt
stage has already fitted its prompt to this same budget (it reads the answer stage's ``max_new_tokens``
and ``context_length`` when the pipeline loads), so there truncation is only the last resort for a
question that does not fit even alone; PICa's prompts are not fitted beforehand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from capvqa.engine.runtime import Runtime
from capvqa.errors import ConfigError, ModelLoadError
from capvqa.llm import (
    Completion,
    GenerationSettings,
    Segments,
    check_segments,
    default_context_length,
    encode_segments,
    generated_through_end,
    kept_completion,
    split_special_tokens,
)
from capvqa.models.loading import ModelRef, load_model, load_processor

log = logging.getLogger(__name__)

LM_KINDS = ("causal", "seq2seq")


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def resolve_lm_kind(requested: str, is_encoder_decoder: bool) -> str:
    """ "causal" or "seq2seq": as requested, or for "auto" from the model config's ``is_encoder_decoder``."""
    if requested == "auto":
        return "seq2seq" if is_encoder_decoder else "causal"
    if requested not in LM_KINDS:
        raise ConfigError(f"unknown LM kind {requested!r}; use auto, {', '.join(LM_KINDS)}")
    return requested


def keep_end(ids: Sequence[int], head: int, tail: int, limit: int) -> tuple[list[int], int]:
    """Fit token ids into ``limit`` tokens by dropping tokens from the left of what lies between the
    ``head`` leading and ``tail`` trailing special tokens, which are kept. Returns the kept ids and how
    many were dropped; raises ConfigError when even the special tokens do not fit."""
    if len(ids) <= limit:
        return list(ids), 0
    keep = limit - head - tail
    if keep <= 0:
        raise ConfigError(
            f"a prompt cannot be fitted into {limit} tokens: raise context_length or lower max_new_tokens"
        )
    middle = list(ids[head : len(ids) - tail])
    return [*ids[:head], *middle[len(middle) - keep :], *ids[len(ids) - tail :]], len(middle) - keep


def left_truncate(ids: list[int], content_ids: list[int], limit: int) -> tuple[list[int], int]:
    """Fit a tokenized prompt into ``limit`` tokens by dropping content tokens from the left.

    ``ids`` is the prompt tokenized with special tokens, ``content_ids`` without; the special prefix and
    suffix around the content (OPT's leading ``</s>``, T5's trailing ``</s>``) are kept, because a model
    has only ever seen its inputs framed so. Returns the kept ids and how many content tokens were
    dropped. Raises ConfigError when even the special tokens do not fit. When the content does not occur
    in ``ids`` as one run (a tokenizer that merged specials into it), the last ``limit`` tokens are kept.
    """
    if len(ids) <= limit:
        return list(ids), 0
    head, tail = split_special_tokens(ids, content_ids) or (0, 0)
    return keep_end(ids, head, tail, limit)


def prompt_token_limit(context_length: int, answer_tokens: int) -> int:
    """Most prompt tokens that leave ``answer_tokens`` of room in ``context_length``."""
    limit = context_length - answer_tokens
    if limit <= 0:
        raise ConfigError(
            f"context_length {context_length} leaves no room for a prompt with max_new_tokens {answer_tokens}"
        )
    return limit


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    limit: int | None,
    context_length: int | None,
    segments: Sequence[Segments | None] | None = None,
) -> list[tuple[list[int], int]]:
    """Token ids of each prompt (with special tokens), left-truncated to ``limit`` tokens, with the
    number of tokens dropped; a warning says how many were cut.

    A plain prompt is tokenised whole and truncated by :func:`left_truncate`. A segmented prompt
    (``segments[i]`` not None) is tokenised by :func:`capvqa.llm.encode_segments` and truncated the same
    way: its first segment's leading special tokens and its trailing ones are kept and tokens are
    dropped from the left of the rest, so the first segment (Img2LLM's instruction, with the second BOS
    after it) goes first. Img2LLM's prompt stage fits its prompts so that this does not happen.
    """
    checked = check_segments(prompts, segments)
    plain = [i for i, parts in enumerate(checked) if parts is None]
    ids: dict[int, list[int]] = {}
    framing: dict[int, tuple[int, int]] = {}
    if plain:
        rows = tokenizer([prompts[i] for i in plain], add_special_tokens=True)["input_ids"]
        ids.update((i, list(row)) for i, row in zip(plain, rows))
    for i, parts in enumerate(checked):
        if parts is not None:
            ids[i], head, tail = encode_segments(tokenizer, parts)
            framing[i] = (head, tail)
    if limit is None:
        return [(ids[i], 0) for i in range(len(prompts))]
    too_long = [i for i in range(len(prompts)) if len(ids[i]) > limit]
    content = {}
    plain_too_long = [i for i in too_long if i not in framing]
    if plain_too_long:
        rows = tokenizer([prompts[i] for i in plain_too_long], add_special_tokens=False)["input_ids"]
        content = dict(zip(plain_too_long, rows))
    encoded = [
        keep_end(ids[i], *framing[i], limit) if i in framing
        else left_truncate(ids[i], list(content.get(i, ids[i])), limit)
        for i in range(len(prompts))
    ]
    dropped = sum(n for _, n in encoded)
    if dropped:
        log.warning(
            "llm: %d of %d prompt(s) left-truncated to %d tokens (context %s); %d tokens dropped",
            len(too_long),
            len(prompts),
            limit,
            context_length,
            dropped,
        )
    return encoded


def first_eos(tokens: Sequence[int], eos_ids: frozenset[int]) -> int:
    """Index of the first end-of-sequence token in ``tokens`` (``len(tokens)`` when there is none)."""
    return next((i for i, token in enumerate(tokens) if token in eos_ids), len(tokens))


def chosen_token_logprobs(step_logits: Sequence[torch.Tensor], generated: torch.Tensor) -> torch.Tensor:
    """(rows, steps) log-probabilities of the generated tokens under the raw logits of each step.

    Computed in float32 whatever the model's dtype, one step at a time so only one (rows, vocab) slice
    is expanded at once.
    """
    columns = [
        step.float().log_softmax(-1).gather(1, generated[:, t : t + 1].to(step.device)).squeeze(1).cpu()
        for t, step in enumerate(step_logits)
    ]
    return torch.stack(columns, dim=1) if columns else torch.zeros((generated.shape[0], 0))


class DecodedStopCriteria(StoppingCriteria):
    """Finish a row once the text it generated contains any stop string.

    Checking the decoded text rather than token ids catches a stop string however it was tokenized
    ("." alone, "dog." or ".\\n"). ``start`` is the column where generated tokens begin in ``input_ids``
    (the padded prompt length for a causal LM, 1 for a seq2seq decoder).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], start: int) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.start = start

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------------------------------------------
# The backend


class HuggingFaceLM:
    """A frozen local causal or seq2seq LM answering prompts greedily (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        kind: str,
        context_length: int | None,
        prompts_per_generate: int = 16,
        name: str = "",
    ) -> None:
        if kind not in LM_KINDS:
            raise ConfigError(f"unknown LM kind {kind!r}; use one of {LM_KINDS}")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.context_length = context_length
        self.prompts_per_generate = max(1, prompts_per_generate)
        self.name = name or f"hf-{kind}"
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None), 0
        )
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)

    @classmethod
    def load(
        cls,
        ref: ModelRef,
        runtime: Runtime,
        *,
        kind: str = "auto",
        context_length: int | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        prompts_per_generate: int = 16,
    ) -> HuggingFaceLM:
        """Load tokenizer and model by hub id or folder; ``kind`` "auto" reads ``is_encoder_decoder``.

        With ``device_map`` (e.g. "auto" for a model larger than one device) the weights are placed by
        accelerate and not moved afterwards; inputs go to the device of the input embeddings.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        remote = {"trust_remote_code": True} if trust_remote_code else {}
        try:
            model_config = AutoConfig.from_pretrained(ref.id, **ref.pretrained_kwargs(), **remote)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not read the config of the LLM {ref.id!r}: {error}. Point the model at a local "
                "folder or download it once where the hub is reachable (`hf download ID`)."
            ) from error
        resolved = resolve_lm_kind(kind, bool(getattr(model_config, "is_encoder_decoder", False)))
        model_class = AutoModelForSeq2SeqLM if resolved == "seq2seq" else AutoModelForCausalLM
        placement = {"device_map": device_map} if device_map else {}
        tokenizer = load_processor(AutoTokenizer, ref, **remote)
        model = load_model(
            model_class, ref, device=runtime.device, dtype=runtime.dtype, **placement, **remote
        )
        if context_length is None:
            context_length = default_context_length(
                model.config, getattr(tokenizer, "model_max_length", None), resolved
            )
        return cls(
            model,
            tokenizer,
            kind=resolved,
            context_length=context_length,
            prompts_per_generate=prompts_per_generate,
            name=f"hf-{resolved}:{ref.id}",
        )

    @property
    def input_device(self) -> torch.device:
        embeddings = self.model.get_input_embeddings()
        return embeddings.weight.device if embeddings is not None else self.model.device

    def prompt_limit(self, max_new_tokens: int) -> int | None:
        """Most prompt tokens allowed: a causal LM's answer shares the context with its prompt."""
        if self.context_length is None:
            return None
        return prompt_token_limit(self.context_length, max_new_tokens if self.kind == "causal" else 0)

    def encode(
        self, prompts: Sequence[str], max_new_tokens: int, segments: Sequence[Segments | None] | None = None
    ) -> list[tuple[list[int], int]]:
        """Token ids of each prompt (segmented ones tokenised segment by segment), left-truncated to
        fit, with the number of tokens dropped."""
        return encode_prompts(
            self.tokenizer, prompts, self.prompt_limit(max_new_tokens), self.context_length, segments
        )

    def complete(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        segments: Sequence[Segments | None] | None = None,
    ) -> list[Completion]:
        """Greedy completions aligned to ``prompts`` (see the module docstring); ``segments`` as in
        :class:`capvqa.llm.LLMBackend`."""
        if not prompts:
            return []
        encoded = self.encode(prompts, settings.max_new_tokens, segments)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))  # longest first
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.prompts_per_generate):
            group = order[start : start + self.prompts_per_generate]
            for i, (tokens, logprob, text, stopped, pieces, piece_logprobs) in zip(
                group, self._generate([encoded[i][0] for i in group], settings)
            ):
                results[i] = Completion(
                    text=text,
                    logprob=logprob,
                    num_tokens=len(tokens),
                    prompt_tokens_dropped=encoded[i][1],
                    token_ids=tuple(tokens),
                    stopped=stopped,
                    generated_tokens=pieces,
                    generated_logprobs=piece_logprobs,
                )
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _generate(
        self, rows: list[list[int]], settings: GenerationSettings
    ) -> list[tuple[list[int], float, str, bool, tuple[str, ...], tuple[float, ...]]]:
        """One ``generate`` call over token rows: (kept token ids, their summed logprob, kept text, whether
        a stop string cut it) each (:func:`capvqa.llm.kept_completion`), then the row's generated tokens
        as text and their log-probabilities through the one that ended it
        (:func:`capvqa.llm.generated_through_end`)."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            if self.kind == "causal":  # left padding: the next token of every row is in the last column
                ids[r, width - len(row) :] = torch.tensor(row)
                mask[r, width - len(row) :] = 1
            else:
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
        device = self.input_device
        start = width if self.kind == "causal" else 1  # seq2seq decoder rows begin with the start token
        criteria = (
            StoppingCriteriaList([DecodedStopCriteria(self.tokenizer, settings.stop, start)])
            if settings.stop
            else None
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=self.pad_id,
                stopping_criteria=criteria,
                output_logits=True,
                return_dict_in_generate=True,
            )
            steps = len(out.logits)
            generated = out.sequences[:, out.sequences.shape[1] - steps :]
            token_logprobs = chosen_token_logprobs(out.logits, generated)
        def decode(ids: Sequence[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        results = []
        for r, row in enumerate(generated.tolist()):
            row_logprobs = token_logprobs[r].tolist()
            tokens = row[: first_eos(row, self.eos_ids)]
            ended = generated_through_end(decode, row, row_logprobs, self.eos_ids, settings.stop)
            results.append((*kept_completion(decode, tokens, row_logprobs, settings.stop), *ended))
        return results

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
