"""The Img2LLM prompt (docs/methods.md#the-img2llm-prompt): captions as context, synthetic QA exemplars.

Authors variant (``variant: authors``, the default): the prompt of the authors' evaluation script
(``create_context_prompt`` / ``create_task_prompt`` in CR-Gjx/Img2Prompt ``Imape2Prompt_evaluation.py``,
run with 30 captions and 30 question slots), byte for byte. Two segments, tokenised apart and their ids
concatenated (so OPT sees its BOS twice; :attr:`LLMPrompt.segments`)::

    Please reason the answer of the questions according to the given contexts.\\n      (segment 1)
    Contexts:{caption}.{caption}. ... {caption}.\\n                                    (segment 2 ...)
    Question:{next item's yes-question}\\nAnswer:no\\n          (VQAv2 only)
    Question:{this item's yes-question}\\nAnswer:yes\\n         (VQAv2 only)
    Question:Is this a toilet?\\nAnswer:no\\n                  (VQAv2 only)
    Question:{synthetic question}\\nAnswer:{synthetic answer}\\n   (30 slots: pair i % number of pairs,
                                                                  answers under 5 words only)
    Question:{question}\\nAnswer:

Every string goes through the script's own transformations: a caption is ``caption.capitalize().strip()
+ "."`` (``str.capitalize`` lower-cases the rest of the caption; a caption with a leading space stays
lower case), a synthetic question ``question.capitalize().strip()``, a synthetic answer is the
script's ``"answer."`` form (capvqa's answers carry no period) capitalised and stripped, shown lower
case without its last character, and kept when that form has under 5 words; the question asked is
``question.lower().strip()``. A "yes-question" is the *last* generated question of an item (the script
takes ``questions[-1]``, which is the question generated for the "yes" that answer extraction appends
last); the next item's is the neighbour's (``StageInput.neighbours["qa"]``: the next item of the run,
wrapping, see :class:`capvqa.engine.stage.Stage`). The yes/no block is written once, before the first
pair slot, and only when there are slots. Context captions: the answer-order rule below, over the
synthetic answers.

Where the script would crash, capvqa writes a prompt: an item without generated questions gets no pairs
and no "yes" exemplar, a neighbour without them gives no "no" exemplar, no captions give an empty
context, and an item given to the stage without neighbours (by hand) is its own neighbour.

Paper variant (``variant: paper``): the paper figure's layout::

    Please reason the answer of the questions according to the given contexts.\\n
    Contexts: {caption}. {caption}. ... {caption}.\\n
    Question: {synthetic question}\\nAnswer: {synthetic answer}\\n      (each pair once, answer under 5 words)
    Question: {question generated for "yes"}\\nAnswer: yes\\n          (VQAv2 only)
    Question: Is this a toilet?\\nAnswer: no\\n                        (VQAv2 only)
    Question: {question}\\nAnswer:

one segment (one BOS), no next-item exemplar, the yes/no exemplars after every pair except the "yes"
one, and context captions stripped of trailing periods before their ``.``.

Context captions, up to ``num_context_captions`` (30), in both: the reference's loop, visiting the
answers from the last one (the added "yes") to the rarest to the most frequent, wrapping around when
there are fewer answers than visits, and taking for each visit the first caption mentioning the answer
that is not in the context yet. An answer that no caption mentions (normally "yes") points at the first
caption, as in the reference (whose answer -> captions map has no entry for it).

LAVIS variant (``variant: lavis``): LAVIS's ``prompts_construction`` byte for byte -- raw captions glued
together after "Contexts:", no synthetic pairs except "Question:{yes-question}\\nAnswer:yes\\n" and
"Question:Is this a toilet?\\nAnswer:no\\n" (for every dataset, as LAVIS does; none at all when
``num_exemplar_slots``, LAVIS's ``num_question_per_img``, is 0), no spaces after the colons, and the
question as given; one segment. The captions are chosen by the rule below over LAVIS's answer list, which
ends with a "yes" even when "yes" is already a top answer (:func:`lavis_pairs`), and the yes-question is
that list's last question, raw.

Fitting the context window: the prompt plus ``reserve_tokens`` (room for the answer) must fit the LLM's
context, counting tokens as the LLM will see them (a segmented prompt as the LLM backends encode it,
:func:`capvqa.llm.encode_segments`: OPT's BOS once per segment). Synthetic pairs are dropped last first,
then context captions last first, then (authors variant) the yes/no block, which the script writes once
outside its pair slots and so is kept as long as any caption is; the paper variant's yes/no exemplars
are ordinary exemplars, dropped before the pairs. The question and the answer cue are always kept (a
prompt that still does not fit is returned as it is and its size is recorded). The script asserts
instead; at its settings (OPT, 2048 tokens) its prompts fit, so nothing is dropped there. Assembly is
pure (:func:`build_prompt_parts`, :func:`fit_prompt`); the stage only counts tokens with the LLM's
tokenizer.

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
from capvqa.llm import encode_segments, smallest_context_length
from capvqa.models.loading import ModelRef, load_processor

log = logging.getLogger(__name__)

INSTRUCTION = "Please reason the answer of the questions according to the given contexts.\n"
YES_NO_EXEMPLAR = ("Is this a toilet?", "no")
VARIANTS = ("authors", "paper", "lavis")
YES_NO_TASKS = ("vqav2",)  # the tasks (of capvqa.engine.config.TASKS) whose prompt adds yes/no exemplars


@dataclass(frozen=True)
class Img2LLMPromptConfig:
    """In a pipeline, ``llm``, ``revision``, ``context_length`` and ``reserve_tokens`` are the reading LLM
    stage's ``model``, ``revision``, ``context_length`` and ``max_new_tokens`` (see the module docs), and
    ``task`` is the pipeline's; the defaults here serve the stage used on its own."""

    llm: str = "facebook/opt-6.7b"  # only its tokenizer (and context length) is used here
    revision: str | None = None  # of ``llm``
    variant: str = "authors"  # authors | paper | lavis
    num_context_captions: int = 30  # the script's --num_caps_per_img
    # authors variant: pair slots, slot i showing pair i % number of pairs (the script's --num_question_per_img);
    # lavis variant: LAVIS's num_question_per_img, whose only effect is no yes/no exemplar when 0
    num_exemplar_slots: int = 30
    max_answer_words: int = 5  # synthetic pairs whose answer has this many words or more are skipped
    task: str = "vqav2"  # yes/no exemplars for vqav2 only (authors and paper variants)
    context_length: int | None = None  # None: from the LLM's config / tokenizer
    reserve_tokens: int = 10  # room left for the answer
    batch_size: int = non_semantic(64)

    def __post_init__(self) -> None:  # here, so that loading a pipeline config checks it
        check_config(self)


@dataclass(frozen=True)
class LLMPrompt:
    """Prompt(s) for the LLM and what fitting them into its context cost.

    ``prompts`` has one element here (PICa builds one per ensemble member). ``segments``, when set, says
    how to tokenise them: ``segments[i]`` lists the strings of prompt i that are tokenised separately,
    each with the tokenizer's special tokens, their ids concatenated in order (``"".join(segments[i]) ==
    prompts[i]``; the exact rule, e.g. for trailing special tokens, is :func:`capvqa.llm.encode_segments`);
    None means each prompt is tokenised whole. The authors variant sets ``[[instruction, rest]]`` (their
    double BOS). ``num_exemplars`` counts every QA block kept (synthetic pairs and yes/no exemplars);
    ``num_tokens`` is the (first) prompt's length in tokens as the LLM sees it, special tokens included.
    """

    prompts: list[str]
    num_context_captions: int
    num_exemplars: int
    dropped_exemplars: int
    dropped_captions: int
    num_tokens: int
    segments: list[list[str]] | None = None


@dataclass(frozen=True)
class PromptParts:
    """A prompt before fitting: the droppable pieces and the fixed ones.

    Fitting drops, last first, ``exemplars``, then ``captions``, then ``fixed_exemplars`` (written before
    ``exemplars``: the authors' yes/no block, which is not one of their pair slots). ``lead``, when not
    empty, is rendered first and tokenised on its own (the authors' instruction); the rest is the second
    segment.
    """

    head: str  # "Contexts:" label, after the instruction unless that is the lead
    captions: tuple[str, ...]
    caption_separator: str
    exemplars: tuple[str, ...]  # each a whole "Question: ...\nAnswer: ...\n" block
    query: str  # the question and the answer cue, always kept
    lead: str = ""
    fixed_exemplars: tuple[str, ...] = ()

    def segments(
        self, num_captions: int | None = None, num_exemplars: int | None = None, num_fixed: int | None = None
    ) -> list[str]:
        """The prompt as the strings tokenised separately (one, or the lead and the rest)."""
        captions = self.captions if num_captions is None else self.captions[:num_captions]
        exemplars = self.exemplars if num_exemplars is None else self.exemplars[:num_exemplars]
        fixed = self.fixed_exemplars if num_fixed is None else self.fixed_exemplars[:num_fixed]
        rest = (self.head + self.caption_separator.join(captions) + "\n" + "".join(fixed) + "".join(exemplars)
                + self.query)
        return [self.lead, rest] if self.lead else [rest]

    def render(
        self, num_captions: int | None = None, num_exemplars: int | None = None, num_fixed: int | None = None
    ) -> str:
        return "".join(self.segments(num_captions, num_exemplars, num_fixed))


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    num_captions: int
    num_exemplars: int
    dropped_captions: int
    dropped_exemplars: int
    num_tokens: int
    segments: tuple[str, ...] = ()  # the text as tokenised: "".join(segments) == text


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


def authors_caption(caption: str) -> str:
    """A context caption as the authors' script writes it (``create_cap_dic``)."""
    return caption.capitalize().strip() + "."


def authors_question(question: str) -> str:
    """A synthetic question as the authors' script reads it from the QG file."""
    return question.capitalize().strip()


def authors_answer(answer: str) -> str:
    """A synthetic answer in the script's form: LAVIS's answers end with ".", capvqa's do not; the
    script capitalises and strips it. ``form[:-1].lower()`` is what the prompt shows and the key it
    looks captions up by; the word count is taken on the form itself."""
    return (answer + ".").capitalize().strip()


def lavis_pairs(questions: Sequence[str], answers: Sequence[str]) -> tuple[list[str], list[str]]:
    """The synthetic pairs as LAVIS lists them (its own prompt, and the file it hands the authors' script):
    LAVIS appends "yes." after the top answers even when "yes" is already among them, so its last pair is
    always the yes pair (the yes-question is the last question). capvqa's answer extraction keeps one "yes"; when it is not last,
    its pair is repeated at the end, which is LAVIS's list (the duplicate QG input gives the same
    question)."""
    questions, answers = list(questions), list(answers)
    if answers and answers[-1] != "yes" and "yes" in answers and len(questions) == len(answers):
        questions.append(questions[answers.index("yes")])
        answers.append("yes")
    return questions, answers


def authors_yes_no_block(questions: Sequence[str], next_questions: Sequence[str], *, slots: int) -> list[str]:
    """The script's VQAv2 block (``create_task_prompt``, written once, before the first pair slot, so
    only when there are slots): the next item's yes-question -> no, this item's -> yes, the toilet -> no.
    A yes-question is an item's last generated question. A missing one leaves its block out (the script
    would crash)."""
    if slots <= 0:
        return []
    blocks = []
    if next_questions:
        blocks.append(qa_block(authors_question(next_questions[-1]), "no", space=""))
    if questions:
        blocks.append(qa_block(authors_question(questions[-1]), "yes", space=""))
    blocks.append(qa_block(*YES_NO_EXEMPLAR, space=""))
    return blocks


def authors_pairs(questions: Sequence[str], answers: Sequence[str], *, slots: int, max_answer_words: int) -> list[str]:
    """The script's synthetic pairs (``create_task_prompt``): ``slots`` slots, slot i showing pair i modulo
    the number of pairs when its answer form has under ``max_answer_words`` words."""
    forms_q = [authors_question(q) for q in questions]
    forms_a = [authors_answer(a) for a in answers]
    if not forms_q or not forms_a:
        return []
    blocks = []
    for slot in range(slots):
        answer = forms_a[slot % len(forms_a)]
        if len(answer.split()) < max_answer_words:
            blocks.append(qa_block(forms_q[slot % len(forms_q)], answer[:-1].lower(), space=""))
    return blocks


def build_prompt_parts(
    question: str,
    captions: Sequence[str],
    answers: Sequence[str],
    answer_captions: Mapping[str, Sequence[int]],
    qa_questions: Sequence[str],
    qa_answers: Sequence[str],
    *,
    variant: str = "authors",
    num_context_captions: int = 30,
    num_exemplar_slots: int = 30,
    max_answer_words: int = 5,
    dataset: str = "vqav2",
    next_qa_questions: Sequence[str] | None = None,
    next_qa_answers: Sequence[str] | None = None,
) -> PromptParts:
    """The prompt of one question, before fitting it to a context length.

    ``next_qa_questions`` / ``next_qa_answers``: the next item's synthetic pairs (authors variant on
    VQAv2); None makes the item its own neighbour.
    """
    if variant == "authors":
        qa_questions, qa_answers = lavis_pairs(qa_questions, qa_answers)
        if next_qa_questions is not None:
            next_qa_questions = lavis_pairs(next_qa_questions, next_qa_answers or [])[0]
        # the script picks captions by its synthetic answers (the QG file's), looked up by their shown form
        keys = [authors_answer(answer)[:-1].lower() for answer in qa_answers]
        chosen = select_context_captions(keys, answer_captions, len(captions), num_context_captions)
        following = qa_questions if next_qa_questions is None else next_qa_questions
        yes_no = dataset in YES_NO_TASKS
        return PromptParts(
            lead=INSTRUCTION,
            head="Contexts:",
            captions=tuple(authors_caption(captions[i]) for i in chosen),
            caption_separator="",
            fixed_exemplars=tuple(authors_yes_no_block(qa_questions, following, slots=num_exemplar_slots)
                                  if yes_no else ()),
            exemplars=tuple(authors_pairs(qa_questions, qa_answers, slots=num_exemplar_slots,
                                          max_answer_words=max_answer_words)),
            query=f"Question:{question.lower().strip()}\nAnswer:",
        )
    if variant == "paper":
        chosen = select_context_captions(answers, answer_captions, len(captions), num_context_captions)
        return PromptParts(
            head=INSTRUCTION + "Contexts: ",
            captions=tuple(format_context_caption(captions[i]) for i in chosen),
            caption_separator=" ",
            exemplars=tuple(paper_exemplars(qa_questions, qa_answers, max_answer_words=max_answer_words,
                                            yes_no=dataset in YES_NO_TASKS)),
            query=f"Question: {question.strip().lower()}\nAnswer:",
        )
    if variant == "lavis":
        # LAVIS visits its QG answers, "yes" last (a second one when "yes" is a top answer); its one pair is
        # the last question's, written inside its question-slot loop: none without slots
        qa_questions, qa_answers = lavis_pairs(qa_questions, qa_answers)
        chosen = select_context_captions(qa_answers, answer_captions, len(captions), num_context_captions)
        exemplars = []
        if num_exemplar_slots > 0:
            exemplars = [qa_block(question, "yes", space="") for question in qa_questions[-1:]]
            exemplars.append(qa_block(*YES_NO_EXEMPLAR, space=""))
        return PromptParts(
            head=INSTRUCTION + "Contexts:",
            captions=tuple(captions[i] for i in chosen),
            caption_separator="",
            exemplars=tuple(exemplars),
            query=f"Question:{question}\nAnswer:",
        )
    raise ConfigError(f"unknown Img2LLM prompt variant {variant!r}; valid: {list(VARIANTS)}")


def fit_prompt(
    parts: PromptParts, count_tokens: Callable[[Sequence[str]], int], max_tokens: int
) -> FittedPrompt:
    """The longest version of ``parts`` within ``max_tokens``: ``exemplars`` dropped last first, then
    captions, then ``fixed_exemplars``; the query always stays (a prompt too long even without any of
    them is returned as that).

    ``count_tokens`` takes a prompt as its segments (:meth:`PromptParts.segments`) and counts the tokens
    the LLM sees. Binary searches (a prompt's token count grows with every piece added), so a prompt is
    tokenised about log2(pieces) times per kind of piece, not once per dropped piece.
    """
    full = (len(parts.exemplars), len(parts.captions), len(parts.fixed_exemplars))  # in the order dropped

    def size(keep: Sequence[int]) -> int:
        exemplars, captions, fixed = keep
        return count_tokens(parts.segments(captions, exemplars, fixed))

    def fits(keep: Sequence[int]) -> bool:
        return size(keep) <= max_tokens

    keep = list(full)
    for kind in range(len(keep)):
        if fits(keep):
            break

        def with_count(count: int, kind: int = kind) -> list[int]:
            return [*keep[:kind], count, *keep[kind + 1 :]]

        if keep[kind] and fits(with_count(0)):
            low, high = 0, keep[kind]  # fits with low, not with high: find the largest count that fits
            while high - low > 1:
                middle = (low + high) // 2
                if fits(with_count(middle)):
                    low = middle
                else:
                    high = middle
            keep[kind] = low
            break
        keep[kind] = 0
    exemplars, captions, fixed = keep
    segments = tuple(parts.segments(captions, exemplars, fixed))
    return FittedPrompt(
        text="".join(segments),
        num_captions=captions,
        num_exemplars=exemplars + fixed,
        dropped_captions=full[1] - captions,
        dropped_exemplars=full[0] - exemplars + full[2] - fixed,
        num_tokens=size(keep),
        segments=segments,
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
    for name in ("num_context_captions", "num_exemplar_slots", "max_answer_words"):
        if getattr(config, name) < 0:
            raise ConfigError(f"img2llm_prompt: {name} must be >= 0, got {getattr(config, name)}")
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
    # the authors' VQAv2 prompt shows the next item's yes-question; narrowed to () in __init__ when the
    # variant and task do not, so those prompts (and their cache keys) do not depend on the neighbour
    NEIGHBOUR_INPUTS: ClassVar[tuple[str, ...]] = ("qa",)
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
        if self.config.variant == "lavis":
            # the lavis variant equals LAVIS since version 2 (its second "yes" and no exemplars without
            # question slots, found by the parity suite); the other variants did not change, so their
            # cached prompts (and the answers read from them) stay valid
            self.VERSION = "2"  # type: ignore[misc]
        if not self.reads_next_item(self.config):
            self.NEIGHBOUR_INPUTS = ()  # type: ignore[misc]  # narrowed on purpose (see the class attribute)

    @staticmethod
    def reads_next_item(config: Img2LLMPromptConfig) -> bool:
        """Whether the prompt shows the next item's yes-question: the authors variant on VQAv2."""
        return config.variant == "authors" and config.task in YES_NO_TASKS and config.num_exemplar_slots > 0

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
        # the authors variant looks the synthetic answers up in answer_captions: they must be those answers
        qa_source = upstream["qa"].inputs.get("answers")
        if qa_source is not None and qa_source != answers.name:
            raise ConfigError(
                f"input 'answers' reads stage {answers.name!r}, but the questions (stage {upstream['qa'].name!r}) "
                f"were generated for the answers of stage {qa_source!r}; read answers from {qa_source!r} "
                f"(inputs: {{answers: {qa_source}}})"
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

    def count_tokens(self, segments: Sequence[str]) -> int:
        """Tokens the LLM sees for a prompt given as its segments, special tokens included: a segmented
        prompt is counted by the LLM backends' own rule (:func:`capvqa.llm.encode_segments`: each
        segment's leading special tokens, OPT's BOS, repeated)."""
        if len(segments) == 1:
            return len(self.tokenizer(segments[0])["input_ids"])
        return len(encode_segments(self.tokenizer, segments)[0])

    def parts_for(self, entry: StageInput) -> PromptParts:
        cfg = self.config
        candidates, qa = entry.upstream["answers"], entry.upstream["qa"]
        following = entry.neighbours.get("qa")  # absent for a hand-made input: the item is its own neighbour
        return build_prompt_parts(
            entry.item.question,
            list(entry.upstream["captions"].captions),
            candidates.answers,
            candidates.answer_captions,
            qa.questions,
            qa.answers,
            variant=cfg.variant,
            num_context_captions=cfg.num_context_captions,
            num_exemplar_slots=cfg.num_exemplar_slots,
            max_answer_words=cfg.max_answer_words,
            dataset=cfg.task,
            next_qa_questions=None if following is None else following.questions,
            next_qa_answers=None if following is None else following.answers,
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
                    segments=[list(fitted.segments)] if len(fitted.segments) > 1 else None,
                )
            )
        return results

    def cleanup(self) -> None:
        self.tokenizer = None
