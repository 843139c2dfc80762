"""Answering with a frozen LLM: the last stage of Img2LLM and PICa.

Methods: docs/methods.md#llm-and-answer-post-processing (Img2LLM) and
docs/methods.md#decoding-ensemble-and-post-processing (PICa).

Reads the prompt record of an upstream stage (``prompts``: one prompt for Img2LLM, ``n_ensemble`` for
PICa), completes every prompt greedily with at most ``max_new_tokens`` tokens, cut at the first stop
string, post-processes each completion with the method's rule (:mod:`capvqa.text.answer_postprocess`)
and, with several prompts, keeps the candidate whose summed token log-probability is highest (PICa's
ensemble). All prompts of all items of a batch go to the backend together, so a local model decodes them
in a few batched ``generate`` calls and an API client keeps ``concurrency`` requests in flight.

Backends (:mod:`capvqa.llm`): a local causal or seq2seq Hugging Face model ("auto" reads the model
config), or an OpenAI-compatible completions API ("openai"; ``model`` is then the API's model name, the
key comes from the environment variable named by ``api_key_env``).

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

from capvqa.engine.config import check_task
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.llm import Completion, GenerationSettings, LLMBackend
from capvqa.text.answer_postprocess import check_rule, postprocess_answer, postprocess_name

log = logging.getLogger(__name__)

BACKENDS = ("auto", "causal", "seq2seq", "openai", "vllm")
LEMMATIZER_CHOICES = ("auto", "spacy", "rule", "none")


@dataclass(frozen=True)
class LLMAnswerConfig:
    """How the LLM answers. Fields marked non-semantic do not enter the cache key (they cannot change
    an answer): batching, placement, API concurrency/retry/timeouts and the *name* of the key variable.

    ``context_length`` None means the model's own (config ``max_position_embeddings`` or tokenizer
    ``model_max_length``); prompts longer than it allows are left-truncated and the count recorded.
    ``model``, ``revision``, ``context_length`` and ``max_new_tokens`` are also the budget Img2LLM's prompt
    stage fits its prompt to (it reads them from here when the pipeline loads), so they are stated once.
    ``lemmatizer`` picks the OK-VQA lemmatizer ("auto": spaCy when installed, else the rule-based one);
    the one that ran is recorded in every answer. ``base_url`` is semantic on purpose: two servers may
    serve different weights under one model name. ``api_model`` overrides the model name sent to the API
    (default: ``model``).
    """

    model: str = "facebook/opt-6.7b"
    revision: str | None = None
    backend: str = "auto"
    max_new_tokens: int = 10
    stop: tuple[str, ...] = ("\n", ".")
    postprocess: str = "img2llm"
    task: str = "vqav2"  # filled by the pipeline's task; okvqa adds Img2LLM's OK-VQA rules to "img2llm"
    lemmatizer: str = "auto"
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

    ``raw`` is the chosen completion cut at the stop string, ``answer`` it post-processed, ``logprob`` the
    summed log-probability of the tokens that produced ``raw`` (None only when an API returned none),
    ``prompt_index`` which prompt produced it. ``candidates`` hold ``raw``, ``answer``, ``logprob``,
    ``num_tokens`` and ``prompt_tokens_dropped`` (prompt tokens removed on the left to fit the context)
    per prompt. ``postprocess`` names the rule and lemmatizer that ran.
    """

    answer: str
    raw: str
    logprob: float | None
    prompt_index: int
    candidates: list[dict]
    postprocess: str
    prompt_tokens_dropped: int = 0


def candidate_record(completion: Completion, answer: str) -> dict[str, Any]:
    """A candidate as stored in :class:`LLMAnswer` (JSON values only)."""
    logprob = completion.logprob
    if logprob is not None and not math.isfinite(logprob):
        logprob = None  # a NaN/inf from a broken model would not survive the JSON cache
    return {
        "raw": completion.text,
        "answer": answer,
        "logprob": logprob,
        "num_tokens": completion.num_tokens,
        "prompt_tokens_dropped": completion.prompt_tokens_dropped,
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
    """``auto`` becomes the lemmatizer that will run, before the cache key is made: installing spaCy
    later must not reuse answers post-processed by the rule lemmatizer."""
    if config.lemmatizer != "auto" or not config.okvqa:
        return config
    from capvqa.eval.lemmatize import spacy_available

    return dataclasses.replace(config, lemmatizer="spacy" if spacy_available() else "rule")


class LLMAnswerer:
    NAME: ClassVar[str] = "llm_answer"
    VERSION: ClassVar[str] = "1"
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
        self._backend: LLMBackend | None = llm
        self._injected = llm is not None
        self._lemmatizer: Any = None
        self.postprocess_label = postprocess_name(self.config.postprocess, self.config.okvqa, "none")

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

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        # the lemmatizer first: a missing spaCy pipeline should fail before minutes of weight loading
        if cfg.okvqa and cfg.lemmatizer != "none":
            from capvqa.eval.lemmatize import lemmatizer_name, make_lemmatizer

            self._lemmatizer = make_lemmatizer(cfg.lemmatizer)
            self.postprocess_label = postprocess_name(
                cfg.postprocess, cfg.okvqa, lemmatizer_name(self._lemmatizer)
            )
        if self._backend is None:
            self._backend = self._build_backend(runtime)
        log.info(
            "llm: %s, greedy <= %d new tokens, stop %r, post-process %s",
            self.backend.name,
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
        for entry, prompts in zip(batch, prompt_lists):
            if not prompts:
                raise ValueError(f"item {entry.item.question_id}: the prompt stage produced no prompt")
        flat = [prompt for prompts in prompt_lists for prompt in prompts]
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
        """Post-process each prompt's completion and keep the best candidate (pure given the lemmatizer)."""
        cfg = self.config
        candidates = [
            candidate_record(
                c, postprocess_answer(c.text, cfg.postprocess, okvqa=cfg.okvqa, lemmatize=self._lemmatizer)
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
