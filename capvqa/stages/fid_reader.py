"""Fusion-in-Decoder question answering with UnifiedQA-v2 T5 (docs/methods.md#fusion-in-decoder-reader).

Every passage of a question is encoded independently; the encoder outputs of one question are
concatenated along the sequence axis and the decoder reads them all at once. We batch across questions:
all passages of a batch go through the encoder together, then each question's passages are laid side by
side (padded passages and padded positions are masked) and one greedy ``generate`` call answers the
whole batch. Masking makes this equal to the one-question-at-a-time reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.models.loading import ModelRef, load_model, load_processor
from capvqa.text.pnp_vqa_formats import clean_question, unifiedqa_passages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FiDReaderConfig:
    model: str = "allenai/unifiedqa-v2-t5-base-1363200"
    revision: str | None = None
    num_captions_fid: int = 1
    max_passage_tokens: int = 512
    # LAVIS's max_len 20 is a generate max_length, which counts the decoder start token: 19 new tokens
    max_new_tokens: int = 19
    min_new_tokens: int = 0
    batch_size: int = non_semantic(8)
    max_passages_per_encode: int = non_semantic(64)

    def __post_init__(self) -> None:
        if self.num_captions_fid < 1 or self.max_new_tokens < 1 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError("reader: need num_captions_fid >= 1 and 0 <= min_new_tokens <= max_new_tokens >= 1")


@dataclass(frozen=True)
class ReaderAnswer:
    answer: str
    passages: list[str]


class FiDReader:
    NAME: ClassVar[str] = "fid_reader"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("captions",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = FiDReaderConfig
    Output = ReaderAnswer

    def __init__(self, config: FiDReaderConfig | None = None, **overrides: Any) -> None:
        self.config = config or FiDReaderConfig(**overrides)
        self._model: Any = None

    def setup(self, runtime: Runtime) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        ref = ModelRef(self.config.model, self.config.revision)
        self.runtime = runtime
        self.tokenizer = load_processor(AutoTokenizer, ref)
        self._model = load_model(AutoModelForSeq2SeqLM, ref, device=runtime.device, dtype=runtime.dtype)
        log.info("reader: FiD %s, %d caption(s) per passage", self.config.model, self.config.num_captions_fid)

    def cost(self, entry: StageInput) -> int:
        captions = entry.upstream["captions"].captions
        return sum(len(c) for c in captions) + len(captions) * len(entry.item.question)

    def passages_for(self, entry: StageInput) -> list[str]:
        captions = list(entry.upstream["captions"].captions)
        if not captions:  # no caption survived: answer from the question alone, in the same format
            return [f"{clean_question(entry.item.question)} \\n ".lower()]
        return unifiedqa_passages(entry.item.question, captions, self.config.num_captions_fid)

    def run(self, batch: Sequence[StageInput]) -> list[ReaderAnswer]:
        passages = [self.passages_for(entry) for entry in batch]
        answers = self.answer(passages)
        return [ReaderAnswer(answer=a, passages=p) for a, p in zip(answers, passages)]

    def answer(self, passages_per_question: list[list[str]]) -> list[str]:
        """Greedy FiD answers, one per question, for lists of passages."""
        cfg, device = self.config, self.runtime.device
        passages_per_question = [p if p else [""] for p in passages_per_question]
        flat = [p for passages in passages_per_question for p in passages]
        tokens = self.tokenizer(flat, truncation=True, max_length=cfg.max_passage_tokens)["input_ids"]
        with torch.inference_mode():
            encoded = self._encode_by_length(tokens)
            # FiD concatenates each question's passages along the sequence axis. Only real tokens are
            # laid side by side: T5's cross-attention has no position bias, so dropping the padding the
            # reference carries (masked out there) changes nothing but the work.
            per_question, start = [], 0
            for passages in passages_per_question:
                per_question.append(torch.cat(encoded[start : start + len(passages)]))
                start += len(passages)
            longest = max(h.shape[0] for h in per_question)
            width = per_question[0].shape[-1]
            fused = per_question[0].new_zeros((len(per_question), longest, width))
            fused_mask = torch.zeros((len(per_question), longest), dtype=torch.long, device=device)
            for q, hidden in enumerate(per_question):
                fused[q, : hidden.shape[0]] = hidden
                fused_mask[q, : hidden.shape[0]] = 1
            from transformers.modeling_outputs import BaseModelOutput

            output = self._model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=fused),
                attention_mask=fused_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=cfg.min_new_tokens,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def _encode_by_length(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Encoder states (length_i, d_model) of every passage, each encoded independently.

        Passages are encoded in chunks of similar length, each chunk padded only to its own longest
        passage, so padding costs little even when passage lengths vary a lot.
        """
        device, chunk = self.runtime.device, self.config.max_passages_per_encode
        encoder = self._model.get_encoder()
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        states: list[torch.Tensor | None] = [None] * len(token_ids)
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            width = len(token_ids[rows[0]])
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[r, : len(token_ids[i])] = 1
            hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for r, i in enumerate(rows):
                states[i] = hidden[r, : len(token_ids[i])]
        return states  # type: ignore[return-value]

    def cleanup(self) -> None:
        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
