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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from capvqa.engine.runtime import Runtime
from capvqa.errors import ConfigError, ModelLoadError
from capvqa.llm import Completion, GenerationSettings, Segments, generated_through_end, kept_completion
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
        vllm = import_vllm()
        if runtime.device.type != "cuda":
            raise ConfigError(f"llm backend 'vllm' runs on CUDA GPUs; this run's device is {runtime.device}")
        try:
            llm = vllm.LLM(
                model=ref.id,
                revision=ref.revision,
                dtype=runtime.dtype_name,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=context_length,
                seed=seed,
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"vLLM could not load {ref.id!r}: {error}") from error
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
