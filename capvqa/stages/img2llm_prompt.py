"""The Img2LLM prompt (docs/methods.md#the-img2llm-prompt): captions as context, synthetic QA exemplars.

Paper variant (default), exactly::

    Please reason the answer of the questions according to the given contexts.\\n
    Contexts: {caption}. {caption}. ... {caption}.\\n
    Question: {synthetic question}\\nAnswer: {synthetic answer}\\n      (each pair, answer under 5 words)
    Question: {question generated for "yes"}\\nAnswer: yes\\n          (VQAv2 only)
    Question: Is this a toilet?\\nAnswer: no\\n                        (VQAv2 only)
    Question: {question}\\nAnswer:

Context captions, up to ``num_context_captions`` (30): the reference's loop (``create_context_prompt``
in the authors' code and in LAVIS), visiting the answers from the last one (the added "yes") to the
rarest to the most frequent, wrapping around when there are fewer answers than visits, and taking for
each visit the first caption mentioning the answer that is not in the context yet. An answer that no
caption mentions (normally "yes") points at the first caption, as in the reference. So the context is
the first caption, then one caption per answer, rarest answer first. Each caption is capitalised
(``str.capitalize``) and ends with a period.

Synthetic pairs: every generated pair except the one for the added "yes", most frequent answer first,
skipping answers of ``max_answer_words`` (5) or more words; questions capitalised, answers lower case
(the authors' formatting). The question being asked is stripped and lower-cased, as in the authors'
code.

Where this differs from the authors' code (``create_task_prompt``); the full list, including the single
BOS token and the other differences, is in docs/methods.md#deviations-in-img2llm:

- The paper's spacing: a space after "Contexts:", "Question:" and "Answer:", and captions joined by a space
  (the code writes "Question:{q}" and glues captions together: "A dog.A cat.").
- The yes/no exemplars come after the synthetic pairs (the code puts them first).
- The code's VQAv2 exemplars also include "the next test question's yes-question -> no", which makes
  one item's prompt depend on which item follows it in the dataset file; we leave it out so that a
  prompt is a function of its own item (the cache depends on that).
- The code cycles through its 30 pair slots modulo the number of pairs, repeating pairs when there are
  fewer than 30; we use each pair once.

LAVIS variant (``variant: lavis``): LAVIS's ``prompts_construction`` byte for byte -- raw captions glued
together after "Contexts:", no synthetic pairs except "Question:{yes-question}\\nAnswer:yes\\n" and
"Question:Is this a toilet?\\nAnswer:no\\n" (for every dataset, as LAVIS does), no spaces after the
colons, and the question as given.

Fitting the context window: the prompt plus ``reserve_tokens`` (room for the answer) must fit the LLM's
context. Exemplars are dropped last first, then context captions last first; the question and the
answer cue are always kept (a prompt that still does not fit is returned as it is and its size is
recorded). Assembly is pure (:func:`build_prompt_parts`, :func:`fit_prompt`); the stage only counts
tokens with the LLM's tokenizer.

In a pipeline the budget is the LLM stage's, stated once there: ``llm``, ``revision``,
``context_length`` and ``reserve_tokens`` are the ``model``, ``revision``, ``context_length`` and
``max_new_tokens`` of the stage reading this prompt (:data:`Img2LLMPrompt.CONSUMER_FIELDS`, filled in
when the config loads), so the LLM never has to left-truncate a fitted prompt -- which would cut the
instruction first. The context length, when not set, is the smallest limit the LLM's config or tokenizer
declares (:func:`capvqa.llm.smallest_context_length`), never more than its backend allows. For a seq2seq
LLM the answer does not share the encoder's context, so the reserve only makes the fit a little tighter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from capvqa.engine.config import UpstreamStage, check_task
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError
from capvqa.llm import smallest_context_length
from capvqa.models.loading import ModelRef, load_processor

log = logging.getLogger(__name__)

INSTRUCTION = "Please reason the answer of the questions according to the given contexts.\n"
YES_NO_EXEMPLAR = ("Is this a toilet?", "no")
VARIANTS = ("paper", "lavis")
YES_NO_TASKS = ("vqav2",)  # the tasks (of capvqa.engine.config.TASKS) whose prompt adds yes/no exemplars


@dataclass(frozen=True)
class Img2LLMPromptConfig:
    """In a pipeline, ``llm``, ``revision``, ``context_length`` and ``reserve_tokens`` are the reading LLM
    stage's ``model``, ``revision``, ``context_length`` and ``max_new_tokens`` (see the module docs), and
    ``task`` is the pipeline's; the defaults here serve the stage used on its own."""

    llm: str = "facebook/opt-6.7b"  # only its tokenizer (and context length) is used here
    revision: str | None = None  # of ``llm``
    variant: str = "paper"  # paper | lavis
    num_context_captions: int = 30
    max_answer_words: int = 5  # synthetic pairs whose answer has this many words or more are skipped
    task: str = "vqav2"  # yes/no exemplars for vqav2 only (paper variant)
    context_length: int | None = None  # None: from the LLM's config / tokenizer
    reserve_tokens: int = 10  # room left for the answer
    batch_size: int = non_semantic(64)

    def __post_init__(self) -> None:  # here, so that loading a pipeline config checks it
        check_config(self)


@dataclass(frozen=True)
class LLMPrompt:
    """Prompt(s) for the LLM and what fitting them into its context cost.

    ``prompts`` has one element here (PICa builds one per ensemble member). ``num_exemplars`` counts
    every QA block kept (synthetic pairs and yes/no exemplars); ``num_tokens`` is the (first) prompt's
    length in LLM tokens, special tokens included.
    """

    prompts: list[str]
    num_context_captions: int
    num_exemplars: int
    dropped_exemplars: int
    dropped_captions: int
    num_tokens: int


@dataclass(frozen=True)
class PromptParts:
    """A prompt before fitting: the droppable pieces (exemplars, then captions) and the fixed ones."""

    head: str  # instruction + "Contexts:" label
    captions: tuple[str, ...]
    caption_separator: str
    exemplars: tuple[str, ...]  # each a whole "Question: ...\nAnswer: ...\n" block
    query: str  # the question and the answer cue, always kept

    def render(self, num_captions: int | None = None, num_exemplars: int | None = None) -> str:
        captions = self.captions if num_captions is None else self.captions[:num_captions]
        exemplars = self.exemplars if num_exemplars is None else self.exemplars[:num_exemplars]
        return self.head + self.caption_separator.join(captions) + "\n" + "".join(exemplars) + self.query


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    num_captions: int
    num_exemplars: int
    dropped_captions: int
    dropped_exemplars: int
    num_tokens: int


# ---------------------------------------------------------------------------------------------------
# Pure assembly


def select_context_captions(
    answers: Sequence[str], answer_captions: Mapping[str, Sequence[int]], num_captions: int, limit: int
) -> list[int]:
    """Indices of the context captions, in prompt order (the reference's loop, see module docs).

    ``num_captions`` is how many captions exist; ``limit`` how many visits (at most that many captions).
    """
    chosen: list[int] = []
    if not answers or num_captions <= 0:
        return chosen
    for visit in range(limit):
        answer = answers[(len(answers) - 1 - visit) % len(answers)]
        for index in answer_captions.get(answer) or [0]:
            if 0 <= index < num_captions and index not in chosen:
                chosen.append(index)
                break
    return chosen


def format_context_caption(caption: str) -> str:
    """Capitalised (``str.capitalize``, as the authors) and ending with one period."""
    return caption.strip().capitalize().rstrip(" .") + "."


def yes_pair_index(answers: Sequence[str]) -> int | None:
    """Index of the pair generated for the added "yes" (the last one answering "yes"), if any."""
    for index in range(len(answers) - 1, -1, -1):
        if answers[index].strip().lower() == "yes":
            return index
    return None


def qa_block(question: str, answer: str, space: str = " ") -> str:
    return f"Question:{space}{question}\nAnswer:{space}{answer}\n"


def paper_exemplars(
    questions: Sequence[str], answers: Sequence[str], *, max_answer_words: int, yes_no: bool
) -> list[str]:
    """Synthetic pairs (all but the "yes" one, short answers only), then the yes/no exemplars."""
    yes = yes_pair_index(answers)
    blocks = [
        qa_block(question.strip().capitalize(), answer.strip().lower())
        for index, (question, answer) in enumerate(zip(questions, answers))
        if index != yes and len(answer.split()) < max_answer_words
    ]
    if yes_no:
        if yes is not None:
            blocks.append(qa_block(questions[yes].strip().capitalize(), "yes"))
        blocks.append(qa_block(*YES_NO_EXEMPLAR))
    return blocks


def build_prompt_parts(
    question: str,
    captions: Sequence[str],
    answers: Sequence[str],
    answer_captions: Mapping[str, Sequence[int]],
    qa_questions: Sequence[str],
    qa_answers: Sequence[str],
    *,
    variant: str = "paper",
    num_context_captions: int = 30,
    max_answer_words: int = 5,
    dataset: str = "vqav2",
) -> PromptParts:
    """The prompt of one question, before fitting it to a context length."""
    chosen = select_context_captions(answers, answer_captions, len(captions), num_context_captions)
    if variant == "paper":
        return PromptParts(
            head=INSTRUCTION + "Contexts: ",
            captions=tuple(format_context_caption(captions[i]) for i in chosen),
            caption_separator=" ",
            exemplars=tuple(paper_exemplars(qa_questions, qa_answers, max_answer_words=max_answer_words,
                                            yes_no=dataset in YES_NO_TASKS)),
            query=f"Question: {question.strip().lower()}\nAnswer:",
        )
    if variant == "lavis":
        yes = yes_pair_index(qa_answers)
        exemplars = [] if yes is None else [qa_block(qa_questions[yes], "yes", space="")]
        exemplars.append(qa_block(*YES_NO_EXEMPLAR, space=""))
        return PromptParts(
            head=INSTRUCTION + "Contexts:",
            captions=tuple(captions[i] for i in chosen),
            caption_separator="",
            exemplars=tuple(exemplars),
            query=f"Question:{question}\nAnswer:",
        )
    raise ConfigError(f"unknown Img2LLM prompt variant {variant!r}; valid: {list(VARIANTS)}")


def fit_prompt(parts: PromptParts, count_tokens: Callable[[str], int], max_tokens: int) -> FittedPrompt:
    """The longest version of ``parts`` within ``max_tokens``: exemplars dropped last first, then captions.

    Binary searches (a prompt's token count grows with every piece added), so a prompt is tokenised
    about log2(pieces) times, not once per dropped piece.
    """
    num_captions, num_exemplars = len(parts.captions), len(parts.exemplars)

    def fits(captions: int, exemplars: int) -> bool:
        return count_tokens(parts.render(captions, exemplars)) <= max_tokens

    def largest(limit: int, ok: Callable[[int], bool]) -> int:
        low, high = 0, limit  # ok(high) is known to be False; find the largest ok value, at least 0
        if not ok(0):
            return 0
        while high - low > 1:
            middle = (low + high) // 2
            if ok(middle):
                low = middle
            else:
                high = middle
        return low

    keep_captions, keep_exemplars = num_captions, num_exemplars
    if not fits(num_captions, num_exemplars):
        if num_exemplars and fits(num_captions, 0):
            keep_exemplars = largest(num_exemplars, lambda e: fits(num_captions, e))
        else:
            keep_exemplars = 0
            keep_captions = largest(num_captions, lambda c: fits(c, 0)) if num_captions else 0
    text = parts.render(keep_captions, keep_exemplars)
    return FittedPrompt(
        text=text,
        num_captions=keep_captions,
        num_exemplars=keep_exemplars,
        dropped_captions=num_captions - keep_captions,
        dropped_exemplars=num_exemplars - keep_exemplars,
        num_tokens=count_tokens(text),
    )


def context_length_of(tokenizer: Any, model_config: Any | None) -> int | None:
    """The LLM's context length: the smallest limit its config (positions) or tokenizer declares, so
    never more than the answer stage's backend respects (:func:`capvqa.llm.smallest_context_length`)."""
    return smallest_context_length(model_config, getattr(tokenizer, "model_max_length", None))


# ---------------------------------------------------------------------------------------------------
# The stage


def check_config(config: Img2LLMPromptConfig) -> None:
    if config.variant not in VARIANTS:
        raise ConfigError(f"img2llm_prompt: unknown variant {config.variant!r}; valid: {list(VARIANTS)}")
    check_task(config.task, "img2llm_prompt")
    if config.reserve_tokens < 0:
        raise ConfigError(f"img2llm_prompt: reserve_tokens must be >= 0, got {config.reserve_tokens}")
    if config.context_length is not None and config.context_length <= config.reserve_tokens:
        raise ConfigError(
            f"img2llm_prompt: context_length {config.context_length} leaves no room for a prompt after "
            f"reserve_tokens {config.reserve_tokens} (in a pipeline: the LLM stage's context_length and "
            "max_new_tokens)"
        )


class Img2LLMPrompt:
    NAME: ClassVar[str] = "img2llm_prompt"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("captions", "answers", "qa")
    # no weights, but the tokenizer decides the fitting: its identity belongs in the cache key
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("llm",)
    # the budget is the reading LLM stage's, stated once there (capvqa.engine.config fills these in)
    CONSUMER_FIELDS: ClassVar[dict[str, str]] = {
        "llm": "model",
        "revision": "revision",
        "context_length": "context_length",
        "reserve_tokens": "max_new_tokens",
    }
    INPUT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "captions": ("captions",),
        "answers": ("answers", "answer_captions"),
        "qa": ("questions", "answers"),
    }
    Config = Img2LLMPromptConfig
    Output = LLMPrompt

    def __init__(self, config: Img2LLMPromptConfig | None = None, **overrides: Any) -> None:
        self.config = config or Img2LLMPromptConfig(**overrides)
        self.tokenizer: Any = None

    @classmethod
    def check_pipeline(cls, config: Img2LLMPromptConfig, upstream: dict[str, UpstreamStage]) -> None:
        """The candidate answers point at captions by index (``answer_captions``), so the captions this
        stage puts in the context must be the very list the answers were extracted from."""
        captions, answers = upstream["captions"], upstream["answers"]
        source = answers.inputs.get("captions")
        if source is not None and source != captions.name:
            raise ConfigError(
                f"input 'captions' reads stage {captions.name!r}, but the answers (stage {answers.name!r}) "
                f"were extracted from stage {source!r}, and their caption indices point into that list; "
                f"read captions from {source!r} (inputs: {{captions: {source}}})"
            )

    def setup(self, runtime: Runtime) -> None:
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.config
        ref = ModelRef(cfg.llm, cfg.revision)
        self.tokenizer = load_processor(AutoTokenizer, ref)
        context_length = cfg.context_length
        if context_length is None:
            try:
                model_config = AutoConfig.from_pretrained(ref.id, **ref.pretrained_kwargs())
            except (OSError, ValueError):
                model_config = None  # the tokenizer's limit may still be known
            context_length = context_length_of(self.tokenizer, model_config)
            if context_length is None:
                raise ConfigError(
                    f"img2llm_prompt: the context length of {cfg.llm!r} is not in its config or tokenizer; "
                    "set context_length (in a pipeline: the LLM stage's, e.g. --set llm.context_length=2048)"
                )
        if context_length <= cfg.reserve_tokens:
            raise ConfigError(
                f"img2llm_prompt: context length {context_length} <= reserve_tokens {cfg.reserve_tokens} (in a "
                "pipeline: the LLM stage's max_new_tokens); lower it or raise the context length"
            )
        self.max_prompt_tokens = context_length - cfg.reserve_tokens
        log.info("img2llm prompt: %s variant, %s, %d-token context (%d for the prompt)",
                 cfg.variant, cfg.task, context_length, self.max_prompt_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def parts_for(self, entry: StageInput) -> PromptParts:
        cfg = self.config
        candidates, qa = entry.upstream["answers"], entry.upstream["qa"]
        return build_prompt_parts(
            entry.item.question,
            list(entry.upstream["captions"].captions),
            candidates.answers,
            candidates.answer_captions,
            qa.questions,
            qa.answers,
            variant=cfg.variant,
            num_context_captions=cfg.num_context_captions,
            max_answer_words=cfg.max_answer_words,
            dataset=cfg.task,
        )

    def run(self, batch: Sequence[StageInput]) -> list[LLMPrompt]:
        results = []
        for entry in batch:
            fitted = fit_prompt(self.parts_for(entry), self.count_tokens, self.max_prompt_tokens)
            results.append(
                LLMPrompt(
                    prompts=[fitted.text],
                    num_context_captions=fitted.num_captions,
                    num_exemplars=fitted.num_exemplars,
                    dropped_exemplars=fitted.dropped_exemplars,
                    dropped_captions=fitted.dropped_captions,
                    num_tokens=fitted.num_tokens,
                )
            )
        return results

    def cleanup(self) -> None:
        self.tokenizer = None
