"""Candidate-answer extraction from captions (Img2LLM, docs/methods.md#answer-extraction).

Img2LLM asks a question-generation model for one question per *candidate answer*, so the answers must
be words a question about the image could have: every token whose POS is NOUN, VERB, ADJ, ADV or NUM,
every named entity, and every noun chunk shorter than 4 words, counted over all captions of a question
and ranked by frequency. The top ``num_answers`` (30) are kept and ``"yes"`` is always added, so the
prompt can carry a yes/no exemplar.

Counting follows the reference (LAVIS ``Img2PromptVQA.answer_extraction``) mention by mention, because
the counts decide which answers survive the cut:

- captions are stripped of surrounding whitespace and periods before analysis;
- within a caption, tokens come first, then entities, then noun chunks; each is one *mention*;
- an entity is a mention only if the same text was not mentioned before (in any earlier caption too),
  so "two" (a NUM token and a CARDINAL entity) counts once per caption, not twice;
- noun chunks are mentions every time, so a one-word chunk ("grass") counts again next to its token:
  nouns that stand alone weigh more than the adjectives in front of them;
- ranking is by mention count, ties broken by first mention (the reference's stable sort).

Unlike the reference we lower-case every mention (it keeps the surface form in the answer list but
lower-cases the answer -> caption index): BLIP captions are lower case, so this changes nothing there
and keeps ``answer_captions`` keyed exactly by the answers. The reference also appends a second
``"yes"`` when "yes" is already among the top answers; we keep one.

Two extractors produce the mentions: spaCy (``en_core_web_sm`` by default, the reference's) when it
is installed, else a model-free rule extractor (closed-class stop words, number words, simple suffix
heuristics, capitalised runs as entities, determiner-led runs as noun chunks). ``extractor`` in the
output says which ran. ``"auto"`` is resolved when the stage is built, so the cache key records the
extractor actually used and a cache filled by one is never read as the other's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

OPEN_POS: tuple[str, ...] = ("NOUN", "VERB", "ADJ", "ADV", "NUM")
MAX_CHUNK_WORDS = 4  # noun chunks must be shorter than this (the reference: len(chunk.split()) < 4)
YES = "yes"
EXTRACTORS = ("auto", "spacy", "rule")


@dataclass(frozen=True)
class AnswerExtractionConfig:
    spacy_model: str = "en_core_web_sm"  # a spaCy package name or a pipeline folder (spacy.load)
    extractor: str = "auto"  # auto | spacy | rule; "auto" is resolved when the stage is built
    num_answers: int = 30
    batch_size: int = non_semantic(64)


@dataclass(frozen=True)
class CandidateAnswers:
    """Ranked candidate answers of one question.

    ``answers`` are most frequent first, then ``"yes"`` (always present); ``counts`` are their mention
    counts (``"yes"`` usually 0). ``answer_captions`` maps every answer to the indices of the captions
    that mention it, in caption order (``[]`` for an answer no caption mentions, typically "yes"); the
    prompt builder uses it to pick one context caption per answer.
    """

    answers: list[str]
    counts: list[int]
    extractor: str
    answer_captions: dict[str, list[int]]


@dataclass(frozen=True)
class CaptionAnalysis:
    """What an extractor found in one caption, in the order the reference visits it."""

    tokens: tuple[tuple[str, str], ...]  # (text, universal POS tag), every token
    entities: tuple[str, ...] = ()
    noun_chunks: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------
# Ranking (pure)


def caption_for_analysis(caption: str) -> str:
    """The text the analyser sees: surrounding whitespace and periods removed, as in the reference."""
    return caption.strip().strip(".")


def caption_mentions(analysis: CaptionAnalysis, seen: Iterable[str] = ()) -> list[str]:
    """The candidate-answer mentions of one caption, lower-cased, in reference order.

    ``seen`` holds the mentions of earlier captions: an entity already mentioned is not counted again.
    """
    mentions = [text.lower() for text, pos in analysis.tokens if pos in OPEN_POS]
    previous = set(seen)
    for entity in analysis.entities:
        text = entity.lower()
        if text not in previous and text not in mentions:
            mentions.append(text)
    mentions.extend(chunk.lower() for chunk in analysis.noun_chunks if len(chunk.split()) < MAX_CHUNK_WORDS)
    return [m for m in mentions if m.strip()]


def rank_candidate_answers(
    analyses: Sequence[CaptionAnalysis], num_answers: int, extractor: str
) -> CandidateAnswers:
    """Count mentions over all captions, keep the ``num_answers`` most frequent, add "yes"."""
    mentions: list[str] = []
    answer_captions: dict[str, list[int]] = {}
    for caption_index, analysis in enumerate(analyses):
        found = caption_mentions(analysis, mentions)
        for text in found:
            indices = answer_captions.setdefault(text, [])
            if caption_index not in indices:
                indices.append(caption_index)
        mentions.extend(found)
    counts = Counter(mentions)
    first = {}
    for position, text in enumerate(mentions):
        first.setdefault(text, position)
    ranked = sorted(counts, key=lambda text: (-counts[text], first[text]))[: max(num_answers, 0)]
    if YES not in ranked:
        ranked.append(YES)
    return CandidateAnswers(
        answers=ranked,
        counts=[counts.get(text, 0) for text in ranked],
        extractor=extractor,
        answer_captions={text: list(answer_captions.get(text, [])) for text in ranked},
    )


# ---------------------------------------------------------------------------------------------------
# The model-free extractor


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


# closed-class words (spaCy's DET, PRON, ADP, CCONJ, SCONJ, AUX, PART): never candidate answers
_STOP_WORDS = _word_set(
    """
    a an the this that these those some any each every all both either neither another other such no
    its his her their my your our whose which what whatever
    i me you he him she it we us they them there here who whom itself himself herself themselves
    someone something somebody anyone anything nobody nothing everyone everything
    in on at of with by for from to into onto over under underneath above below near beside besides
    behind between through across along around about against among amongst atop inside outside toward
    towards upon within without during after before like up down off out than via per beneath
    and or but nor yet so while as because if whether although though unless until
    is are was were be been being am has have had having do does did can could will would may might
    must shall should 's 're 've 'd 'll n't not
    """
)
_DETERMINERS = _word_set(
    "a an the this that these those some another each every several many few his her its their my your our"
)
_NUMBER_WORDS = _word_set(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand dozen"
)
_WORD = re.compile(r"\d+(?:[.,:]\d+)*|[A-Za-z]+(?:[-'][A-Za-z]+)*")
_ADVERB_EXCEPTIONS = _word_set("family fly belly jelly lily rally bully holly")


def _rule_pos(word: str) -> str:
    """A universal POS guess for a content word: enough to tell numbers, verbs and adverbs apart."""
    lower = word.lower()
    if lower[0].isdigit() or lower in _NUMBER_WORDS:
        return "NUM"
    if lower.endswith("ly") and len(lower) > 4 and lower not in _ADVERB_EXCEPTIONS:
        return "ADV"
    if lower.endswith("ing") and len(lower) > 5:
        return "VERB"
    return "NOUN"


def _chunk_body(word: str, pos: str) -> bool:
    """Whether a word can continue a noun chunk (a noun or adjective: the rule POS calls both NOUN)."""
    return pos == "NOUN" and word.lower() not in _DETERMINERS


def rule_analysis(caption: str) -> CaptionAnalysis:
    """Model-free analysis of one caption.

    Content words are the non-stop-words (all open classes count the same for ranking, so the POS
    guess only has to separate chunk-breaking verbs/adverbs from the rest). Entities are runs of
    capitalised words after the first word. Noun chunks are an optional determiner or number followed
    by a run of content words that are neither verbs nor adverbs, like spaCy's "a brown horse".
    """
    words = _WORD.findall(caption_for_analysis(caption))
    tokens: list[tuple[str, str]] = []
    for word in words:
        pos = "STOP" if word.lower() in _STOP_WORDS else _rule_pos(word)
        tokens.append((word, pos))

    entities: list[str] = []
    run: list[str] = []
    for index, word in enumerate(words + [""]):
        if index > 0 and word[:1].isupper() and word.lower() not in _STOP_WORDS:
            run.append(word)
            continue
        if run:
            entities.append(" ".join(run))
            run = []

    chunks: list[str] = []
    index = 0
    while index < len(tokens):
        word, pos = tokens[index]
        start = index
        if word.lower() in _DETERMINERS or pos == "NUM":
            index += 1
        body = index
        while index < len(tokens) and _chunk_body(*tokens[index]):
            index += 1
        if index > body:
            chunks.append(" ".join(w for w, _ in tokens[start:index]))
        elif index == start:
            index += 1
    return CaptionAnalysis(tokens=tuple(tokens), entities=tuple(entities), noun_chunks=tuple(chunks))


# ---------------------------------------------------------------------------------------------------
# spaCy


def spacy_available(model: str) -> bool:
    """Whether spaCy and the pipeline ``model`` (package name or folder) are installed, without
    importing either (spaCy takes a second to import)."""
    if importlib.util.find_spec("spacy") is None:
        return False
    if Path(model).expanduser().is_dir():
        return True
    try:
        return importlib.util.find_spec(model) is not None
    except (ImportError, ValueError):
        return False


def load_spacy(model: str) -> Any:
    """``spacy.load(model)``, with an actionable error when spaCy or the pipeline is missing."""
    try:
        import spacy
    except ImportError as error:
        raise ModelLoadError(
            "answer extraction with extractor=spacy needs spaCy: `pip install spacy` and "
            f"`python -m spacy download {model}` (or set extractor=rule for the model-free extractor)"
        ) from error
    try:
        source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
        return spacy.load(source)
    except OSError as error:
        raise ModelLoadError(
            f"could not load the spaCy pipeline {model!r}: {error}. Install it with "
            f"`python -m spacy download {model}`, point spacy_model at a pipeline folder, or set "
            "extractor=rule."
        ) from error


def spacy_analysis(doc: Any) -> CaptionAnalysis:
    """Tokens, entities and noun chunks of a spaCy ``Doc``.

    A pipeline without a dependency parser has no noun chunks (spaCy raises on ``doc.noun_chunks``);
    such docs contribute tokens and entities only.
    """
    chunks: tuple[str, ...] = ()
    if doc.has_annotation("DEP"):
        chunks = tuple(chunk.text for chunk in doc.noun_chunks)
    return CaptionAnalysis(
        tokens=tuple((token.text, token.pos_) for token in doc),
        entities=tuple(ent.text for ent in doc.ents),
        noun_chunks=chunks,
    )


# ---------------------------------------------------------------------------------------------------
# The stage


def resolve_extractor(config: AnswerExtractionConfig) -> AnswerExtractionConfig:
    """The config with ``extractor="auto"`` replaced by the extractor that will run."""
    if config.extractor not in EXTRACTORS:
        raise ConfigError(
            f"answer extraction: unknown extractor {config.extractor!r}; valid: {list(EXTRACTORS)}"
        )
    if config.extractor != "auto":
        return config
    chosen = "spacy" if spacy_available(config.spacy_model) else "rule"
    return dataclasses.replace(config, extractor=chosen)


class AnswerExtraction:
    NAME: ClassVar[str] = "answer_extraction"
    VERSION: ClassVar[str] = "1"
    INPUTS: ClassVar[tuple[str, ...]] = ("captions",)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()
    Config = AnswerExtractionConfig
    Output = CandidateAnswers

    def __init__(self, config: AnswerExtractionConfig | None = None, **overrides: Any) -> None:
        # resolved here, before the engine derives the cache key from the config
        self.config = resolve_extractor(config or AnswerExtractionConfig(**overrides))
        self._nlp: Any = None

    @property
    def extractor_name(self) -> str:
        return f"spacy:{self.config.spacy_model}" if self.config.extractor == "spacy" else "rule"

    def setup(self, runtime: Runtime) -> None:
        if self.config.extractor == "spacy":
            self._nlp = load_spacy(self.config.spacy_model)
        log.info("answer extraction: %s, top %d answers + yes", self.extractor_name, self.config.num_answers)

    def run(self, batch: Sequence[StageInput]) -> list[CandidateAnswers]:
        captions = [list(entry.upstream["captions"].captions) for entry in batch]
        analyses = self.analyse([c for item in captions for c in item])
        results, start = [], 0
        for item in captions:
            results.append(
                rank_candidate_answers(analyses[start : start + len(item)], self.config.num_answers,
                                       self.extractor_name)
            )
            start += len(item)
        return results

    def analyse(self, captions: list[str]) -> list[CaptionAnalysis]:
        """One analysis per caption; spaCy sees all captions of the batch in one ``pipe``."""
        if self.config.extractor != "spacy":
            return [rule_analysis(caption) for caption in captions]
        if self._nlp is None:
            raise RuntimeError("AnswerExtraction.setup() must run before run()")
        texts = [caption_for_analysis(caption) for caption in captions]
        return [spacy_analysis(doc) for doc in self._nlp.pipe(texts)]

    def cleanup(self) -> None:
        self._nlp = None
