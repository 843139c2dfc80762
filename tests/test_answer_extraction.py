"""Img2LLM candidate-answer extraction: reference counting, the rule extractor, and the spaCy path."""

import subprocess
import sys

import pytest

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput, semantic_config
from capvqa.errors import ConfigError, ModelLoadError
from capvqa.stages import answer_extraction
from capvqa.stages.answer_extraction import (
    AnswerExtraction,
    CaptionAnalysis,
    rank_candidate_answers,
    rule_analysis,
)
from capvqa.stages.caption_filter import FilteredCaptions


def entry(captions, key="k"):
    item = VQAItem(question_id=key, image_id=1, question="what is it?", image=ImageRef(data=b"x"))
    scores = [1.0] * len(captions)
    filtered = FilteredCaptions(captions=list(captions), scores=scores, all_scores=scores, threshold=0.5)
    return StageInput(item=item, item_key=key, image_hash="h", upstream={"captions": filtered})


def analysis(tokens, entities=(), chunks=()):
    return CaptionAnalysis(tokens=tuple(tokens), entities=tuple(entities), noun_chunks=tuple(chunks))


def test_ranks_by_mention_count_ties_by_first_mention_and_adds_yes():
    analyses = [
        analysis([("a", "DET"), ("red", "ADJ"), ("bus", "NOUN")], chunks=["a red bus"]),
        analysis([("a", "DET"), ("bus", "NOUN"), ("parked", "VERB")], chunks=["a bus"]),
        analysis([("two", "NUM"), ("buses", "NOUN")], entities=["two"], chunks=["two buses"]),
    ]
    result = rank_candidate_answers(analyses, num_answers=30, extractor="rule")
    assert result.answers == ["bus", "red", "a red bus", "parked", "a bus", "two", "buses", "two buses",
                              "yes"]
    assert result.counts == [2, 1, 1, 1, 1, 1, 1, 1, 0]
    assert result.answer_captions["bus"] == [0, 1]
    assert result.answer_captions["yes"] == []
    assert result.extractor == "rule"


def test_keeps_top_answers_then_yes_once():
    analyses = [analysis([("dog", "NOUN")] * 3 + [("cat", "NOUN")] * 2 + [("yes", "INTJ"), ("park", "NOUN")])]
    result = rank_candidate_answers(analyses, num_answers=2, extractor="rule")
    assert result.answers == ["dog", "cat", "yes"]
    assert result.counts == [3, 2, 0]
    # "yes" already among the top answers is not added a second time
    yes_twice = rank_candidate_answers([analysis([("yes", "NOUN"), ("dog", "NOUN")])], 30, "rule")
    assert yes_twice.answers == ["yes", "dog"] and yes_twice.counts == [1, 1]


def test_reference_counting_rules():
    """One-word chunks count next to their token; an entity counts only when not mentioned before;
    chunks of 4+ words are no candidates; mentions are lower-cased."""
    analyses = [
        analysis([("Grass", "NOUN")], entities=["Paris", "grass"],
                 chunks=["grass", "a very big green field"]),
        analysis([("field", "NOUN")], entities=["Paris"], chunks=["field"]),
    ]
    result = rank_candidate_answers(analyses, 30, "rule")
    assert result.answers == ["grass", "field", "paris", "yes"]
    assert result.counts == [2, 2, 1, 0]
    assert result.answer_captions["paris"] == [0]


def test_rule_extractor_finds_content_words_entities_and_chunks():
    found = rule_analysis("a man riding a brown horse in New York with 2 dogs.")
    content = [text for text, pos in found.tokens if pos in answer_extraction.OPEN_POS]
    assert content == ["man", "riding", "brown", "horse", "New", "York", "2", "dogs"]
    assert dict(found.tokens)["2"] == "NUM" and dict(found.tokens)["riding"] == "VERB"
    assert found.entities == ("New York",)
    assert found.noun_chunks == ("a man", "a brown horse", "New York", "2 dogs")


def test_stage_rule_extractor_over_a_batch():
    stage = AnswerExtraction(extractor="rule", num_answers=3)
    stage.setup(None)
    results = stage.run([
        entry(["a man riding a horse on the beach", "a man with a dog on the beach",
               "two dogs on the beach"]),
        entry([]),
    ])
    assert results[0].answers == ["beach", "the beach", "man", "yes"]
    assert results[0].answer_captions["man"] == [0, 1]
    assert results[1].answers == ["yes"] and results[1].counts == [0]
    assert {r.extractor for r in results} == {"rule"}


def test_auto_is_resolved_before_the_cache_key_is_taken(monkeypatch):
    monkeypatch.setattr(answer_extraction, "spacy_available", lambda model: False)
    assert semantic_config(AnswerExtraction().config)["extractor"] == "rule"
    monkeypatch.setattr(answer_extraction, "spacy_available", lambda model: True)
    assert semantic_config(AnswerExtraction().config)["extractor"] == "spacy"
    assert "batch_size" not in semantic_config(AnswerExtraction().config)
    with pytest.raises(ConfigError, match="unknown extractor"):
        AnswerExtraction(extractor="nltk")


def test_module_does_not_import_spacy():
    code = ("import sys, capvqa.stages.answer_extraction as m; "
            "m.rank_candidate_answers([m.rule_analysis('a dog')], 30, 'rule'); "
            "assert 'spacy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# spaCy path, with a small hand-made pipeline (en_core_web_sm cannot be downloaded here)

TOY_POS = {"a": "DET", "the": "DET", "man": "NOUN", "dog": "NOUN", "dogs": "NOUN", "riding": "VERB",
           "horse": "NOUN", "brown": "ADJ", "two": "NUM", "quickly": "ADV", "on": "ADP", "beach": "NOUN",
           "paris": "PROPN", "in": "ADP", "runs": "VERB"}


def _toy_parser(doc):
    """Noun phrases (DET/ADJ/NUM + nouns) headed by their last noun, enough for spaCy's noun_chunks."""
    for token in doc:
        token.dep_ = "dep"
    i = 0
    while i < len(doc):
        j = i
        while j < len(doc) and doc[j].pos_ in ("DET", "ADJ", "NUM", "NOUN", "PROPN"):
            j += 1
        if j > i and doc[j - 1].pos_ in ("NOUN", "PROPN"):
            head = doc[j - 1]
            for k in range(i, j - 1):
                doc[k].head, doc[k].dep_ = head, ("det" if doc[k].pos_ == "DET" else "amod")
            head.dep_ = "nsubj"
        i = max(j, i + 1)
    return doc


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    spacy = pytest.importorskip("spacy")
    from spacy.language import Language

    if "capvqa_toy_parser" not in Language.factories:
        Language.component("capvqa_toy_parser", func=_toy_parser)
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for word, pos in TOY_POS.items():
        ruler.add([[{"LOWER": word}]], {"POS": pos})
    nlp.add_pipe("capvqa_toy_parser")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "GPE", "pattern": "paris"},
                                               {"label": "CARDINAL", "pattern": "two"}])
    folder = tmp_path_factory.mktemp("spacy") / "toy_pipeline"
    nlp.to_disk(folder)
    return folder


def test_spacy_path_with_a_pipeline_folder(toy_pipeline):
    stage = AnswerExtraction(spacy_model=str(toy_pipeline))  # "auto" finds spaCy and the folder
    assert stage.config.extractor == "spacy"
    stage.setup(None)
    calls = []
    nlp = stage._nlp

    class CountingPipe:
        def pipe(self, texts):
            calls.append(list(texts))
            return nlp.pipe(calls[-1])

    stage._nlp = CountingPipe()
    results = stage.run([
        entry(["a man riding a brown horse in paris.", "two dogs on the beach"]),
        entry(["the dog runs quickly"]),
    ])
    assert len(calls) == 1 and calls[0][0] == "a man riding a brown horse in paris"  # one pipe per batch
    first = results[0]
    assert first.extractor == f"spacy:{toy_pipeline}"
    # paris: an entity (PROPN is no open class) and a one-word chunk; two: NUM token, entity not re-counted
    assert first.answers == ["paris", "man", "riding", "brown", "horse", "a man", "a brown horse", "two",
                             "dogs", "beach", "two dogs", "the beach", "yes"]
    assert first.counts == [2] + [1] * 11 + [0]
    assert first.answer_captions["dogs"] == [1]
    assert results[1].answers == ["dog", "runs", "quickly", "the dog", "yes"]


def test_spacy_requested_but_missing_is_an_actionable_error():
    stage = AnswerExtraction(extractor="spacy", spacy_model="capvqa_no_such_spacy_pipeline")
    with pytest.raises(ModelLoadError, match="spacy"):
        stage.setup(None)
