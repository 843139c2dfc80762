"""Fusion-in-Decoder question answering with UnifiedQA-v2 T5 (PNP-VQA, SPEC §1).

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
from capvqa.stages.text import unifiedqa_passages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FiDReaderConfig:
    model: str = "allenai/unifiedqa-v2-t5-base-1363200"
    revision: str | None = None
    num_captions_fid: int = 1
    max_passage_tokens: int = 512
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    batch_size: int = non_semantic(8)
    max_passages_per_encode: int = non_semantic(1024)


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
        return unifiedqa_passages(entry.item.question, captions, self.config.num_captions_fid)

    def run(self, batch: Sequence[StageInput]) -> list[ReaderAnswer]:
        passages = [self.passages_for(entry) for entry in batch]
        answers = self.answer(passages)
        return [ReaderAnswer(answer=a, passages=p) for a, p in zip(answers, passages)]

    def answer(self, passages_per_question: list[list[str]]) -> list[str]:
        """Greedy FiD answers, one per question, for lists of passages."""
        cfg, device = self.config, self.runtime.device
        # a question without captions still gets answered from its question alone
        passages_per_question = [p if p else [""] for p in passages_per_question]
        flat = [p for passages in passages_per_question for p in passages]
        tokens = self.tokenizer(
            flat, padding="longest", truncation=True, max_length=cfg.max_passage_tokens, return_tensors="pt"
        )
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        encoder = self._model.get_encoder()
        with torch.inference_mode():
            hidden = torch.cat(
                [
                    encoder(input_ids=ids[s : s + cfg.max_passages_per_encode],
                            attention_mask=mask[s : s + cfg.max_passages_per_encode]).last_hidden_state
                    for s in range(0, ids.shape[0], cfg.max_passages_per_encode)
                ]
            )
            length, width = ids.shape[1], hidden.shape[-1]
            most = max(len(p) for p in passages_per_question)
            fused = hidden.new_zeros((len(passages_per_question), most * length, width))
            fused_mask = mask.new_zeros((len(passages_per_question), most * length))
            start = 0
            for q, passages in enumerate(passages_per_question):
                n = len(passages)
                fused[q, : n * length] = hidden[start : start + n].reshape(n * length, width)
                fused_mask[q, : n * length] = mask[start : start + n].reshape(n * length)
                start += n
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

    def cleanup(self) -> None:
        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
