"""The answer post-processing rules of Img2LLM and PICa (docs/methods.md#llm-and-answer-post-processing,
docs/methods.md#decoding-ensemble-and-post-processing)."""

import pytest

from capvqa.errors import ConfigError
from capvqa.eval.lemmatize import RuleLemmatizer
from capvqa.text.answer_postprocess import (
    img2llm_answer,
    img2llm_okvqa_answer,
    pica_answer,
    postprocess_answer,
    postprocess_name,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Red", "red"),
        (" Two dogs. Question: what", "two dogs"),
        (" Yes\nQuestion: Is it", "yes"),
        ("  A Frisbee  ", "a frisbee"),
        (". after the cut", ""),
        ("3.5 meters", "3"),  # the reference cuts at every period, decimals included
        ("", ""),
    ],
)
def test_img2llm_cuts_at_first_period_or_newline_and_lowercases(raw, expected):
    assert img2llm_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Because it is raining.", "rain"),
        (" It is flying", "fly"),
        (" They are dogs\n", "dog"),
        (" on the table", "the table"),
        (" for surfing with friends", "surf friend"),
        (" Sitting at home about 1990s", "sit home 1990s"),
        (" 3 cats", "3 cat"),
        (" it is in 2 boxes", "2 box"),
        (" tomatoes", "tomato"),
        (" into the water", "into the water"),  # only whole function words are dropped
    ],
)
def test_img2llm_okvqa_extras(raw, expected):
    assert img2llm_okvqa_answer(raw, RuleLemmatizer()) == expected


def test_img2llm_okvqa_drops_only_one_leading_phrase_and_only_at_the_start():
    lemma = RuleLemmatizer()
    assert img2llm_okvqa_answer("because it is it is red", lemma) == "it is red"
    assert img2llm_okvqa_answer("red because it is wet", lemma) == "red because it is wet"


def test_img2llm_okvqa_without_lemmatizer_keeps_word_forms():
    assert img2llm_okvqa_answer(" They are running dogs", None) == "running dogs"


def test_okvqa_lemmatizer_sees_one_word_at_a_time_and_digits_are_kept():
    seen = []

    def lemmatize(word: str) -> str:
        seen.append(word)
        return word.upper()

    assert img2llm_okvqa_answer("two 2nd cats", lemmatize) == "TWO 2nd CATS"
    assert seen == ["two", "cats"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" The Eiffel Tower.", "eiffel tower"),
        ("a dog, an apple, the end", "dog apple end"),
        (" to the beach", "beach"),
        ("3.5", "35"),  # PICa strips every period
        ("  many   spaces ", "many spaces"),
        ("theater", "theater"),  # words, not prefixes
        ("", ""),
    ],
)
def test_pica_rule(raw, expected):
    assert pica_answer(raw) == expected


def test_dispatch_and_names():
    assert postprocess_answer(" Red. car", "img2llm") == "red"
    assert postprocess_answer(" The red car", "pica") == "red car"
    assert postprocess_answer(" The red car\n", "none") == "The red car"
    assert postprocess_answer(" they are cats", "img2llm", okvqa=True, lemmatize=RuleLemmatizer()) == "cat"
    assert postprocess_name("img2llm", True, "rule") == "img2llm+okvqa(lemmatizer=rule)"
    assert postprocess_name("pica", False) == "pica"


def test_bad_rules_are_config_errors():
    with pytest.raises(ConfigError, match="unknown postprocess"):
        postprocess_answer("x", "lavis")
    with pytest.raises(ConfigError, match="okvqa"):
        postprocess_answer("x", "pica", okvqa=True)
