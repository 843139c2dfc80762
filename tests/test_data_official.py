"""Official VQAv2 / OK-VQA files: parsing, subsets, and errors that name the file, field and id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from capvqa.data.images import load_image
from capvqa.data.official import load_official, normalize_id
from capvqa.errors import DataError

QUESTIONS = [
    {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
    {"image_id": 42, "question": "Is it raining?", "question_id": 42001},
    {"image_id": 7, "question": "How many dogs are there?", "question_id": 7000},
]


def _answers(*values: str, raw: list[str] | None = None) -> list[dict]:
    answers = []
    for i, value in enumerate(values):
        answer = {"answer": value, "answer_confidence": "yes", "answer_id": i + 1}
        if raw is not None:
            answer["raw_answer"] = raw[i]
        answers.append(answer)
    return answers


def _annotation(question_id: int, image_id: int, answers: list[dict], answer_type="other", qtype="what"):
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": qtype,
        "answer_type": answer_type,
        "multiple_choice_answer": answers[0]["answer"] if answers else "",
        "answers": answers,
    }


ANNOTATIONS = [
    _annotation(42000, 42, _answers(*["red"] * 9, "orange"), qtype="what color is the"),
    _annotation(42001, 42, _answers(*["no"] * 10), answer_type="yes/no", qtype="is it"),
    _annotation(7000, 7, _answers(*["2"] * 8, "two", "3"), answer_type="number", qtype="how many"),
]


def _write(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def split_dir(tmp_path) -> Path:
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in (42, 7):
        Image.new("RGB", (8, 8), (image_id, 0, 0)).save(images / f"COCO_val2014_{image_id:012d}.jpg")
    _write(
        tmp_path / "q.json", {"data_subtype": "val2014", "task_type": "Open-Ended", "questions": QUESTIONS}
    )
    _write(tmp_path / "a.json", {"data_subtype": "val2014", "annotations": ANNOTATIONS})
    return tmp_path


def _load(split_dir: Path, **kwargs):
    kwargs.setdefault("annotations_path", split_dir / "a.json")
    return load_official(split_dir / "q.json", image_dir=split_dir / "val2014", **kwargs)


def test_items_in_file_order_with_answers(split_dir):
    source = _load(split_dir)
    items = list(source)
    assert source.has_annotations and len(source) == 3
    assert [i.question_id for i in items] == [42000, 42001, 7000]
    first = items[0]
    assert first.image_id == 42 and first.question == "What color is the bus?"
    assert first.answers == ("red",) * 9 + ("orange",)
    assert first.answer_type == "other" and first.question_type == "what color is the"
    assert first.raw_answers == ()
    assert first.image.path == split_dir / "val2014" / "COCO_val2014_000000000042.jpg"
    assert load_image(first.image).size == (8, 8)
    assert items[2].answers[-2:] == ("two", "3")


def test_reiterating_gives_the_same_items(split_dir):
    source = _load(split_dir)
    assert list(source) == list(source)


def test_without_annotations_items_have_no_answers(split_dir):
    source = _load(split_dir, annotations_path=None)
    items = list(source)
    assert not source.has_annotations
    assert all(i.answers == () and not i.is_annotated and i.answer_type is None for i in items)


def test_limit_and_subset(split_dir):
    assert [i.question_id for i in _load(split_dir, limit=2)] == [42000, 42001]
    assert len(_load(split_dir, limit=0)) == 0
    subset = _load(split_dir, question_ids=["7000", 42000])
    assert [i.question_id for i in subset] == [42000, 7000]  # file order, ids as strings or ints
    assert [i.question_id for i in _load(split_dir, question_ids=[7000, 42001], limit=1)] == [42001]


def test_unknown_question_ids_are_listed(split_dir):
    with pytest.raises(DataError, match=r"no question ids 999, 12345"):
        _load(split_dir, question_ids=[42000, 999, "12345"])


@pytest.mark.parametrize("limit", [-1, 1.5, "3", True])
def test_bad_limit(split_dir, limit):
    with pytest.raises(DataError, match="limit"):
        _load(split_dir, limit=limit)


def test_split_defaults_to_data_subtype_and_custom_image_names(split_dir):
    assert _load(split_dir).split == "val2014"
    custom = _load(split_dir, image_name="{image_id}.png", annotations_path=None)
    assert next(iter(custom)).image.path == split_dir / "val2014" / "42.png"
    other = _load(split_dir, split="train2014")
    assert next(iter(other)).image.path.name == "COCO_train2014_000000000042.jpg"


def test_bad_image_name_template(split_dir):
    with pytest.raises(DataError, match=r"pattern.*\{image_idx\}"):
        _load(split_dir, image_name="{image_idx}.jpg")


def test_missing_image_folder(split_dir):
    with pytest.raises(DataError, match="Image folder not found.*nowhere"):
        load_official(split_dir / "q.json", image_dir=split_dir / "nowhere")


def test_missing_image_fails_lazily_naming_the_file(split_dir):
    (split_dir / "val2014" / "COCO_val2014_000000000007.jpg").unlink()
    items = list(_load(split_dir))  # loading the split does not stat images
    with pytest.raises(DataError, match="COCO_val2014_000000000007.jpg"):
        load_image(items[2].image)


def test_malformed_json_names_file_and_position(split_dir):
    (split_dir / "q.json").write_text('{"questions": [\n  {"image_id": 1,\n   "question": }\n]}')
    with pytest.raises(DataError, match=r"q\.json is not valid JSON at line 3:16"):
        _load(split_dir)


def test_missing_questions_file(split_dir):
    with pytest.raises(DataError, match=r"Questions file not found.*nope\.json"):
        load_official(split_dir / "nope.json", image_dir=split_dir / "val2014")


def test_wrong_top_level(split_dir):
    _write(split_dir / "q.json", {"annotations": ANNOTATIONS})
    with pytest.raises(DataError, match=r"missing top-level field 'questions'"):
        _load(split_dir)
    _write(split_dir / "q.json", [1, 2])
    with pytest.raises(DataError, match=r"q\.json.*JSON object"):
        _load(split_dir)


def test_schema_error_names_field_index_and_question_id(split_dir):
    broken = [dict(q) for q in QUESTIONS]
    del broken[1]["question"]
    _write(split_dir / "q.json", {"questions": broken})
    with pytest.raises(DataError, match=r"questions\[1\] \(question_id 42001\): missing field 'question'"):
        _load(split_dir, annotations_path=None)
    broken[1]["question"] = 5
    _write(split_dir / "q.json", {"questions": broken})
    with pytest.raises(DataError, match=r"field 'question' must be a string"):
        _load(split_dir, annotations_path=None)


def test_annotation_schema_errors(split_dir):
    broken = json.loads(json.dumps(ANNOTATIONS))
    broken[2]["answers"][3] = {"answer_id": 4}
    _write(split_dir / "a.json", {"annotations": broken})
    with pytest.raises(DataError, match=r"annotations\[2\] \(question_id 7000\): answers\[3\]"):
        _load(split_dir)
    broken[2]["answers"] = "two"
    _write(split_dir / "a.json", {"annotations": broken})
    with pytest.raises(DataError, match=r"field 'answers' must be a list"):
        _load(split_dir)


@pytest.mark.parametrize(
    "answers, message",
    [
        ([], r"field 'answers' is empty"),  # would make the item unannotated and turn scoring off
        (_answers("", "  ", ""), r"every answer is an empty string"),
        (None, r"missing field 'answers'"),
        ({"answer": "no"}, r"field 'answers' must be a list, got dict"),
    ],
)
def test_annotation_without_usable_answers_is_rejected_at_load_naming_file_and_question(
    split_dir, answers, message
):
    broken = json.loads(json.dumps(ANNOTATIONS))
    if answers is None:
        del broken[1]["answers"]
    else:
        broken[1]["answers"] = answers
    _write(split_dir / "a.json", {"annotations": broken})
    with pytest.raises(DataError, match=r"a\.json: annotations\[1\] \(question_id 42001\): " + message):
        _load(split_dir)
    with pytest.raises(DataError, match=r"question_id 42001"):  # even when that question is not selected
        _load(split_dir, question_ids=[7000])


def test_some_empty_answers_among_real_ones_are_kept(split_dir):
    """Real annotators sometimes leave one answer blank; the question is still scorable."""
    partly = json.loads(json.dumps(ANNOTATIONS))
    partly[1]["answers"] = _answers("", *["no"] * 9)
    _write(split_dir / "a.json", {"annotations": partly})
    assert [item.answers for item in _load(split_dir)][1] == ("",) + ("no",) * 9


def test_missing_annotation_names_the_question(split_dir):
    _write(split_dir / "a.json", {"annotations": ANNOTATIONS[:2]})
    with pytest.raises(DataError, match=r"no annotation for 1 question.*7000"):
        _load(split_dir)


def test_annotation_for_another_image(split_dir):
    moved = json.loads(json.dumps(ANNOTATIONS))
    moved[1]["image_id"] = 43
    _write(split_dir / "a.json", {"annotations": moved})
    with pytest.raises(DataError, match=r"Question id 42001 is about image 42.*says image 43"):
        _load(split_dir)


def test_duplicate_question_ids(split_dir):
    _write(split_dir / "q.json", {"questions": QUESTIONS + [QUESTIONS[0], QUESTIONS[2]]})
    with pytest.raises(DataError, match=r"duplicate question ids: 42000, 7000"):
        _load(split_dir)
    _write(split_dir / "q.json", {"data_subtype": "val2014", "questions": QUESTIONS})
    _write(split_dir / "a.json", {"annotations": ANNOTATIONS + [ANNOTATIONS[1]]})
    with pytest.raises(DataError, match=r"duplicate annotation question ids: 42001"):
        _load(split_dir)


def test_extra_annotations_are_ignored(split_dir):
    extra = ANNOTATIONS + [_annotation(5000, 5, _answers("x"))]
    _write(split_dir / "a.json", {"annotations": extra})
    assert len(_load(split_dir)) == 3


def test_okvqa_raw_answers(split_dir):
    stemmed = ["race", "race", "racing", "race", "race", "race", "race", "race", "race", "race"]
    raw = ["racing", "race", "racing", "racing", "racing", "racing", "racing", "racing", "race", "racing"]
    okvqa = [
        _annotation(420005, 42, _answers(*stemmed, raw=raw), qtype="sports"),
    ]
    _write(
        split_dir / "q.json",
        {
            "questions": [
                {"image_id": 42, "question": "What sport can you use this for?", "question_id": 420005}
            ]
        },
    )
    _write(split_dir / "a.json", {"annotations": okvqa})
    (item,) = list(
        load_official(
            split_dir / "q.json",
            image_dir=split_dir / "val2014",
            annotations_path=split_dir / "a.json",
            split="val2014",
        )
    )
    assert item.answers == tuple(stemmed)
    assert item.raw_answers == tuple(raw)
    assert item.question_type == "sports"


def test_normalize_id():
    assert normalize_id("42") == 42 and normalize_id(" 42 ") == 42
    assert normalize_id(42) == 42 and normalize_id("q42") == "q42"
