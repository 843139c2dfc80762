"""vLLM as the local LLM backend: all prompts of a batch in one ``LLM.generate`` call.

vLLM schedules every prompt it is given with continuous batching and paged attention, so a whole stage
batch of prompts (PICa's ``n_ensemble`` prompts per question included) goes to it at once rather than in
length-sorted groups as with :mod:`capvqa.llm.huggingface`. Tensor parallelism splits a model larger than
one GPU (OPT-30B/66B) across ``tensor_parallel_size`` GPUs.

The results follow the same rules as the Hugging Face backend, so the answer stage cannot tell them
apart: prompts are tokenised and left-truncated with the same helper (segmented prompts segment by
segment, so OPT sees Img2LLM's two BOS tokens here too; special prefix kept, dropped tokens counted);
decoding is greedy (temperature 0); vLLM's default ``raw_logprobs`` mode gives the chosen token's
log-probability under the raw logits, as ``output_logits`` does there; and each row is cut and scored by
:func:`capvqa.llm.kept_completion`. vLLM stops a row at a stop string (kept in its output, so the cut is
ours, and so is ``Completion.stopped``: whether a stop string cut the text, as there) or at
end-of-sequence; the token that stopped it is in its ``token_ids`` with its log-probability, so
``Completion.generated_tokens`` (PICa's ensemble score) holds it as there
(:func:`capvqa.llm.generated_through_end`).

Install with ``pip install 'capvqa[vllm]'`` (Linux, CUDA). Causal LMs only.

**Vision-language models** (:class:`VLLMVisionBackend`, ``backend: vllm`` of the VLM answer stage;
docs/methods.md#served-vision-language-models): each request is vLLM's multimodal prompt
``{"prompt": text, "multi_modal_data": {"image": PIL.Image}}``, all of a batch in one ``generate`` call.
The text is the one the Hugging Face backend gives its processor: the family's prompt with the model's
chat template applied by the model's own ``AutoProcessor`` (loaded without weights), so a LLaVA prompt
carries its ``<image>`` placeholder, which vLLM expands, and a BLIP-2 prompt none (vLLM puts the query
tokens in front, as the processor does). Decoding is greedy (temperature 0; vLLM's ``generate`` has no
beam search); ``newline_ends`` makes the line-break token the only end-of-sequence token
(``stop_token_ids`` with ``ignore_eos``), as ``eos_token_id`` does in ``generate``. The answer is
decoded from the returned token ids with the model's tokenizer and special tokens skipped, and counted
without end-of-sequence and padding tokens, as the Hugging Face backend does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from capvqa.engine.runtime import Runtime
from capvqa.errors import ConfigError, ModelLoadError
from capvqa.llm import (
    Completion,
    GenerationSettings,
    Segments,
    VlmCompletion,
    VlmDecoding,
    check_greedy,
    generated_through_end,
    kept_completion,
)
from capvqa.llm.huggingface import encode_prompts, first_eos, prompt_token_limit
from capvqa.models.loading import ModelRef


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(
            "llm backend 'vllm' needs the vllm package: pip install 'capvqa[vllm]' (Linux with a CUDA GPU), "
            "or use backend auto (Hugging Face) instead"
        ) from error
    return vllm


def start_engine(ref: ModelRef, runtime: Runtime, role: str, **engine_args: Any) -> Any:
    """``vllm.LLM`` on ``ref`` in the run's dtype, on CUDA only; a load failure as a ModelLoadError.
    ``role`` ("llm" or "vlm") names the stage setting in the error."""
    vllm = import_vllm()
    if runtime.device.type != "cuda":
        raise ConfigError(f"{role} backend 'vllm' runs on CUDA GPUs; this run's device is {runtime.device}")
    try:
        return vllm.LLM(model=ref.id, revision=ref.revision, dtype=runtime.dtype_name, **engine_args)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"vLLM could not load {ref.id!r}: {error}") from error


class VLLMBackend:
    """A frozen causal LM served in-process by vLLM (see the module docstring)."""

    def __init__(self, llm: Any, *, context_length: int, name: str = "vllm") -> None:
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.context_length = context_length
        self.name = name
        self.kind = "causal"
        eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if eos is not None else [])

    @classmethod
    def load(
        cls,
        ref: ModelRef,
        runtime: Runtime,
        *,
        context_length: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
    ) -> VLLMBackend:
        """Start vLLM on ``ref`` (hub id or folder) in the run's dtype; ``context_length`` caps vLLM's
        ``max_model_len`` (default: the model's own)."""
        llm = start_engine(ref, runtime, "llm", tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=context_length, seed=seed)
        resolved = context_length or int(llm.llm_engine.model_config.max_model_len)
        return cls(llm, context_length=resolved, name=f"vllm:{ref.id}")

    def complete(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        segments: Sequence[Segments | None] | None = None,
    ) -> list[Completion]:
        """Greedy completions aligned to ``prompts``, all submitted to vLLM together as token ids
        (segmented prompts tokenised segment by segment, as in the Hugging Face backend)."""
        if not prompts:
            return []
        vllm = import_vllm()
        encoded = encode_prompts(
            self.tokenizer, prompts, prompt_token_limit(self.context_length, settings.max_new_tokens),
            self.context_length, segments,
        )
        params = vllm.SamplingParams(
            temperature=0.0,
            max_tokens=settings.max_new_tokens,
            logprobs=0,  # the chosen token's log-probability only
            stop=list(settings.stop) or None,
            include_stop_str_in_output=True,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in encoded], params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")

        def decode(ids: Sequence[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        completions = []
        for output, (_, dropped) in zip(outputs, encoded):
            sequence = output.outputs[0]
            row = list(sequence.token_ids)
            logprobs = [step[token].logprob for step, token in zip(sequence.logprobs, row)]
            tokens = row[: first_eos(row, self.eos_ids)]
            kept, logprob, text, stopped = kept_completion(decode, tokens, logprobs, settings.stop)
            pieces, piece_logprobs = generated_through_end(decode, row, logprobs, self.eos_ids, settings.stop)
            completions.append(
                Completion(text=text, logprob=logprob, num_tokens=len(kept), prompt_tokens_dropped=dropped,
                           token_ids=tuple(kept), stopped=stopped, generated_tokens=pieces,
                           generated_logprobs=piece_logprobs)
            )
        return completions

    def close(self) -> None:
        self.llm = None


# ---------------------------------------------------------------------------------------------------
# Vision-language models


def vision_prompts(images: Sequence[Any], prompts: Sequence[str]) -> list[dict[str, Any]]:
    """vLLM's multimodal prompts: one ``{"prompt", "multi_modal_data": {"image"}}`` per (image, text)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return [{"prompt": prompt, "multi_modal_data": {"image": image}} for image, prompt in zip(images, prompts)]


def answer_tokens(token_ids: Sequence[int], end_id: int | None) -> list[int]:
    """A row's generated ids through its first ``end_id`` (the end-of-sequence token that stopped it,
    kept as the Hugging Face backend's rows keep it; all of them when there is none)."""
    ids = list(token_ids)
    if end_id is not None and end_id in ids:
        return ids[: ids.index(end_id) + 1]
    return ids


class VLLMVisionBackend:
    """A vision-language model served in-process by vLLM (see the module docstring)."""

    def __init__(self, llm: Any, processor: Any, *, model_type: str = "", decoder_only: bool = True,
                 decoder_start_id: int | None = None, name: str = "vllm") -> None:
        self.llm = llm
        self.processor = processor
        self.tokenizer = llm.get_tokenizer()
        self.model_type = model_type
        self.decoder_only = decoder_only
        self.name = name
        # what the Hugging Face backend does not count besides the end token: padding (eos when the
        # tokenizer has no pad token) and the decoder's start token
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        self._uncounted = frozenset(i for i in (pad, decoder_start_id) if i is not None)

    @classmethod
    def load(
        cls,
        ref: ModelRef,
        runtime: Runtime,
        *,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> VLLMVisionBackend:
        """Start vLLM on ``ref`` (hub id or folder) in the run's dtype, one image per prompt; the model's
        ``AutoProcessor`` and config are read first (no weights), for its chat template and family."""
        from transformers import AutoConfig

        from capvqa.models.vlm import load_vision_processor

        import_vllm()
        if runtime.device.type != "cuda":
            raise ConfigError(f"vlm backend 'vllm' runs on CUDA GPUs; this run's device is {runtime.device}")
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        try:
            config = AutoConfig.from_pretrained(ref.id, **ref.pretrained_kwargs(), **remote)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not read the config of the VLM {ref.id!r}: {error}") from error
        processor = load_vision_processor(ref, **remote)
        llm = start_engine(ref, runtime, "vlm", tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                           limit_mm_per_prompt={"image": 1}, trust_remote_code=trust_remote_code)
        text_config = config.get_text_config()
        return cls(llm, processor, model_type=str(getattr(config, "model_type", "")),
                   decoder_only=not bool(getattr(text_config, "is_encoder_decoder", False)),
                   decoder_start_id=getattr(text_config, "decoder_start_token_id", None), name=f"vllm:{ref.id}")

    @property
    def chat_template(self) -> Any:
        from capvqa.models.vlm import chat_template_of

        return chat_template_of(self.processor)

    def render(self, fmt: Any, question: str) -> str:
        """The text vLLM gets for ``question``: the Hugging Face backend's (same processor template)."""
        from capvqa.text.vlm_prompts import render_prompt

        return render_prompt(fmt, question, self.chat_template)

    def newline_id(self) -> int:
        """The first token of ``"\n"`` without special tokens, as the Hugging Face backend finds it."""
        return int(self.tokenizer("\n", add_special_tokens=False).input_ids[0])

    def generate(self, images: Sequence[Any], prompts: Sequence[str], decoding: VlmDecoding) -> list[VlmCompletion]:
        """One greedy answer per (image, prompt), in order, all submitted to vLLM together."""
        check_greedy(decoding, "vllm")
        requests = vision_prompts(images, prompts)
        if not requests:
            return []
        vllm = import_vllm()
        end_id = self.newline_id() if decoding.newline_ends else self.tokenizer.eos_token_id
        stop_ids = {"stop_token_ids": [end_id], "ignore_eos": True} if decoding.newline_ends else {}
        params = vllm.SamplingParams(temperature=0.0, max_tokens=decoding.max_new_tokens, **stop_ids)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        uncounted = self._uncounted | ({end_id} if end_id is not None else set())
        completions = []
        for output in outputs:
            ids = answer_tokens(output.outputs[0].token_ids, end_id)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(VlmCompletion(text=text, num_tokens=sum(1 for i in ids if i not in uncounted)))
        return completions

    def close(self) -> None:
        self.llm = None
