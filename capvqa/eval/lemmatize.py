"""Optional lemmatisation of predictions before OK-VQA scoring.

OK-VQA v1.1 ground-truth answers are stemmed (the ``answer`` field; ``raw_answer`` keeps the original),
so an inflected prediction such as "flies" can miss a stemmed "fly". LAVIS therefore lemmatises model
outputs with spaCy before scoring OK-VQA (its models' ``apply_lemmatizer`` option); we offer the same as
an option and record which lemmatizer ran, because it moves the numbers:

* :class:`SpacyLemmatizer` reproduces LAVIS's ``_lemmatize``: with the full ``en_core_web_sm`` pipeline,
  nouns and verbs are replaced by their lemma, other tokens kept, tokens joined by single spaces (so
  "dogs." becomes "dog ." and normalisation then drops the period). spaCy is an optional dependency
  (``pip install 'capvqa[spacy]'`` and ``python -m spacy download en_core_web_sm``); it is imported only
  when the lemmatizer is first used.
* :class:`RuleLemmatizer` is a small model-free approximation for when spaCy is not installed: plural
  nouns and -ing/-ed/-s verb forms by suffix rules plus an exceptions table. It will not match spaCy on
  every word; results computed with it say so in their ``lemmatizer`` name.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable

from capvqa.errors import ConfigError, ModelLoadError

LEMMATIZER_KINDS: Final[tuple[str, ...]] = ("none", "spacy", "rule", "auto")


@runtime_checkable
class Lemmatizer(Protocol):
    """Maps a raw prediction to its lemmatised form; ``name`` identifies it in evaluation reports."""

    name: str

    def __call__(self, text: str) -> str: ...


class SpacyLemmatizer:
    """spaCy lemmatisation of nouns and verbs, as LAVIS does for OK-VQA.

    The pipeline is loaded on first call, not at construction, so building an evaluation config never
    imports spaCy. ``nlp`` injects a ready pipeline (any callable returning tokens with ``text``,
    ``lemma_`` and ``pos_``), which is how tests run without spaCy.
    """

    _LEMMATIZED_POS: Final = frozenset({"NOUN", "VERB"})

    def __init__(self, model: str = "en_core_web_sm", *, nlp: Callable[[str], Iterable[Any]] | None = None):
        self.model = model
        self.name = f"spacy:{model}"
        self._nlp = nlp

    def _pipeline(self) -> Callable[[str], Iterable[Any]]:
        if self._nlp is None:
            self._nlp = _load_spacy_pipeline(self.model)
        return self._nlp

    def __call__(self, text: str) -> str:
        tokens = self._pipeline()(text)
        words = [token.lemma_ if token.pos_ in self._LEMMATIZED_POS else token.text for token in tokens]
        return " ".join(words)


def _load_spacy_pipeline(model: str) -> Callable[[str], Iterable[Any]]:
    """Import spaCy and load ``model``, turning the usual failures into an actionable ModelLoadError."""
    try:
        spacy = importlib.import_module("spacy")
    except ImportError as exc:
        raise ModelLoadError(
            "spaCy lemmatisation was requested but spaCy is not installed; install it with "
            "`pip install 'capvqa[spacy]'` and `python -m spacy download en_core_web_sm`, "
            "or choose the model-free lemmatizer 'rule'"
        ) from exc
    try:
        # The full pipeline, as LAVIS loads it, so tags and hence lemmas are the ones its numbers used.
        return spacy.load(model)
    except OSError as exc:
        raise ModelLoadError(
            f"spaCy pipeline {model!r} is not installed ({exc}); run `python -m spacy download {model}` "
            "or choose the model-free lemmatizer 'rule'"
        ) from exc


def spacy_available(model: str = "en_core_web_sm") -> bool:
    """Whether spaCy and the pipeline package ``model`` are importable, without importing either."""
    try:
        return importlib.util.find_spec("spacy") is not None and importlib.util.find_spec(model) is not None
    except (ImportError, ValueError):  # ``model`` is a path or otherwise not a module name
        return False


# Irregular or otherwise rule-defying forms, lowercased. Values are what spaCy's English lemmatizer gives
# for the word as a noun or verb.
_EXCEPTIONS: Final = MappingProxyType(
    {
        # irregular plurals
        "children": "child", "men": "man", "women": "woman", "people": "person", "mice": "mouse",
        "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox", "dice": "die",
        "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
        "wolves": "wolf", "calves": "calf", "halves": "half", "shelves": "shelf", "scarves": "scarf",
        "thieves": "thief", "elves": "elf", "hooves": "hoof",
        "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero", "mangoes": "mango",
        "volcanoes": "volcano", "echoes": "echo",
        "buses": "bus", "gases": "gas", "lenses": "lens", "quizzes": "quiz", "goes": "go",
        "kiwis": "kiwi", "skis": "ski", "taxis": "taxi",
        "ties": "tie", "pies": "pie", "lies": "lie", "dies": "die", "cookies": "cookie", "movies": "movie",
        "brownies": "brownie", "smoothies": "smoothie", "zombies": "zombie", "hippies": "hippie",
        "selfies": "selfie", "veggies": "veggie", "goalies": "goalie", "calories": "calorie",
        "hoodies": "hoodie", "beanies": "beanie", "rookies": "rookie", "birdies": "birdie",
        "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "bacteria": "bacterium",
        # irregular verb forms
        "ate": "eat", "eaten": "eat", "ran": "run", "flew": "fly", "flown": "fly", "sat": "sit",
        "stood": "stand", "rode": "ride", "ridden": "ride", "wore": "wear", "worn": "wear",
        "drove": "drive", "driven": "drive", "swam": "swim", "threw": "throw", "thrown": "throw",
        "caught": "catch", "held": "hold", "made": "make", "took": "take", "taken": "take",
        "went": "go", "gone": "go", "grew": "grow", "grown": "grow", "built": "build", "bought": "buy",
        "brought": "bring", "thought": "think", "wrote": "write", "written": "write", "sold": "sell",
        "told": "tell", "slept": "sleep", "broke": "break", "broken": "break", "froze": "freeze",
        "frozen": "freeze", "hung": "hang", "fell": "fall", "fallen": "fall", "drew": "draw",
        "drawn": "draw", "sang": "sing", "sung": "sing", "won": "win", "kept": "keep", "cut": "cut",
        "lying": "lie", "dying": "die", "tying": "tie", "tied": "tie", "died": "die", "lied": "lie",
        "using": "use", "used": "use", "doing": "do", "going": "go", "seeing": "see", "being": "be",
        "skiing": "ski", "changing": "change", "changed": "change",
    }
)  # fmt: skip

# Words the suffix rules would damage: -s words that are not plurals, -ing nouns, -ed adjectives.
_KEEP: Final = frozenset(
    ["yes", "this", "his", "hers", "ours", "yours", "theirs", "its", "was", "has", "does", "is", "as", "us", "always", "perhaps", "sometimes", "whereas", "across", "christmas", "texas", "news", "series", "species", "physics", "mathematics", "politics", "clothes", "lens", "iris", "atlas", "canvas", "alias", "bias", "chaos", "thanks", "building", "ceiling", "clothing", "painting", "wedding", "morning", "evening", "sibling", "pudding", "icing", "frosting", "parking", "railing", "awning", "lighting", "nothing", "something", "everything", "anything", "during", "ring", "king", "thing", "wing", "swing", "string", "spring", "sling", "bring", "sing", "sting", "ping", "ding", "cling", "fling", "wring", "bling", "bed", "red", "shed", "sled", "sped", "fled", "led", "fed", "wed", "bred", "hundred", "sacred", "naked", "wicked"]
)

_VOWELS: Final = frozenset("aeiou")
_VOWELS_AND_Y: Final = frozenset("aeiouy")
# Stem endings that English spells with a silent e: carv(e), replac(e), organiz(e), danc(e), forc(e),
# charg(e), judg(e), produc(e).
_SILENT_E_ENDINGS: Final = ("v", "ac", "iz", "nc", "rc", "rg", "dg", "uc")
_WORD: Final = re.compile(r"(?<![0-9])[a-z]+(?![0-9])")


class RuleLemmatizer:
    """Model-free English lemmatisation: lowercase, then suffix rules on each alphabetic word.

    Only runs of letters not touching a digit are rewritten ("3rd", "1990s" and "mp3s" are kept), and
    words of three letters or fewer are left alone. Rules, in order: exceptions table, keep-list, plural
    nouns and third-person verbs (-ies, -ches/-shes/-sses/-xes/-zzes, -s but not -ss/-us/-is), then
    -ing and -ed with consonant undoubling ("running" -> "run") and silent-e restoration for short
    one-syllable stems and typical silent-e endings ("making" -> "make", "striped" -> "stripe",
    "dancing" -> "dance").
    """

    name = "rule"

    def __call__(self, text: str) -> str:
        return _WORD.sub(lambda match: lemmatize_word(match.group(0)), text.lower())


def lemmatize_word(word: str) -> str:
    """Lemma of one lowercase alphabetic word under :class:`RuleLemmatizer`'s rules."""
    if word in _EXCEPTIONS:
        return _EXCEPTIONS[word]
    if len(word) <= 3 or word in _KEEP:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if word.endswith("ing"):
        return _restore_stem(word[:-3]) or word
    if word.endswith("ied") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("ed") and not word.endswith("eed"):
        return _restore_stem(word[:-2]) or word
    return word


def _restore_stem(stem: str) -> str | None:
    """The base form behind an -ing/-ed stem, or None when the stem is too short to be one."""
    if len(stem) < 3 or not _VOWELS_AND_Y.intersection(stem):
        return None  # "thing", "sled": not an inflected form
    if len(stem) >= 4 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS | {"l", "s", "z"}:
        return stem[:-1]  # running -> run, stopped -> stop (but falling -> fall, kissing -> kiss)
    if _is_short_cvc(stem) or stem.endswith(_SILENT_E_ENDINGS) or _is_long_consonant_at(stem):
        return stem + "e"  # making -> make, carved -> carve, dancing -> dance, decorated -> decorate
    return stem


def _is_long_consonant_at(stem: str) -> bool:
    """A several-syllable stem ending consonant + "at": "decorat", "celebrat" (not "eat", "heat")."""
    return stem.endswith("at") and stem[-3] not in _VOWELS and len(re.findall(r"[aeiou]+", stem)) > 1


def _is_short_cvc(stem: str) -> bool:
    """One vowel group ending consonant-vowel-consonant (not w/x/y): "mak", "rid", "strip", not "open"."""
    if len(stem) < 3 or stem[-1] in _VOWELS | {"w", "x", "y"}:
        return False
    if stem[-2] not in _VOWELS or stem[-3] in _VOWELS:
        return False
    vowel_groups = len(re.findall(r"[aeiou]+", stem))
    return vowel_groups == 1


def make_lemmatizer(kind: str = "auto", *, spacy_model: str = "en_core_web_sm") -> Lemmatizer | None:
    """Build the prediction lemmatizer named by ``kind``; its ``name`` says which one will run.

    ``"none"`` returns None (score predictions as they are); ``"spacy"`` requires spaCy and the pipeline
    (ModelLoadError otherwise); ``"rule"`` is the model-free fallback; ``"auto"`` picks spaCy when both
    are installed and the rule lemmatizer otherwise.
    """
    if kind not in LEMMATIZER_KINDS:
        raise ConfigError(f"unknown lemmatizer {kind!r}; choose one of: {', '.join(LEMMATIZER_KINDS)}")
    if kind == "none":
        return None
    if kind == "rule":
        return RuleLemmatizer()
    if kind == "spacy":
        if spacy_available(spacy_model):
            return SpacyLemmatizer(spacy_model)
        # Not an installed package: it may still be a pipeline directory, so try loading it now; this
        # raises the specific, actionable error when it is not one either.
        return SpacyLemmatizer(spacy_model, nlp=_load_spacy_pipeline(spacy_model))
    return SpacyLemmatizer(spacy_model) if spacy_available(spacy_model) else RuleLemmatizer()


def lemmatizer_name(lemmatizer: Callable[[str], str] | None) -> str:
    """The name to report for ``lemmatizer`` ("none" when there is none)."""
    if lemmatizer is None:
        return "none"
    return str(getattr(lemmatizer, "name", type(lemmatizer).__qualname__))
