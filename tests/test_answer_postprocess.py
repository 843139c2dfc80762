"""The answer post-processing rules of Img2LLM and PICa (docs/methods.md#llm-and-answer-post-processing,
docs/methods.md#decoding-ensemble-and-post-processing). Checked against answers made by the Img2LLM
authors' own code in tests/parity/test_img2llm_prompt_parity.py."""

import time
import zipfile
from pathlib import Path

import pytest

from capvqa.errors import ConfigError, ModelLoadError
from capvqa.eval import lemmatize
from capvqa.eval.lemmatize import (
    DataLocation,
    RuleLemmatizer,
    RuleOkvqaAnalyzer,
    WordNetMorphy,
    find_tagger_model,
    find_wordnet,
    make_okvqa_analyzer,
    resolve_okvqa_analyzer_kind,
)
from capvqa.text.answer_postprocess import (
    img2llm_answer,
    okvqa_words,
    pica_answer,
    postprocess_answer,
    postprocess_name,
    strip_leading_phrases,
)


class Table:
    """An analyzer from a dict token -> (tag, lemma); whitespace tokens, untagged words keep their form."""

    name = "table"

    def __init__(self, **entries):
        self.entries = entries

    def analyze(self, text):
        return [(w, *self.entries.get(w, ("NN", w))) for w in text.split()]


# --------------------------------------------------------------------------------------------------
# The rule's parts, readable


def test_cut_lowercases_and_without_cut_nothing_is_lemmatised():
    lemmas = Table(dogs=("NNS", "dog"))
    assert img2llm_answer(" Dogs. Question", okvqa=True, analyzer=lemmas) == "dog"
    assert img2llm_answer(" Dogs", okvqa=True, analyzer=lemmas, stopped=False) == "dogs"
    # capvqa's backends cut at the stop, so "stopped" says the reference would have found it
    assert img2llm_answer(" Dogs", okvqa=True, analyzer=lemmas, stopped=True) == "dog"
    assert img2llm_answer("3.5 meters") == "3"  # every period cuts, decimals included
    assert img2llm_answer(". after the cut", okvqa=True, analyzer=lemmas) == ""
    assert img2llm_answer("") == ""


def test_okvqa_words_guards_digits_ed_and_past_tags_then_drops_function_words():
    analysis = [("dogs", "NNS", "dog"), ("ons", "NNS", "on"), ("painted", "JJ", "paint"),
                ("made", "VBN", "make"), ("3", "CD", "3"), ("cats", "NNS", "cat"),
                ("with", "IN", "with")]  # fmt: skip
    # "ons" is lemmatised to "on" and then dropped; after the digit nothing is lemmatised
    assert okvqa_words(analysis) == ["dog", "painted", "made", "3", "cats"]
    assert okvqa_words([("x²", "NN", "x"), ("dogs", "NNS", "dog")]) == ["x²", "dogs"]  # any Unicode digit
    assert okvqa_words([("up", "RP", "up"), ("to", "TO", "to")]) == ["up"]  # "up to" never matches a token


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("because it is raining", "raining"),
        ("because she is tired", "is tired"),  # "because she" is checked before "because she is"
        ("because it's cold", "s cold"),  # "because it" is checked before "because it's"
        ("because it is they are red", "red"),  # later checks see what earlier ones left
        ("they be sleeping", "sleeping"),
        ("it be", ""),
        ("it is", ""),
        ("itemize", "itemize"),
        ("it isn't", "'t"),  # the character after the phrase goes too, whatever it is
        ("red because it is wet", "red because it is wet"),  # only at the start
        (" it is red", " it is red"),  # a leading space stops every check
    ],
)
def test_strip_leading_phrases_as_remove_useless_token(text, expected):
    assert strip_leading_phrases(text) == expected


def test_okvqa_without_analyzer_drops_function_words_only():
    assert img2llm_answer(" They are sitting on chairs\n", okvqa=True) == "sitting chairs"


def test_a_word_lemmatizer_is_adapted_one_word_at_a_time():
    seen = []

    def mark(word: str) -> str:
        seen.append(word)
        return word + "x"

    assert img2llm_answer("two 2nd cats", okvqa=True, analyzer=mark) == "twox 2nd cats"
    assert seen == ["two", "2nd", "cats"]
    assert postprocess_answer(" they are cats", "img2llm", okvqa=True, lemmatize=RuleLemmatizer()) == "cat"


# --------------------------------------------------------------------------------------------------
# WordNet lemmas as NLTK's WordNetLemmatizer


HEADER = "  1 This software and database is being provided\n  2 WordNet 3.0 Copyright 2006 by Princeton.\n"
NOUNS = ["axis", "ax", "dog", "glass", "man", "bus", "u", "us", "a"]
VERBS = ["be", "glass", "run", "fly", "leave"]


def _wordnet_folder(root: Path, version: str = "3.0") -> Path:
    """A tiny WordNet in the database's file format (licence header, index lines, exception lists)."""
    root.mkdir(parents=True, exist_ok=True)
    header = HEADER.replace("3.0", version)
    (root / "index.noun").write_text(header + "".join(f"{w} n 1 1 @ 1 0 00000001  \n" for w in NOUNS))
    (root / "index.verb").write_text(header + "".join(f"{w} v 1 1 @ 1 0 00000002  \n" for w in VERBS))
    (root / "noun.exc").write_text("axes ax axis\nmen man\n")
    (root / "verb.exc").write_text("was be\nleft leave\nran run\n")
    return root


def test_wordnet_morphy_rules(tmp_path):
    wordnet = WordNetMorphy.load(DataLocation(_wordnet_folder(tmp_path / "wn"), "test"))
    assert wordnet.version == "3.0"
    assert wordnet.lemmatize("axes", "n") == "ax"  # exception list, shortest lemma
    assert wordnet.lemmatize("dogs", "n") == "dog"
    assert wordnet.lemmatize("glasses", "v") == "glass"  # rules tried in order, first hit kept
    assert wordnet.lemmatize("busses", "n") == "bus"  # "busse" is no lemma; applied again: "bus"
    assert wordnet.lemmatize("us", "n") == "u"  # the form itself and "u" are lemmas: the shorter wins
    assert wordnet.lemmatize("was", "v") == "be"
    assert wordnet.lemmatize("was", "n") == "was"  # unknown: unchanged
    start = time.perf_counter()
    assert wordnet.lemmatize("es" * 40, "v") == "es" * 40  # NLTK's repeated rules grow exponentially here
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------------------
# Finding the data, choosing the analyzer


@pytest.fixture()
def no_installed_data(monkeypatch, tmp_path):
    """Nothing found unless a test puts it under the returned NLTK data folder."""
    data = tmp_path / "nltk_data"
    monkeypatch.setattr(lemmatize, "_nltk_data_dirs", lambda: [data])
    monkeypatch.setattr(lemmatize, "_distribution_file", lambda *args: None)
    monkeypatch.setattr(lemmatize, "DEBIAN_WORDNET", tmp_path / "no-debian")
    monkeypatch.delenv(lemmatize.WORDNET_ENV, raising=False)
    return data


def test_find_wordnet_sources_and_version(no_installed_data, tmp_path, monkeypatch):
    assert find_wordnet() is None
    folder = _wordnet_folder(no_installed_data / "corpora" / "wordnet")
    assert find_wordnet() == DataLocation(folder, "NLTK data")
    # NLTK's own download keeps the zip
    archive = no_installed_data / "corpora" / "wordnet.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in folder.iterdir():
            z.write(path, f"wordnet/{path.name}")
    for path in folder.iterdir():
        path.unlink()
    found = find_wordnet()
    assert found == DataLocation(archive, "NLTK data", member="wordnet")
    assert WordNetMorphy.load(found).lemmatize("dogs", "n") == "dog"
    # another WordNet version is passed over; the environment variable comes first
    monkeypatch.setenv(lemmatize.WORDNET_ENV, str(_wordnet_folder(tmp_path / "wn31", "3.1")))
    assert find_wordnet() == found
    monkeypatch.setenv(lemmatize.WORDNET_ENV, str(_wordnet_folder(tmp_path / "wn30")))
    assert find_wordnet().origin == lemmatize.WORDNET_ENV


def test_find_tagger_model_needs_all_three_files(no_installed_data):
    folder = no_installed_data / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    for name in lemmatize.TAGGER_FILES[:2]:
        (folder / name).write_text("{}")
    assert find_tagger_model() is None
    (folder / lemmatize.TAGGER_FILES[2]).write_text('["NN", "VBD", "VBN"]')
    assert find_tagger_model() == folder


def test_a_damaged_tagger_model_is_a_clear_error(tmp_path):
    for name in lemmatize.TAGGER_FILES:
        (tmp_path / name).write_text("{not json")
    with pytest.raises(ModelLoadError, match="does not hold NLTK's English averaged-perceptron tagger"):
        lemmatize._load_tagger_model(tmp_path)


def test_analyzer_choice(no_installed_data):
    assert resolve_okvqa_analyzer_kind("auto") == "rule"  # nothing installed here
    assert isinstance(make_okvqa_analyzer("auto"), RuleOkvqaAnalyzer)
    assert make_okvqa_analyzer("none") is None
    with pytest.raises(ConfigError, match="unknown OK-VQA lemmatizer 'bogus'"):
        make_okvqa_analyzer("bogus")
    with pytest.raises(ModelLoadError, match=r"capvqa\[okvqa\]"):
        lemmatize.NltkOkvqaAnalyzer()


def test_rule_analyzer_tokens_tags_and_lemmas():
    rows = RuleOkvqaAnalyzer().analyze("they don't know, the dog's toys were made")
    assert [r[0] for r in rows] == [
        "they",
        "do",
        "n't",
        "know",
        ",",
        "the",
        "dog",
        "'s",
        "toys",
        "were",
        "made",
    ]
    assert {r[0] for r in rows if r[1] == "VBD"} == {"were", "made"}
    assert (
        img2llm_answer(" it is sitting on the benches\n", okvqa=True, analyzer=RuleOkvqaAnalyzer())
        == "sit the bench"
    )


# --------------------------------------------------------------------------------------------------
# PICa, dispatch, names


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
    assert postprocess_name("img2llm", True, "rule") == "img2llm+okvqa(lemmatizer=rule)"
    assert postprocess_name("img2llm", True, None) == "img2llm+okvqa(lemmatizer=none)"
    assert postprocess_name("pica", False) == "pica"


def test_bad_rules_are_config_errors():
    with pytest.raises(ConfigError, match="unknown postprocess"):
        postprocess_answer("x", "lavis")
    with pytest.raises(ConfigError, match="okvqa"):
        postprocess_answer("x", "pica", okvqa=True)
