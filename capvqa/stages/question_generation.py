"""Synthetic question generation for the candidate answers (Img2LLM, docs/methods.md#question-generation).

For every candidate answer of a question (the top answers of its captions plus "yes") a seq2seq QG
model writes a question whose answer it is, reading all captions as context. The (question, answer)
pairs become the LLM's in-context exemplars. The paper's model is ``google/t5-large-lm-adapt``
fine-tuned by the authors (``T5_large_QG.pth``, see :mod:`capvqa.models.qg_checkpoint`); any hub
seq2seq QG model plugs in with its own ``template``.

Input text, by default the reference's (LAVIS ``Img2PromptVQA.answer_extraction``) byte for byte:
``"answer: {answer}.  context: {context}."`` -- the answer with a period after it, two spaces before
"context:" -- with ``context`` the captions concatenated with no separator, as the caption stage gave
them ("a dog on a beacha man surfing"). The reference's candidate answers carry that period (it adds
one to each when de-duplicating them, "yes." included); capvqa's answer stage keeps its answers plain,
so the template adds it here.

A spaced variant is kept for comparison: the reference's glued captions fuse the last word of each
caption with the first of the next, and the period makes the answer look like the end of a sentence.
``template: "answer: {answer}  context: {context}."`` with ``caption_separator: " "``
(:data:`SPACED_QG_TEMPLATE`, :data:`SPACED_CAPTION_SEPARATOR`) writes the answer plain and joins the
captions with a space: what capvqa's default was before it followed the reference
(docs/methods.md#question-generation).

Decoding as the reference: beam search with 3 beams, ``max_length`` 30 (decoder tokens, start token
included), input truncated at 2048 tokens (T5's relative positions allow it). The reference runs 10
inputs per ``generate``; we run every (item, answer) input of a batch together, sorted by length and
chunked, which does not change any input's beams (padding is masked). The beams' cross-attention cache
is not copied at each step (:mod:`capvqa.models.beam_cache`), which gives the same beams.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.models.beam_cache import beam_search_cache
from capvqa.models.loading import ModelRef, load_model, load_processor

log = logging.getLogger(__name__)

# the reference's input (docs/methods.md#question-generation): the answer with its period, captions glued
QG_TEMPLATE = "answer: {answer}.  context: {context}."
QG_CAPTION_SEPARATOR = ""
# the spaced variant: plain answer, captions joined by a space
SPACED_QG_TEMPLATE = "answer: {answer}  context: {context}."
SPACED_CAPTION_SEPARATOR = " "


@dataclass(frozen=True)
class QuestionGenerationConfig:
    model: str = "google/t5-large-lm-adapt"
    revision: str | None = None
    # the authors' fine-tuned weights (path or URL, e.g. qg_checkpoint.T5_LARGE_QG_URL); None: use
    # ``model`` as it is (a hub QG model, or the tiny zoo)
    checkpoint: str | None = None
    template: str = QG_TEMPLATE  # "{answer}" and "{context}" are filled in
    caption_separator: str = QG_CAPTION_SEPARATOR
    num_beams: int = 3
    max_length: int = 30
    max_input_tokens: int = 2048
    batch_size: int = non_semantic(8)
    max_inputs_per_generate: int = non_semantic(64)

    def __post_init__(self) -> None:  # here, so that loading a pipeline config checks it
        try:
            self.template.format(answer="", context="")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(
                f"question_generation: template {self.template!r} is not a format string with only "
                f"{{answer}} and {{context}} ({type(error).__name__}: {error}); write literal braces as "
                "{{ and }}"
            ) from None
        if "{answer}" not in self.template or "{context}" not in self.template:
            raise ConfigError(
                f"question_generation: template {self.template!r} must contain {{answer}} and {{context}}"
            )


@dataclass(frozen=True)
class SyntheticQA:
    """One generated question per candidate answer, aligned with ``answers`` (same order)."""

    questions: list[str]
    answers: list[str]


def qg_context(captions: Sequence[str], separator: str = QG_CAPTION_SEPARATOR) -> str:
    """All captions of a question as one QG context, joined as given (LAVIS does not strip them;
    tests/parity/test_t5_parity.py)."""
    return separator.join(captions)


def qg_inputs(answers: Sequence[str], captions: Sequence[str], template: str = QG_TEMPLATE,
              separator: str = QG_CAPTION_SEPARATOR) -> list[str]:
    """The QG model's input text for each answer."""
    context = qg_context(captions, separator)
    return [template.format(answer=answer, context=context) for answer in answers]


class QuestionGeneration:
    NAME: ClassVar[str] = "question_generation"
    VERSION: ClassVar[str] = "2"  # 2: captions joined as given, unstripped, as LAVIS joins them
    INPUTS: ClassVar[tuple[str, ...]] = ("captions", "answers")
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = QuestionGenerationConfig
    Output = SyntheticQA

    def __init__(self, config: QuestionGenerationConfig | None = None, **overrides: Any) -> None:
        self.config = config or QuestionGenerationConfig(**overrides)
        self._model: Any = None

    def setup(self, runtime: Runtime) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        cfg = self.config
        ref = ModelRef(cfg.model, cfg.revision)
        self.runtime = runtime
        self.tokenizer = load_processor(AutoTokenizer, ref)
        if cfg.checkpoint:
            from capvqa.models.qg_checkpoint import ensure_qg_model, untied_head_warning_silenced

            # the checkpoint only needs the base model's config and tokenizer, not its weights
            weights = ModelRef(str(ensure_qg_model(cfg.checkpoint, ref)))
            with untied_head_warning_silenced():
                self._model = load_model(AutoModelForSeq2SeqLM, weights, device=runtime.device,
                                         dtype=runtime.dtype)
        else:
            self._model = load_model(AutoModelForSeq2SeqLM, ref, device=runtime.device, dtype=runtime.dtype)
        log.info("question generation: %s%s, %d beams", cfg.model,
                 f" + {cfg.checkpoint}" if cfg.checkpoint else "", cfg.num_beams)

    def inputs_for(self, entry: StageInput) -> list[str]:
        answers = entry.upstream["answers"].answers
        return qg_inputs(answers, entry.upstream["captions"].captions, self.config.template,
                         self.config.caption_separator)

    def cost(self, entry: StageInput) -> int:
        captions = entry.upstream["captions"].captions
        return len(entry.upstream["answers"].answers) * (1 + sum(len(c) + 1 for c in captions))

    def run(self, batch: Sequence[StageInput]) -> list[SyntheticQA]:
        texts = [self.inputs_for(entry) for entry in batch]
        questions = self.generate([t for item in texts for t in item])
        results, start = [], 0
        for entry, item in zip(batch, texts):
            results.append(SyntheticQA(questions=questions[start : start + len(item)],
                                       answers=list(entry.upstream["answers"].answers)))
            start += len(item)
        return results

    def generate(self, texts: list[str]) -> list[str]:
        """One question per input text, in input order; inputs of similar length share a ``generate``."""
        cfg = self.config
        if not texts:
            return []
        ids = self.tokenizer(texts, truncation=True, max_length=cfg.max_input_tokens)["input_ids"]
        lengths = [len(row) for row in ids]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out: list[str] = [""] * len(texts)
        for start in range(0, len(order), cfg.max_inputs_per_generate):
            rows = order[start : start + cfg.max_inputs_per_generate]
            for row, question in zip(rows, self._generate([texts[i] for i in rows])):
                out[row] = question
        return out

    def _generate(self, texts: list[str]) -> list[str]:
        cfg, device = self.config, self.runtime.device
        tokens = self.tokenizer(texts, padding="longest", truncation=True, max_length=cfg.max_input_tokens,
                                return_tensors="pt")
        with torch.inference_mode():
            output = self._model.generate(
                input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
                do_sample=False,
                num_beams=cfg.num_beams,
                max_length=cfg.max_length,
                # beams share their input's cross-attention keys and values: no copy per step
                **({"cache": beam_search_cache(self._model)} if cfg.num_beams > 1 else {}),
            )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def cleanup(self) -> None:
        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
