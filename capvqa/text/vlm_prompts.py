"""End-to-end vision-language models' VQA prompts and answer clean-up, as pure functions.

Methods: docs/methods.md#end-to-end-vision-language-models. Each family is asked the way its authors'
evaluation asked short-answer VQA (or, where they report no VQAv2 / OK-VQA number, as lmms-eval's VQAv2
task asks it):

- ``blip2``: ``"Question: {} Short answer:"``, the prompt of LAVIS's BLIP-2 zero-shot VQAv2 and
  OK-VQA configs, FLAN-T5 and OPT alike (``projects/blip2/eval/vqav2_zeroshot_flant5xl_eval.yaml``,
  ``vqav2_zeroshot_opt_eval.yaml``); no chat template.
- ``instructblip``: ``"Question: {} Short Answer:"`` (capital A), LAVIS's InstructBLIP OK-VQA config
  (``projects/instructblip/qa_okvqa_flant5xl_eval.yaml``); the same text is the Q-Former's instruction.
- ``llava``: ``"{question}\\nAnswer the question using a single word or phrase."``, LLaVA-1.5's response
  format prompt for short answers (Liu et al., 2023, "Improved Baselines", Sec. 3.2; its VQAv2 and GQA
  evaluation question files), put in a user turn after the image through
  the processor's chat template (llava-hf: ``"USER: <image>\\n... ASSISTANT:"``).
- ``qwen2_vl``: the same short-answer instruction in a ChatML user turn (lmms-eval's VQAv2 task,
  ``post_prompt``); the Qwen2-VL report gives no VQAv2/OK-VQA numbers. Qwen-VL (v1) base models used
  ``"<img>{}</img>{} Answer:"`` (``eval_mm/evaluate_vqa.py``), a format transformers does not serve.
- ``idefics``: the short-answer instruction in a user turn of Idefics2/3's chat template.

Few-shot (Flamingo-style, :func:`few_shot_messages`): in-context examples are interleaved before the query
as OpenFlamingo's VQA evaluation interleaves them (``open_flamingo/eval/evaluate.py``, ``evaluate_vqa``:
each example's image, question and first answer, then the query's image and question, the most similar
example last as its RICES retrieval orders them), each example a user turn in the family's format and an
assistant turn holding its answer, rendered by the model's chat template (Idefics2/3's template writes
``User:<image>{text}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n``). Only formats whose
processors take several images per prompt can do this (:data:`FEW_SHOT_FORMATS`).

A format is either plain text with the image in front (BLIP-2, InstructBLIP: their processors insert the
query tokens) or a chat message with an image and a text part, rendered by the model's own chat template.
BLIP-2 and InstructBLIP's questions first go through the LAVIS text processor their configs name
(``blip_question``: lower-case, drop ``.!"()*#:;~``; ``blip_caption``: the same marks become spaces), as
LAVIS's VQA datasets apply it before the prompt is formatted; LLaVA and lmms-eval use the question as is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capvqa.errors import ConfigError
from capvqa.text.pnp_vqa_formats import clean_question as blip_question

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class VlmPromptFormat:
    """How one family is asked a question.

    ``template`` formats the question (``{question}``, first cleaned by the ``question_processor`` named,
    :data:`QUESTION_PROCESSORS`) into the text the model reads; with ``chat`` that
    text becomes the user turn of a chat message (image first, then the text) that the processor's chat
    template renders; ``fallback`` (``{text}``, with the family's image placeholder) renders it for a
    processor without a chat template, or None when the family cannot do without one.
    """

    name: str
    template: str
    chat: bool
    fallback: str | None
    source: str
    question_processor: str = "none"


PROMPT_FORMATS: dict[str, VlmPromptFormat] = {
    fmt.name: fmt
    for fmt in (
        VlmPromptFormat("blip2", "Question: {question} Short answer:", chat=False, fallback=None,
                        source="LAVIS projects/blip2/eval/vqav2_zeroshot_flant5xl_eval.yaml",
                        question_processor="blip_question"),
        VlmPromptFormat("instructblip", "Question: {question} Short Answer:", chat=False, fallback=None,
                        source="LAVIS projects/instructblip/qa_okvqa_flant5xl_eval.yaml",
                        question_processor="blip_caption"),
        VlmPromptFormat("llava", "{question}\n" + SHORT_ANSWER_INSTRUCTION, chat=True,
                        fallback="USER: <image>\n{text} ASSISTANT:",
                        source="Liu et al., 2023 (LLaVA-1.5), Sec. 3.2 response format prompt"),
        VlmPromptFormat("qwen2_vl", "{question}\n" + SHORT_ANSWER_INSTRUCTION, chat=True, fallback=None,
                        source="lmms-eval tasks/vqav2 post_prompt"),
        VlmPromptFormat("idefics", "{question}\n" + SHORT_ANSWER_INSTRUCTION, chat=True, fallback=None,
                        source="lmms-eval tasks/vqav2 post_prompt"),
    )
}

#: The transformers ``model_type`` of each family's checkpoints, to warn when a format meets another family.
FAMILY_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "blip2": ("blip-2",),
    "instructblip": ("instructblip",),
    "llava": ("llava",),
    "qwen2_vl": ("qwen2_vl", "qwen2_5_vl"),
    "idefics": ("idefics2", "idefics3"),
}


_BLIP_CAPTION_PUNCT = re.compile(r"[.!\"()*#:;~]")


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_caption`` text processor: lower-case, the marks ``.!"()*#:;~`` become spaces, runs
    of whitespace one space, stripped, at most ``max_words`` words."""
    text = re.sub(r"\s{2,}", " ", _BLIP_CAPTION_PUNCT.sub(" ", text.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


#: question clean-up applied before a format's template (LAVIS's text processors by their registry names)
QUESTION_PROCESSORS = {"none": str.strip, "blip_question": blip_question, "blip_caption": blip_caption}


def prompt_format(name: str) -> VlmPromptFormat:
    """The format called ``name``; a ConfigError lists the known ones."""
    try:
        return PROMPT_FORMATS[name]
    except KeyError:
        raise ConfigError(
            f"vlm_answer: unknown prompt_format {name!r}; choose one of: {', '.join(PROMPT_FORMATS)}"
        ) from None


def question_text(fmt: VlmPromptFormat, question: str) -> str:
    """The text of the question as the family is asked it (before any chat template)."""
    return fmt.template.format(question=QUESTION_PROCESSORS[fmt.question_processor](question))


def chat_messages(text: str) -> list[dict[str, Any]]:
    """One user turn: the image, then ``text`` (the order LLaVA, Qwen2-VL and Idefics were trained on)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def render_prompt(fmt: VlmPromptFormat, question: str, chat_template: Any = None) -> str:
    """The exact text the processor gets for ``question``.

    ``chat_template`` is a callable rendering a message list with the generation prompt (the processor's
    ``apply_chat_template``), or None when the processor has no template: the format's ``fallback`` then
    applies, and a chat format without one is an error.
    """
    text = question_text(fmt, question)
    if not fmt.chat:
        return text
    if chat_template is not None:
        return chat_template(chat_messages(text))
    if fmt.fallback is None:
        raise ConfigError(
            f"vlm_answer: prompt format {fmt.name!r} needs the model's chat template, and its processor has none"
        )
    return fmt.fallback.format(text=text)


#: formats whose models read several images in one prompt (Idefics2/3: one image list per prompt)
FEW_SHOT_FORMATS = ("idefics",)


def few_shot_format(name: str) -> VlmPromptFormat:
    """The format called ``name`` if it can hold in-context examples; a ConfigError says which can."""
    fmt = prompt_format(name)
    if name not in FEW_SHOT_FORMATS:
        raise ConfigError(
            f"prompt format {name!r} cannot hold in-context examples (one image per prompt); few-shot formats: "
            f"{', '.join(FEW_SHOT_FORMATS)}"
        )
    return fmt


def few_shot_messages(
    fmt: VlmPromptFormat, examples: Sequence[tuple[str, str]], question: str
) -> list[dict[str, Any]]:
    """The chat of a few-shot prompt: per ``(question, answer)`` example, in the order given, a user turn
    (its image, then its question in ``fmt``) and an assistant turn (the answer); then the query's user
    turn. The images are the examples' in order, then the query's."""
    messages: list[dict[str, Any]] = []
    for example_question, answer in examples:
        messages.extend(chat_messages(question_text(fmt, example_question)))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return [*messages, *chat_messages(question_text(fmt, question))]


def render_few_shot_prompt(
    fmt: VlmPromptFormat, examples: Sequence[tuple[str, str]], question: str, chat_template: Any
) -> str:
    """The exact text the processor gets for a few-shot prompt (:func:`few_shot_messages` through the
    model's chat template, with the generation prompt). Few-shot formats have no plain-text fallback."""
    if chat_template is None:
        raise ConfigError(
            f"few-shot prompts in format {fmt.name!r} need the model's chat template, and its processor has none"
        )
    return chat_template(few_shot_messages(fmt, examples, question))


def clean_answer(raw: str) -> str:
    """The answer in a generated text: its first non-empty line, stripped.

    The families' own evaluations keep the decoded text as is (LAVIS strips it; LLaVA's ``model_vqa``
    strips it; lmms-eval takes it as is) and leave the rest to the VQA normalisation, which capvqa's
    evaluator applies; a random or chatty model's second line would never match a short answer anyway.
    """
    for line in raw.splitlines():
        if line.strip():
            return line.strip()
    return ""
