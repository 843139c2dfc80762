"""Text formats of PNP-VQA (docs/methods.md#pnp-vqa): question cleaning for BLIP and UnifiedQA passages."""

from __future__ import annotations

import re

_BLIP_QUESTION_PUNCT = re.compile(r"[.!\"()*#:;~]")


def clean_question(question: str, max_words: int = 50) -> str:
    """LAVIS's BLIP question processor: lower-case, drop . ! " ( ) * # : ; ~ (keep ? and commas),
    at most ``max_words`` words."""
    text = _BLIP_QUESTION_PUNCT.sub("", question.lower()).rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def matching_text(question: str, max_words: int = 50) -> str:
    """The ITM text for GradCAM: the cleaned question without '?' at either end (LAVIS's
    ``text.strip('?')`` in ``forward_itm``; tests/parity/test_blip_parity.py)."""
    return clean_question(question, max_words).strip("?").strip()


def unifiedqa_passages(question: str, captions: list[str], captions_per_passage: int = 1) -> list[str]:
    """FiD passages: ``question + " \\n " + captions``, lower-cased.

    The separator is a literal backslash followed by ``n`` (UnifiedQA's input format), not a newline.
    Each caption ends with "." and captions of one passage are joined by a space.
    """
    cleaned = clean_question(question)
    passages = []
    for start in range(0, len(captions), captions_per_passage):
        group = " ".join(caption.strip() + "." for caption in captions[start : start + captions_per_passage])
        passages.append(f"{cleaned} \\n {group}".lower())
    return passages
