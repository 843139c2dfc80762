"""Answering with an end-to-end vision-language model: the one stage of BLIP-2, InstructBLIP, LLaVA and
Qwen2-VL pipelines (docs/methods.md#end-to-end-vision-language-models).

The model sees the image and the question, asked in its family's VQA prompt
(:mod:`capvqa.text.vlm_prompts`: plain text for BLIP-2 and InstructBLIP, a user turn rendered by the
model's chat template for LLaVA, Qwen2-VL and Idefics), and decodes a short answer deterministically:
greedy by default, beam search where the family's evaluation used it (``num_beams``, ``length_penalty``,
``newline_ends``: BLIP-2 and InstructBLIP's LAVIS configs use 5 beams, with length penalty -1 for FLAN-T5,
and 0 and the line break as end of sequence for OPT). A batch's items are decoded together
(:class:`capvqa.models.vlm.VisionLanguageModel`: left padding for decoder-only LMs), under
``torch.inference_mode``, in the run's dtype (bf16/fp16 on CUDA). The answer is the first line of the
decoded text (:func:`capvqa.text.vlm_prompts.clean_answer`); OK-VQA's lemmatisation, which LAVIS applies
to BLIP-2's answers, is the evaluator's ``--lemmatize`` as for every method.

The record keeps the exact prompt text the processor got (chat template applied), the raw decoded text
and its token count, so a run's records show what the model read and wrote.

Backends (``backend``; :class:`capvqa.llm.VisionLanguageBackend`,
docs/methods.md#served-vision-language-models): ``hf`` runs the model in-process as above; ``vllm``
serves it with vLLM's offline engine (the same prompt text, one image per request; CUDA only); ``openai``
asks an OpenAI-compatible chat completions server (``model`` is then the API's model name, or
``api_model``; the key comes from the environment variable named by ``api_key_env``), the family's user
turn with the image as a data URL, and records the user turn's text as the prompt (the server applies its
own chat template). Both served backends decode greedily, so they refuse ``num_beams`` > 1 when the
config loads. Every backend's answer goes through the same clean-up, and each record names the backend
that produced it (``backend``). What can change an answer is in the cache key: the backend, the server
and API model name (``base_url``, ``api_model``) and the image encoding sent (``image_format``); the run's
dtype for local weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from capvqa.data.images import distinct_images
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.llm import VisionLanguageBackend, VlmDecoding, check_greedy
from capvqa.text.vlm_prompts import FAMILY_MODEL_TYPES, clean_answer, prompt_format

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm", "openai")
IMAGE_FORMATS = ("png", "jpeg")  # capvqa.llm.openai_api.IMAGE_FORMATS, without importing the client here


@dataclass(frozen=True)
class VLMAnswerConfig:
    """``prompt_format`` names the family's VQA prompt (:data:`capvqa.text.vlm_prompts.PROMPT_FORMATS`);
    it is stated in the pipeline, not guessed from the model, so a swapped model keeps the cache key
    honest (setup warns when the model is of another family). ``max_new_tokens``, ``num_beams`` and
    ``length_penalty`` are the decoding, and ``newline_ends`` makes the line break the end-of-sequence
    token instead of the model's eos (LAVIS's BLIP-2 OPT); ``device_map`` (e.g. "auto") spreads a large model over
    devices and cannot change an answer.

    ``backend`` is ``hf``, ``vllm`` or ``openai`` (see the module docstring). For ``openai``: ``base_url``
    (semantic on purpose: two servers may serve different weights under one name), ``api_model`` (the
    name sent; default ``model``), ``image_format`` (``png``, lossless, or ``jpeg``), and the
    non-semantic key variable name, concurrency, retries and timeouts. For ``vllm``:
    ``tensor_parallel_size``, ``gpu_memory_utilization`` and ``max_model_len`` (default: the model's),
    which cannot change an answer."""

    model: str = "Salesforce/blip2-flan-t5-xl"
    revision: str | None = None
    prompt_format: str = "blip2"
    max_new_tokens: int = 10
    num_beams: int = 1
    length_penalty: float = 1.0
    newline_ends: bool = False
    backend: str = "hf"
    base_url: str = "https://api.openai.com/v1"
    api_model: str | None = None
    image_format: str = "png"
    api_key_env: str = non_semantic("OPENAI_API_KEY")
    concurrency: int = non_semantic(4)
    max_retries: int = non_semantic(5)
    timeout_s: float = non_semantic(60.0)
    retry_backoff_s: float = non_semantic(1.0)
    tensor_parallel_size: int = non_semantic(1)
    gpu_memory_utilization: float = non_semantic(0.9)
    max_model_len: int | None = non_semantic(None)
    device_map: str | None = non_semantic(None)
    trust_remote_code: bool = non_semantic(False)
    batch_size: int = non_semantic(8)

    def __post_init__(self) -> None:
        prompt_format(self.prompt_format)  # raises on an unknown name
        if self.max_new_tokens < 1:
            raise ConfigError(f"vlm_answer: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"vlm_answer: num_beams must be >= 1, got {self.num_beams}")
        if self.batch_size < 1:
            raise ConfigError(f"vlm_answer: batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"vlm_answer: unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.backend != "hf":
            check_greedy(self.decoding, self.backend)
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(
                f"vlm_answer: unknown image_format {self.image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"vlm_answer: base_url must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0 or self.retry_backoff_s < 0:
            raise ConfigError(
                "vlm_answer: need concurrency >= 1, max_retries >= 0, timeout_s > 0, retry_backoff_s >= 0"
            )
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("vlm_answer: need tensor_parallel_size >= 1 and 0 < gpu_memory_utilization <= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"vlm_answer: max_model_len must be positive or null, got {self.max_model_len}")

    @property
    def decoding(self) -> VlmDecoding:
        return VlmDecoding(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                           length_penalty=self.length_penalty, newline_ends=self.newline_ends)


@dataclass(frozen=True)
class VLMAnswer:
    """The answer, the decoded text it was cut from, the prompt text (what the model read; over an API
    the user turn's text), how many tokens the model generated, and the backend that answered
    (:attr:`capvqa.llm.VisionLanguageBackend.name`, e.g. ``vllm:llava-hf/llava-1.5-7b-hf``)."""

    answer: str
    raw: str
    prompt: str
    num_tokens: int
    backend: str = ""


class VLMAnswerer:
    NAME: ClassVar[str] = "vlm_answer"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = VLMAnswerConfig
    Output = VLMAnswer

    def __init__(
        self, config: VLMAnswerConfig | None = None, *, vlm: VisionLanguageBackend | None = None,
        **overrides: Any,
    ) -> None:
        """``vlm`` injects a ready backend (tests, or a model shared between stages); setup then loads
        nothing and cleanup leaves it alone."""
        self.config = config or VLMAnswerConfig(**overrides)
        self.format = prompt_format(self.config.prompt_format)
        self._vlm = vlm
        self._injected = vlm is not None

    @property
    def decoding(self) -> VlmDecoding:
        return self.config.decoding

    @property
    def vlm(self) -> VisionLanguageBackend:
        if self._vlm is None:
            raise RuntimeError("VLMAnswerer.setup() must run before run()")
        return self._vlm

    def model_fingerprints(self, cache_dir: Path | None = None) -> dict[str, str]:
        """An API model is named by its server and model name (both semantic config fields); local
        models are fingerprinted like any other."""
        if self.config.backend == "openai":
            return {"model": f"api:{self.config.base_url}:{self.config.api_model or self.config.model}"}
        from capvqa.engine.runner import default_model_fingerprints

        return default_model_fingerprints(self)

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        if self._vlm is None:
            self._vlm = self._build_backend(runtime)
        vlm = self.vlm
        model_type = getattr(vlm, "model_type", None)  # None: a server's family is not known
        expected = FAMILY_MODEL_TYPES.get(self.format.name, ())
        if expected and model_type is not None and model_type not in expected:
            log.warning("vlm: prompt format %r is for %s models, but %s is a %r model",
                        self.format.name, "/".join(expected), cfg.model, model_type)
        if self.format.chat and getattr(vlm, "chat_template", False) is None:
            log.warning("vlm: %s has no chat template; prompts use the %r format's plain form",
                        cfg.model, self.format.name)
        decoder_only = getattr(vlm, "decoder_only", None)
        log.info("vlm: %s (%s%s), prompt %r, %s <= %d new tokens", vlm.name, model_type or "served",
                 "" if decoder_only is None else ", decoder-only LM" if decoder_only else ", encoder-decoder LM",
                 self.format.name, "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}",
                 cfg.max_new_tokens)

    def _build_backend(self, runtime: Runtime) -> VisionLanguageBackend:
        """The configured backend; each checks what it can (CUDA and the vllm package, the API key)
        before it loads anything."""
        cfg = self.config
        if cfg.backend == "openai":
            from capvqa.llm.openai_api import OpenAIChatVisionClient

            return OpenAIChatVisionClient(
                base_url=cfg.base_url, model=cfg.api_model or cfg.model, api_key_env=cfg.api_key_env,
                concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
                backoff_base_s=cfg.retry_backoff_s, image_format=cfg.image_format,
            )
        from capvqa.models.loading import ModelRef

        ref = ModelRef(cfg.model, cfg.revision)
        if cfg.backend == "vllm":
            from capvqa.llm.vllm_backend import VLLMVisionBackend

            return VLLMVisionBackend.load(
                ref, runtime, max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization, trust_remote_code=cfg.trust_remote_code,
            )
        from capvqa.models.vlm import load_vision_language_model

        return load_vision_language_model(ref, runtime, device_map=cfg.device_map,
                                          trust_remote_code=cfg.trust_remote_code)

    def prompt_for(self, question: str) -> str:
        """The prompt text of ``question`` as the backend passes it on (:meth:`VisionLanguageBackend.render`)."""
        return self.vlm.render(self.format, question)

    def cost(self, entry: StageInput) -> int:
        return len(entry.item.question)

    def run(self, batch: Sequence[StageInput]) -> list[VLMAnswer]:
        images, image_index = distinct_images(batch)
        prompts = [self.prompt_for(entry.item.question) for entry in batch]
        completions = self.vlm.generate([images[i] for i in image_index], prompts, self.decoding)
        if len(completions) != len(prompts):
            raise RuntimeError(f"the VLM backend returned {len(completions)} answers for {len(prompts)} prompts")
        name = self.vlm.name
        return [
            VLMAnswer(answer=clean_answer(c.text), raw=c.text, prompt=prompt, num_tokens=c.num_tokens, backend=name)
            for prompt, c in zip(prompts, completions)
        ]

    def cleanup(self) -> None:
        if self._vlm is not None and not self._injected:
            self._vlm.close()
            self._vlm = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
