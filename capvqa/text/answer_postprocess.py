"""Turning an LLM's raw completion into a VQA answer: the rules of Img2LLM and PICa.

Pure functions of the text (and, for OK-VQA, an injected analyzer), so the rules are testable without a
model and the LLM stage records exactly which rule ran (:func:`postprocess_name`).

``img2llm`` is the authors' ``postprocess_Answer`` followed by ``remove_useless_token``
(docs/methods.md#llm-and-answer-post-processing), in their order:

  1. When the completion has a "." or a line break, the text before the first of them, lower-cased.
     When it has neither, the whole completion, lower-cased, and step 2 does not run. The LLM stage's
     backends already cut completions at their stop strings, so they say with ``stopped`` whether the
     cut text ended at a "." or line break (the reference saw the whole completion and found it there).
  2. OK-VQA only (``okvqa``): the text is split into tokens with Penn Treebank tags; a token is replaced
     by its lemma (WordNet's verb lemma, then the noun lemma of that) unless a digit has appeared in it
     or in an earlier token, it ends in "ed", or it is tagged VBD or VBN; tokens that are one of
     to/in/on/at/with/about/for are then dropped and the rest joined by single spaces. The tokens, tags
     and lemmas come from an :class:`OkvqaAnalyzer` (:mod:`capvqa.eval.lemmatize`: NLTK + WordNet as
     the authors ran it, or a substitute); without one the text is split on whitespace and nothing is
     lemmatised.
  3. On every dataset: lower-case, then strip the leading phrases of ``remove_useless_token``
     (:data:`IMG2LLM_LEADING_PHRASES`). Each check runs once, in the reference's order, on what the
     previous ones left; a match removes the phrase *and the character after it*, whatever it is.
  4. Surrounding whitespace is stripped. The reference keeps it (an answer that was not re-joined from
     tokens keeps the space OPT puts before its first word, which also stops step 3 from matching); the
     VQA evaluation strips it before scoring, so the scores are the same.

``pica`` (PICa, docs/methods.md#decoding-ensemble-and-post-processing): remove every "." and ","
character, lowercase, split on whitespace, drop the words a/an/the/to, re-join with single spaces.
(PICa's reference splits on single spaces and so also drops empty words; splitting on any whitespace
gives the same result on its outputs.)

``none``: the raw completion, stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol, runtime_checkable

from capvqa.errors import ConfigError

POSTPROCESS_RULES: Final[tuple[str, ...]] = ("img2llm", "pica", "none")

# The reference's list, "up to" included: it is compared with single tokens, so it never matches.
IMG2LLM_FUNCTION_WORDS: Final = frozenset({"to", "in", "on", "at", "with", "about", "up to", "for"})
# remove_useless_token: checks in order, each on the result of the previous ones; a text starting with
# any phrase of a group loses that phrase and the one character after it. The order is what makes
# "because she is tired" become "is tired" (the bare "because she" check comes first) and "because
# it's cold" become "s cold" ("because it" comes before "because it's").
IMG2LLM_LEADING_PHRASES: Final[tuple[tuple[str, ...], ...]] = (
    ("because it be", "because it is", "because he is", "because he be"),
    ("because she",),
    ("because she be", "because she is"),
    ("because they be",),
    ("because they are",),
    ("they be",),
    ("they are",),
    ("because of", "because it", "because he"),
    ("because it's",),
    ("it be", "it is", "he be", "he is"),
    ("she be", "she is"),
)
IMG2LLM_NOT_LEMMATIZED_TAGS: Final = frozenset({"VBD", "VBN"})
PICA_DROPPED_WORDS: Final = frozenset({"a", "an", "the", "to"})


@runtime_checkable
class OkvqaAnalyzer(Protocol):
    """Tokens of an answer with their Penn Treebank tags and lemmas, for Img2LLM's OK-VQA step.

    ``analyze`` returns one ``(token, tag, lemma)`` per token, where ``lemma`` is what the token becomes
    when it is lemmatised (the reference: WordNet's verb lemma, then the noun lemma of that); the rule
    itself decides which tokens are lemmatised. ``name`` says which analyzer ran (recorded with answers).
    """

    name: str

    def analyze(self, text: str) -> list[tuple[str, str, str]]: ...


class WordLemmatizerAnalyzer:
    """Adapts a one-word lemmatizer (``word -> lemma``) to :class:`OkvqaAnalyzer`: whitespace tokens, no
    tags. A substitute for the reference's tokenizer and tagger; its name is the lemmatizer's."""

    def __init__(self, lemmatize: Callable[[str], str], name: str | None = None):
        self._lemmatize = lemmatize
        self.name = name or str(getattr(lemmatize, "name", type(lemmatize).__qualname__))

    def analyze(self, text: str) -> list[tuple[str, str, str]]:
        return [(word, "", self._lemmatize(word).strip() or word) for word in text.split()]


def as_analyzer(lemmatize: OkvqaAnalyzer | Callable[[str], str] | None) -> OkvqaAnalyzer | None:
    """``lemmatize`` as an analyzer: analyzers pass through, a word lemmatizer is adapted, None stays."""
    if lemmatize is None or isinstance(lemmatize, OkvqaAnalyzer):
        return lemmatize
    return WordLemmatizerAnalyzer(lemmatize)


def first_cut(raw: str) -> tuple[str, bool]:
    """The text before the first "." or line break, and whether there was one."""
    positions = [p for p in (raw.find("."), raw.find("\n")) if p >= 0]
    if not positions:
        return raw, False
    return raw[: min(positions)], True


def okvqa_words(analysis: Sequence[tuple[str, str, str]]) -> list[str]:
    """Step 2 on analysed tokens: lemmatise unless digit-seen / "-ed" / VBD-VBN, then drop function words."""
    words: list[str] = []
    digit_seen = False
    for token, tag, lemma in analysis:
        digit_seen = digit_seen or any(ch.isdigit() for ch in token)
        if not digit_seen and not token.endswith("ed") and tag not in IMG2LLM_NOT_LEMMATIZED_TAGS:
            token = lemma
        if token not in IMG2LLM_FUNCTION_WORDS:
            words.append(token)
    return words


def strip_leading_phrases(text: str) -> str:
    """``remove_useless_token``: each phrase group checked once, in order (see the module docstring)."""
    for group in IMG2LLM_LEADING_PHRASES:
        for phrase in group:
            if text.startswith(phrase):
                text = text[len(phrase) + 1 :]
                break
    return text


def img2llm_answer(
    raw: str,
    *,
    okvqa: bool = False,
    analyzer: OkvqaAnalyzer | Callable[[str], str] | None = None,
    stopped: bool = True,
) -> str:
    """Img2LLM's rule (module docstring). ``stopped``: whether ``raw`` was cut by the backend at a "." or
    line break; it matters only when ``raw`` itself has neither. ``analyzer`` may also be a one-word
    lemmatizer (adapted with whitespace tokens and no tags)."""
    text, cut = first_cut(raw)
    cut = cut or stopped
    text = text.lower()
    if okvqa and cut and text:
        found = as_analyzer(analyzer)
        if found is None:
            text = " ".join(w for w in text.split() if w not in IMG2LLM_FUNCTION_WORDS)
        else:
            text = " ".join(okvqa_words(found.analyze(text)))
    return strip_leading_phrases(text.lower()).strip()


def pica_answer(raw: str) -> str:
    """PICa's rule: drop "." and ",", lowercase, drop the words a/an/the/to."""
    text = raw.replace(".", "").replace(",", "").lower()
    return " ".join(w for w in text.split() if w not in PICA_DROPPED_WORDS)


def postprocess_answer(
    raw: str,
    rule: str,
    *,
    okvqa: bool = False,
    lemmatize: OkvqaAnalyzer | Callable[[str], str] | None = None,
    stopped: bool = True,
) -> str:
    """Apply ``rule`` ("img2llm", "pica" or "none") to a raw completion; ``okvqa`` only with "img2llm".

    ``lemmatize`` is the OK-VQA analyzer (or a one-word lemmatizer); ``stopped`` as in
    :func:`img2llm_answer`.
    """
    check_rule(rule, okvqa)
    if rule == "img2llm":
        return img2llm_answer(raw, okvqa=okvqa, analyzer=lemmatize, stopped=stopped)
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
    """What ran, as recorded with every answer: "img2llm", "pica", "img2llm+okvqa(lemmatizer=NAME)" where
    NAME is the analyzer's (e.g. "nltk3.8.1-wordnet3.0" for the authors' NLTK procedure, "rule" for the
    model-free substitute, "none" when nothing was lemmatised)."""
    if rule == "img2llm" and okvqa:
        return f"img2llm+okvqa(lemmatizer={lemmatizer_name or 'none'})"
    return rule
