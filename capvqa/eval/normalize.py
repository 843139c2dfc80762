"""VQA answer normalisation and the per-question VQA accuracy, as pure functions.

Two variants, chosen by name:

``"official"`` (default)
    The official VQA evaluation script *before* its 2021 change (``vqaEval.py`` as vendored by LAVIS),
    which is what the published zero-shot numbers (PNP-VQA, Img2LLM, PICa via LAVIS) were computed with:

    * the prediction always gets: ``\\n``/``\\t`` -> space, strip, :func:`process_punctuation`, then
      :func:`process_digit_article`;
    * the ground-truth answers get :func:`process_punctuation` only (never digit/article processing),
      and only when they are not all identical; unanimous answers are compared verbatim. So a prediction
      "t-shirt" (-> "t shirt") scores 0 against ten unanimous "t-shirt" answers. That is the official
      behaviour and we keep it, because it changes published numbers.

``"symmetric"``
    Every answer, the prediction and each ground-truth answer alike, goes through the same full
    normalisation (whitespace, punctuation, digit/article), unanimous or not. The EvalAI server, the
    post-2021 official script and lmms-eval also put ground-truth answers through punctuation *and*
    digit/article processing, but still skip unanimous ones (and lmms-eval runs a fuller EvalAI
    processor on the prediction), so this is the simple, both-sides-alike reading of them rather than a
    byte-exact copy: e.g. a prediction "two" matches ten "two" answers here and in no other variant.
    It does not reproduce the LAVIS-era numbers; use it to compare with EvalAI / lmms-eval style reports.

Accuracy: for each of the (usually 10) ground-truth answers i, ``acc_i = min(1, m_i / 3)`` where ``m_i``
counts the *other* answers (by position) equal to the normalised prediction; the question's accuracy is
the mean of the ``acc_i``. No function here mutates its inputs (the reference script rewrites the
annotation dicts in place).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import MappingProxyType
from typing import Final

from capvqa.errors import ConfigError

OFFICIAL: Final = "official"
SYMMETRIC: Final = "symmetric"
VARIANTS: Final[tuple[str, ...]] = (OFFICIAL, SYMMETRIC)

# The official table, verbatim, including its oddities: the capitalised keys ("Id've", "Im", "Ive") can
# never match because words are lowercased first, and "somebody'd" maps to "somebodyd". Keeping them
# documents that we reproduce the reference rather than an improved version of it.
CONTRACTIONS: Final = MappingProxyType(
    {
        "aint": "ain't",
        "arent": "aren't",
        "cant": "can't",
        "couldve": "could've",
        "couldnt": "couldn't",
        "couldn'tve": "couldn't've",
        "couldnt've": "couldn't've",
        "didnt": "didn't",
        "doesnt": "doesn't",
        "dont": "don't",
        "hadnt": "hadn't",
        "hadnt've": "hadn't've",
        "hadn'tve": "hadn't've",
        "hasnt": "hasn't",
        "havent": "haven't",
        "hed": "he'd",
        "hed've": "he'd've",
        "he'dve": "he'd've",
        "hes": "he's",
        "howd": "how'd",
        "howll": "how'll",
        "hows": "how's",
        "Id've": "I'd've",
        "I'dve": "I'd've",
        "Im": "I'm",
        "Ive": "I've",
        "isnt": "isn't",
        "itd": "it'd",
        "itd've": "it'd've",
        "it'dve": "it'd've",
        "itll": "it'll",
        "let's": "let's",
        "maam": "ma'am",
        "mightnt": "mightn't",
        "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've",
        "mightve": "might've",
        "mustnt": "mustn't",
        "mustve": "must've",
        "neednt": "needn't",
        "notve": "not've",
        "oclock": "o'clock",
        "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at",
        "'ow'sat": "'ow's'at",
        "shant": "shan't",
        "shed've": "she'd've",
        "she'dve": "she'd've",
        "she's": "she's",
        "shouldve": "should've",
        "shouldnt": "shouldn't",
        "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd",
        "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll",
        "somebodys": "somebody's",
        "someoned": "someone'd",
        "someoned've": "someone'd've",
        "someone'dve": "someone'd've",
        "someonell": "someone'll",
        "someones": "someone's",
        "somethingd": "something'd",
        "somethingd've": "something'd've",
        "something'dve": "something'd've",
        "somethingll": "something'll",
        "thats": "that's",
        "thered": "there'd",
        "thered've": "there'd've",
        "there'dve": "there'd've",
        "therere": "there're",
        "theres": "there's",
        "theyd": "they'd",
        "theyd've": "they'd've",
        "they'dve": "they'd've",
        "theyll": "they'll",
        "theyre": "they're",
        "theyve": "they've",
        "twas": "'twas",
        "wasnt": "wasn't",
        "wed've": "we'd've",
        "we'dve": "we'd've",
        "weve": "we've",
        "werent": "weren't",
        "whatll": "what'll",
        "whatre": "what're",
        "whats": "what's",
        "whatve": "what've",
        "whens": "when's",
        "whered": "where'd",
        "wheres": "where's",
        "whereve": "where've",
        "whod": "who'd",
        "whod've": "who'd've",
        "who'dve": "who'd've",
        "wholl": "who'll",
        "whos": "who's",
        "whove": "who've",
        "whyll": "why'll",
        "whyre": "why're",
        "whys": "why's",
        "wont": "won't",
        "wouldve": "would've",
        "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've",
        "wouldn'tve": "wouldn't've",
        "yall": "y'all",
        "yall'll": "y'all'll",
        "y'allll": "y'all'll",
        "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've",
        "youd": "you'd",
        "youd've": "you'd've",
        "you'dve": "you'd've",
        "youll": "you'll",
        "youre": "you're",
        "youve": "you've",
    }
)

# The official ``manualMap``: whole words only, and only up to ten.
NUMBER_WORDS: Final = MappingProxyType(
    {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
)

ARTICLES: Final = frozenset({"a", "an", "the"})

# Order matters only for readability; each mark is handled independently. Note "." and "'" are absent:
# periods have their own rule below and apostrophes are kept (contractions need them).
PUNCTUATION: Final[tuple[str, ...]] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# The reference pattern verbatim. ``(?!<=\d)`` was meant as a look-behind but is a look-*ahead* for the
# literal text "<=" + digit, which can never match right before a "."; so the effective rule is "remove
# every '.' not followed by a digit" ("3.5" survives, "dog." and "3." lose their period).
_PERIOD_STRIP: Final = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS: Final = re.compile(r"(\d)(,)(\d)")

# The reference calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the positional
# *count* argument, and ``re.UNICODE == 32``, so at most 32 periods are removed per answer. Reproduced
# on purpose (it only matters for degenerate outputs such as "....." runs, but exactness is the point).
_MAX_PERIODS_REMOVED: Final = int(re.UNICODE)


def check_variant(variant: str) -> str:
    """Return ``variant`` if it names a known normalisation variant, else raise a ConfigError listing them."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown VQA accuracy variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return variant


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    Each punctuation mark is *deleted* when the original text has it next to a space (``"a -b"``) or when
    the text contains a digit-comma-digit pattern anywhere (``"1,000"``; then every mark is deleted, not
    only the comma); otherwise it is *replaced by a space* (``"t-shirt"`` -> ``"t shirt"``). The tests
    look at the original text, not the progressively edited one, as the reference does. Finally up to 32
    periods not followed by a digit are removed (see ``_MAX_PERIODS_REMOVED``).
    """
    has_digit_comma_digit = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma_digit:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words -> digits, drop articles, contractions.

    Splitting on whitespace and re-joining with single spaces also collapses the double spaces that
    punctuation processing can leave behind. (The reference uses ``manualMap.setdefault``, which grows the
    map as a side effect; ``get`` gives the same result without it.)
    """
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(prediction: str) -> str:
    """Normalise a model's answer exactly as the official script does (both variants agree on this)."""
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_ground_truth(answers: Sequence[str], variant: str = OFFICIAL) -> tuple[str, ...]:
    """Normalise the human answers of one question for comparison with a normalised prediction.

    ``"official"``: punctuation processing only, and only if the answers are not all identical (the
    reference's ``len(set(gtAnswers)) > 1``); ``"symmetric"``: the full prediction normalisation for each.
    Returns a new tuple in the same order; the input is untouched.
    """
    check_variant(variant)
    if variant == SYMMETRIC:
        return tuple(normalize_prediction(answer) for answer in answers)
    if len(set(answers)) > 1:
        return tuple(process_punctuation(answer) for answer in answers)
    return tuple(answers)


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA consensus score for strings compared *as given* (no normalisation here).

    For each answer i, count the other answers (by position, so repeated strings still count) equal to
    ``prediction``; ``acc_i = min(1, count / 3)``; return the mean over i, in [0, 1]. Computed with the
    same float operations as the reference so that rounded results agree to the last digit. An empty
    ``answers`` is an error: there is nothing to average over.
    """
    if len(answers) == 0:
        raise ValueError("leave_one_out_accuracy needs at least one ground-truth answer")
    matches = sum(1 for answer in answers if answer == prediction)
    per_answer = []
    for answer in answers:
        others_matching = matches - (1 if answer == prediction else 0)
        per_answer.append(min(1, float(others_matching) / 3))
    return float(sum(per_answer)) / len(per_answer)


def question_accuracy(prediction: str, answers: Sequence[str], *, variant: str = OFFICIAL) -> float:
    """VQA accuracy in [0, 1] of one raw prediction against one question's raw human answers."""
    return leave_one_out_accuracy(normalize_prediction(prediction), normalize_ground_truth(answers, variant))
