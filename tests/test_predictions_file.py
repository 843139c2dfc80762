"""The official results format: strict loading with actionable errors, atomic writing, round trips."""

from __future__ import annotations

import json
import os
import stat

import pytest

from capvqa.errors import DataError, UserError
from capvqa.eval import predictions as predictions_module
from capvqa.eval.predictions import load_predictions, parse_predictions, write_predictions


def _write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_round_trip_keeps_ids_types_order_and_unicode(tmp_path):
    predictions = {262148000: "yes", "okvqa_2971475": "café", 3: "two dogs", 1: ""}
    path = write_predictions(tmp_path / "results.json", predictions)
    loaded = load_predictions(path)
    assert loaded == predictions
    assert list(loaded) == list(predictions)
    assert json.loads(path.read_text(encoding="utf-8"))[0] == {"question_id": 262148000, "answer": "yes"}


def test_written_file_is_official_format_and_one_record_per_line(tmp_path):
    path = write_predictions(tmp_path / "r.json", {1: "a", 2: "b"})
    assert path.read_text(encoding="utf-8").splitlines() == [
        "[",
        '{"question_id": 1, "answer": "a"},',
        '{"question_id": 2, "answer": "b"}',
        "]",
    ]
    assert load_predictions(write_predictions(tmp_path / "empty.json", {})) == {}


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "results.json"  # parent created on demand
    write_predictions(path, {1: "old"})
    write_predictions(path, {1: "new"})
    assert load_predictions(path) == {1: "new"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044  # readable by others, unlike mkstemp's 0600


def test_failed_write_keeps_previous_file_and_cleans_up(tmp_path, monkeypatch):
    path = write_predictions(tmp_path / "results.json", {1: "old"})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(predictions_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(path, {1: "new"})
    monkeypatch.undo()
    assert load_predictions(path) == {1: "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_write_rejects_invalid_predictions_before_touching_disk(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(DataError, match="'answer' must be a string"):
        write_predictions(path, {1: 5})
    with pytest.raises(DataError, match="'question_id' must be an integer or a string"):
        write_predictions(path, {True: "yes"})
    with pytest.raises(DataError, match="duplicate question_id"):
        write_predictions(path, {1: "a", "1": "b"})
    assert list(tmp_path.iterdir()) == []


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question_id": 1, "answer": "yes"}\n  {"question_id": 2}\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_predictions(path)
    message = str(info.value)
    assert f"{path}:3:3:" in message
    assert "invalid JSON" in message
    assert isinstance(info.value, UserError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.json"):
        load_predictions(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        load_predictions(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"question_id": 1, "answer": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_predictions(path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"1": "yes"}, "JSON list .*got a JSON object"),
        ("yes", "got a JSON string"),
        (None, "got a JSON null"),
    ],
)
def test_top_level_must_be_a_list(tmp_path, data, expected):
    with pytest.raises(DataError, match=expected):
        load_predictions(_write_json(tmp_path / "r.json", data))


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([{"question_id": 1, "answer": "a"}, ["x"]], r"item 1 is a JSON array"),
        ([{"answer": "a"}], r"item 0 has no 'question_id' field"),
        ([{"question_id": 1, "answer": "a"}, {"question_id": 2}], r"item 1 has no 'answer' field"),
        ([{"question_id": 1, "answer": 3}], r"item 0 \(question_id 1\): 'answer' must be a string, got num"),
        ([{"question_id": 1, "answer": None}], r"item 0 .*'answer' must be a string, got null"),
        ([{"question_id": 1, "answer": ["a"]}], r"item 0 .*'answer' must be a string, got array"),
        ([{"question_id": True, "answer": "a"}], r"item 0: 'question_id' must be .*got boolean True"),
        ([{"question_id": 1.5, "answer": "a"}], r"item 0: 'question_id' must be .*got number 1.5"),
        ([{"question_id": None, "answer": "a"}], r"item 0: 'question_id' must be .*got null"),
    ],
)
def test_bad_records_name_index_and_field(tmp_path, records, expected):
    path = _write_json(tmp_path / "r.json", records)
    with pytest.raises(DataError, match=expected) as info:
        load_predictions(path)
    assert str(path) in str(info.value)


def test_duplicate_question_ids_are_named(tmp_path):
    records = [{"question_id": 7, "answer": "a"}, {"question_id": 8, "answer": "b"}]
    records.append({"question_id": 7, "answer": "c"})
    with pytest.raises(DataError, match=r"duplicate question_id 7 at items 0 and 2"):
        load_predictions(_write_json(tmp_path / "r.json", records))
    # equal as strings is equal for scoring, so it is a duplicate too
    records = [{"question_id": 7, "answer": "a"}, {"question_id": "7", "answer": "b"}]
    with pytest.raises(DataError, match=r"duplicate question_id '7' at items 0 and 1"):
        load_predictions(_write_json(tmp_path / "r.json", records))


def test_extra_keys_are_ignored_and_string_ids_kept():
    records = [{"question_id": "abc", "answer": "x", "question": "what?"}, {"question_id": 0, "answer": "y"}]
    assert parse_predictions(records) == {"abc": "x", 0: "y"}


def test_parse_names_its_source():
    with pytest.raises(DataError, match=r"^run-7: "):
        parse_predictions({}, source="run-7")


def test_no_side_effect_files_from_loading(tmp_path):
    path = write_predictions(tmp_path / "r.json", {1: "a"})
    before = os.listdir(tmp_path)
    load_predictions(path)
    assert os.listdir(tmp_path) == before
