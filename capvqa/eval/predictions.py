"""Read and write predictions in the official VQA results format: ``[{"question_id": ..., "answer": ...}]``.

This is the format EvalAI accepts and the official evaluation script reads, so files we write can be
submitted as they are. Question ids are ints for VQAv2 and strings for the Hugging Face OK-VQA export;
both are kept as given. Validation is strict and says where the problem is (file, line:column, item
index, field, id), because a silently skipped or duplicated prediction changes the score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capvqa.atomic import atomic_write_text
from capvqa.errors import DataError

QuestionId = int | str

_FORMAT_HINT = 'expected the official VQA results format: a JSON list of {"question_id": ..., "answer": ...}'


def parse_predictions(records: Any, source: str = "<predictions>") -> dict[QuestionId, str]:
    """Validate decoded results JSON and return ``{question_id: answer}`` in file order.

    ``source`` names the origin in error messages. Extra keys in a record are ignored (some tools add
    the question text). Ids that are equal as strings (``123`` and ``"123"``) are duplicates, because
    scoring matches ids by their string form.
    """
    if not isinstance(records, list):
        raise DataError(f"{source}: {_FORMAT_HINT}; got a JSON {_json_type(records)}")
    predictions: dict[QuestionId, str] = {}
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        question_id, answer = _check_record(record, index, source)
        key = str(question_id)
        if key in first_index:
            raise DataError(
                f"{source}: duplicate question_id {question_id!r} at items {first_index[key]} and {index}; "
                "keep exactly one answer per question"
            )
        first_index[key] = index
        predictions[question_id] = answer
    return predictions


def _check_record(record: Any, index: int, source: str) -> tuple[QuestionId, str]:
    where = f"{source}: item {index}"
    if not isinstance(record, dict):
        raise DataError(
            f'{where} is a JSON {_json_type(record)}, expected an object with "question_id" and "answer"'
        )
    for field in ("question_id", "answer"):
        if field not in record:
            raise DataError(f"{where} has no {field!r} field (keys: {sorted(record)})")
    question_id, answer = record["question_id"], record["answer"]
    # bool is an int subclass in Python; a true/false id is always a bug upstream.
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise DataError(f"{where}: 'question_id' {_got(question_id, 'an integer or a string')}")
    if not isinstance(answer, str):
        raise DataError(f"{where} (question_id {question_id!r}): 'answer' {_got(answer, 'a string')}")
    return question_id, answer


def _got(value: Any, expected: str) -> str:
    """``must be a string, got null`` / ``must be a string, got number 3`` (null has nothing more to show)."""
    shown = "" if value is None else f" {value!r}"
    return f"must be {expected}, got {_json_type(value)}{shown}"


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages a user can relate to their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def load_predictions(path: str | os.PathLike[str]) -> dict[QuestionId, str]:
    """Load a results file; raises DataError naming the file and the exact problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"predictions file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"predictions path is a directory, expected a JSON file: {path}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    return parse_predictions(records, source=str(path))


def predictions_to_records(predictions: Mapping[QuestionId, str]) -> list[dict[str, QuestionId]]:
    """The results-format records for ``predictions``, in mapping order, after the loader's checks."""
    records = [{"question_id": qid, "answer": answer} for qid, answer in predictions.items()]
    parse_predictions(records, source="predictions to write")  # same rules as reading: round-trips safely
    return records


def write_predictions(path: str | os.PathLike[str], predictions: Mapping[QuestionId, str]) -> Path:
    """Write ``predictions`` as a results file atomically and return its path.

    The JSON goes to a temporary file in the target directory which is then renamed over ``path``, so a
    crash never leaves a truncated file where a finished one is expected. One record per line keeps the
    file diffable and makes line numbers in error messages useful.
    """
    path = Path(path)
    records = predictions_to_records(predictions)
    body = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    text = f"[\n{body}\n]\n" if records else "[]\n"
    atomic_write_text(path, text)
    return path
