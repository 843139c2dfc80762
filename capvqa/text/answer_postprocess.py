"""Turning an LLM's raw completion into a VQA answer: the rules of Img2LLM and PICa.

Pure functions of the text (and, for OK-VQA, an injected lemmatizer), so the rules are testable without
a model and the LLM stage records exactly which rule ran (:func:`postprocess_name`).

``img2llm`` (Img2LLM, docs/methods.md#llm-and-answer-post-processing, which also lists how this differs
from the authors' ``postprocess_Answer``), in order:
  1. cut at the first "." or newline (the LLM continues with the next exemplar after its answer);
  2. lowercase, strip surrounding whitespace.
  With ``okvqa`` (the extra rules Img2LLM used on OK-VQA), then:
  3. drop a leading "because it is ", "it is " or "they are " (the LLM answering in a sentence);
  4. drop the function words to/in/on/at/with/about/for wherever they stand as words ("on the table" ->
     "the table"; articles are left to the VQA normaliser);
  5. lemmatise every remaining word that contains no digit, one word at a time (a verb form to its base,
     then a noun plural to its singular: the lemmatizer of :mod:`capvqa.eval.lemmatize` does both), so
     the prediction matches OK-VQA's stemmed answers; words with digits ("1990s", "3rd") are kept.
  Words are re-joined with single spaces.

``pica`` (PICa, docs/methods.md#decoding-ensemble-and-post-processing): remove every "." and ","
character, lowercase, split on whitespace, drop the words a/an/the/to, re-join with single spaces.
(PICa's reference splits on single spaces and so also drops empty words; splitting on any whitespace
gives the same result on its outputs.)

``none``: the raw completion, stripped.

Both methods' raw completions are already cut at the stop strings by the LLM stage; the ``img2llm`` cut
here also makes the rule hold for completions produced with other stops.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from capvqa.errors import ConfigError

POSTPROCESS_RULES: Final[tuple[str, ...]] = ("img2llm", "pica", "none")

IMG2LLM_LEADING_PHRASES: Final[tuple[str, ...]] = ("because it is ", "it is ", "they are ")
IMG2LLM_FUNCTION_WORDS: Final = frozenset({"to", "in", "on", "at", "with", "about", "for"})
PICA_DROPPED_WORDS: Final = frozenset({"a", "an", "the", "to"})

_FIRST_CUT: Final = re.compile(r"[.\n]")
_DIGIT: Final = re.compile(r"\d")


def img2llm_answer(raw: str) -> str:
    """Img2LLM's basic rule: the text before the first "." or newline, lowercased and stripped."""
    return _FIRST_CUT.split(raw, maxsplit=1)[0].lower().strip()


def img2llm_okvqa_answer(raw: str, lemmatize: Callable[[str], str] | None) -> str:
    """Img2LLM's OK-VQA rule: the basic rule, then leading phrase, function words, lemmas (see module doc).

    ``lemmatize`` maps one word to its lemma (a :class:`capvqa.eval.lemmatize.Lemmatizer`); None skips
    lemmatisation.
    """
    answer = img2llm_answer(raw)
    for phrase in IMG2LLM_LEADING_PHRASES:
        if answer.startswith(phrase):
            answer = answer[len(phrase) :]
            break
    words = [w for w in answer.split() if w not in IMG2LLM_FUNCTION_WORDS]
    if lemmatize is not None:
        words = [w if _DIGIT.search(w) else lemmatize(w).strip() or w for w in words]
    return " ".join(words)


def pica_answer(raw: str) -> str:
    """PICa's rule: drop "." and ",", lowercase, drop the words a/an/the/to."""
    text = raw.replace(".", "").replace(",", "").lower()
    return " ".join(w for w in text.split() if w not in PICA_DROPPED_WORDS)


def postprocess_answer(
    raw: str, rule: str, *, okvqa: bool = False, lemmatize: Callable[[str], str] | None = None
) -> str:
    """Apply ``rule`` ("img2llm", "pica" or "none") to a raw completion; ``okvqa`` only with "img2llm"."""
    check_rule(rule, okvqa)
    if rule == "img2llm":
        return img2llm_okvqa_answer(raw, lemmatize) if okvqa else img2llm_answer(raw)
    if rule == "pica":
        return pica_answer(raw)
    return raw.strip()


def check_rule(rule: str, okvqa: bool) -> None:
    """Reject unknown rules and OK-VQA extras outside Img2LLM's rule (they are Img2LLM's, not PICa's)."""
    if rule not in POSTPROCESS_RULES:
        raise ConfigError(f"unknown postprocess {rule!r}; choose one of: {', '.join(POSTPROCESS_RULES)}")
    if okvqa and rule != "img2llm":
        raise ConfigError(
            f"okvqa=true adds Img2LLM's OK-VQA answer rules and needs postprocess=img2llm, not {rule!r}; "
            "to lemmatise predictions of another method, use the evaluation's lemmatizer option"
        )


def postprocess_name(rule: str, okvqa: bool, lemmatizer_name: str | None = None) -> str:
    """What ran, as recorded with every answer: "img2llm", "img2llm+okvqa(lemmatizer=rule)", "pica", ..."""
    if rule == "img2llm" and okvqa:
        return f"img2llm+okvqa(lemmatizer={lemmatizer_name or 'none'})"
    return rule
