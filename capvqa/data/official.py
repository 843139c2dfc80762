"""Loader for the official VQAv2 / OK-VQA question and annotation files plus a COCO image folder.

The files::

    questions JSON    {"data_subtype": "val2014", ..., "questions": [{image_id, question, question_id}]}
    annotations JSON  {"annotations": [{question_id, image_id, question_type, answer_type,
                                        multiple_choice_answer,
                                        answers: [{answer, answer_confidence, answer_id}]}]}
    images            {image_dir}/COCO_{split}_{image_id:012d}.jpg   (the name pattern is configurable)

OK-VQA v1.1 answers also carry ``raw_answer``: ``answer`` (stemmed, what papers score against) goes to
``VQAItem.answers`` and ``raw_answer`` to ``VQAItem.raw_answers``.

Split of work: :func:`read_json` is the only I/O on the JSON files; :func:`parse_questions`,
:func:`parse_annotations` and :func:`select_questions` are pure and check everything a user could get
wrong, naming the file, the field and the item (index or question id). Images are *not* checked here —
a stat per image on a 214k-question split would cost more than it saves — they fail, naming the file,
when a stage loads them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capvqa.data.items import ImageRef, VQAItem
from capvqa.errors import DataError

#: COCO's file-name pattern; ``split`` is the image split (``val2014``), not the question split.
DEFAULT_IMAGE_NAME = "COCO_{split}_{image_id:012d}.jpg"

ItemId = int | str
#: Maps an image id to the file that holds it.
ImagePathFn = Callable[[ItemId], Path]

_MAX_IDS_IN_MESSAGE = 10


@dataclass(frozen=True, slots=True)
class QuestionRecord:
    question_id: ItemId
    image_id: ItemId
    question: str


@dataclass(frozen=True, slots=True)
class AnnotationRecord:
    question_id: ItemId
    image_id: ItemId
    answers: tuple[str, ...]
    raw_answers: tuple[str, ...]
    answer_type: str | None
    question_type: str | None


@dataclass(frozen=True)
class QuestionsFile:
    """The parsed questions file: its ``data_subtype`` (e.g. ``val2014``, may be absent) and questions."""

    data_subtype: str | None
    questions: tuple[QuestionRecord, ...]


# --------------------------------------------------------------------------------------------- I/O


def read_json(path: Path, *, what: str) -> Any:
    """Parse a JSON file; any failure is a :class:`DataError` naming the file (and line:column)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{what} should be a JSON file but is a folder: {path}") from None
    except json.JSONDecodeError as error:
        raise DataError(
            f"{what} {path} is not valid JSON at line {error.lineno}:{error.colno}: {error.msg}. "
            "The file may be truncated; re-download it."
        ) from None
    except UnicodeDecodeError as error:
        raise DataError(f"{what} {path} is not UTF-8 text ({error}); is it really a JSON file?") from None


# ------------------------------------------------------------------------------------ pure parsing


def parse_questions(document: Any, *, source: str) -> QuestionsFile:
    """Validate an official questions document and return its records in file order."""
    entries = _top_level_list(document, "questions", source=source, hint="a VQA questions file")
    subtype = document.get("data_subtype")
    if subtype is not None and not isinstance(subtype, str):
        raise DataError(f"{source}: top-level field 'data_subtype' must be a string, got {subtype!r}")
    records = []
    for index, entry in enumerate(entries):
        where = _where(source, "questions", index, entry)
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: each question must be an object, got {type(entry).__name__}")
        records.append(
            QuestionRecord(
                question_id=_id_field(entry, "question_id", where),
                image_id=_id_field(entry, "image_id", where),
                question=_question_text(entry, where),
            )
        )
    _reject_duplicates((r.question_id for r in records), source=source, what="question ids")
    return QuestionsFile(data_subtype=subtype, questions=tuple(records))


def parse_annotations(document: Any, *, source: str) -> dict[ItemId, AnnotationRecord]:
    """Validate an official annotations document; returns records keyed by normalised question id."""
    entries = _top_level_list(document, "annotations", source=source, hint="a VQA annotations file")
    by_id: dict[ItemId, AnnotationRecord] = {}
    duplicates: list[ItemId] = []
    for index, entry in enumerate(entries):
        where = _where(source, "annotations", index, entry)
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: each annotation must be an object, got {type(entry).__name__}")
        question_id = _id_field(entry, "question_id", where)
        answers, raw_answers = _answers_field(entry, where)
        record = AnnotationRecord(
            question_id=question_id,
            image_id=_id_field(entry, "image_id", where),
            answers=answers,
            raw_answers=raw_answers,
            answer_type=_optional_str_field(entry, "answer_type", where),
            question_type=_optional_str_field(entry, "question_type", where),
        )
        key = normalize_id(question_id)
        if key in by_id:
            duplicates.append(question_id)
        by_id[key] = record
    if duplicates:
        raise DataError(f"{source}: duplicate annotation question ids: {_format_ids(duplicates)}")
    return by_id


def check_annotations_match(
    questions: Sequence[QuestionRecord],
    annotations: Mapping[ItemId, AnnotationRecord],
    *,
    questions_source: str,
    annotations_source: str,
) -> None:
    """Every question needs an annotation for the same image; extra annotations are ignored."""
    missing = [q.question_id for q in questions if normalize_id(q.question_id) not in annotations]
    if missing:
        raise DataError(
            f"{annotations_source} has no annotation for {len(missing)} question(s) of "
            f"{questions_source}: question ids {_format_ids(missing)}. Are the two files from the same "
            "split?"
        )
    for question in questions:
        annotation = annotations[normalize_id(question.question_id)]
        if normalize_id(annotation.image_id) != normalize_id(question.image_id):
            raise DataError(
                f"Question id {question.question_id} is about image {question.image_id} in "
                f"{questions_source} but its annotation in {annotations_source} says image "
                f"{annotation.image_id}. Are the two files from the same split?"
            )


def select_questions(
    questions: Sequence[QuestionRecord],
    *,
    limit: int | None = None,
    question_ids: Iterable[ItemId] | None = None,
    source: str,
) -> tuple[QuestionRecord, ...]:
    """Apply an explicit id subset, then ``limit``; the result keeps file order.

    Ids compare after :func:`normalize_id`, so ``"262148000"`` from a command line selects question
    ``262148000`` from a JSON file. Unknown ids are an error: a typo must not shrink an evaluation
    silently.
    """
    selected: Sequence[QuestionRecord] = questions
    if question_ids is not None:
        wanted = {normalize_id(i): i for i in question_ids}
        present = {normalize_id(q.question_id) for q in questions}
        unknown = [original for key, original in wanted.items() if key not in present]
        if unknown:
            raise DataError(f"{source} has no question ids {_format_ids(unknown)}.")
        selected = [q for q in questions if normalize_id(q.question_id) in wanted]
    return tuple(selected[: check_limit(limit)])


def check_limit(limit: int | None) -> int | None:
    """Validate a user's ``limit`` (first N items): a non-negative integer or ``None`` for all."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


def normalize_id(value: ItemId) -> ItemId:
    """Ids as compared: numeric strings become ints, so CLI strings match JSON integers."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.isdigit():
            return int(stripped)
        return stripped
    return value


def template_image_paths(image_dir: Path, template: str, *, split: str | None) -> ImagePathFn:
    """An :data:`ImagePathFn` from a ``str.format`` template with fields ``split`` and ``image_id``.

    The template is tried once here so a bad pattern fails at load time, not at the first image.
    """
    try:
        template.format(split=split or "", image_id=1)
    except (KeyError, IndexError, ValueError) as error:
        raise DataError(
            f"Image file-name pattern {template!r} is invalid ({error!r}); use the fields {{split}} and "
            f"{{image_id}}, e.g. {DEFAULT_IMAGE_NAME!r}."
        ) from None
    if "{split" in template and split is None:
        raise DataError(
            f"Image file-name pattern {template!r} uses {{split}} but no split is known: pass split= "
            "(e.g. 'val2014') or give the questions file a 'data_subtype'."
        )

    def image_path(image_id: ItemId) -> Path:
        # A numeric string id must still fill an integer spec such as {image_id:012d}.
        value = normalize_id(image_id)
        try:
            return image_dir / template.format(split=split, image_id=value)
        except (ValueError, TypeError):
            raise DataError(
                f"Image id {image_id!r} does not fit the image file-name pattern {template!r}."
            ) from None

    return image_path


# ---------------------------------------------------------------------------------- the item source


class OfficialSource:
    """Selected questions (and annotations) of one official split, streamed as :class:`VQAItem` s.

    Holds only the parsed JSON records; each iteration builds fresh items whose images are paths.
    """

    def __init__(
        self,
        questions: Sequence[QuestionRecord],
        annotations: Mapping[ItemId, AnnotationRecord] | None,
        image_path: ImagePathFn,
        *,
        split: str | None,
    ) -> None:
        self._questions = tuple(questions)
        self._annotations = annotations
        self._image_path = image_path
        self.split = split

    @property
    def has_annotations(self) -> bool:
        return self._annotations is not None

    def __len__(self) -> int:
        return len(self._questions)

    def __iter__(self) -> Iterator[VQAItem]:
        for record in self._questions:
            yield self._item(record)

    def _item(self, record: QuestionRecord) -> VQAItem:
        image = ImageRef(path=self._image_path(record.image_id))
        if self._annotations is None:
            return VQAItem(record.question_id, record.image_id, record.question, image)
        annotation = self._annotations[normalize_id(record.question_id)]
        return VQAItem(
            question_id=record.question_id,
            image_id=record.image_id,
            question=record.question,
            image=image,
            answers=annotation.answers,
            answer_type=annotation.answer_type,
            question_type=annotation.question_type,
            raw_answers=annotation.raw_answers,
        )


def load_official(
    questions_path: Path,
    *,
    image_dir: Path,
    annotations_path: Path | None = None,
    split: str | None = None,
    image_name: str = DEFAULT_IMAGE_NAME,
    image_paths: Callable[[str | None], ImagePathFn] | None = None,
    limit: int | None = None,
    question_ids: Iterable[ItemId] | None = None,
) -> OfficialSource:
    """Load an official questions file (+ optional annotations) whose images live in ``image_dir``.

    ``split`` fills ``{split}`` in ``image_name`` and defaults to the questions file's
    ``data_subtype``. ``image_paths``, called with that split, replaces the template entirely (the folder
    loader uses it for its fallback names). Without ``annotations_path`` items have no answers (test splits).
    """
    questions_path, image_dir = Path(questions_path), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(
            f"Image folder not found: {image_dir}. Download and extract the COCO images there, or point "
            "the loader at the folder that holds them."
        )
    parsed = parse_questions(read_json(questions_path, what="Questions file"), source=str(questions_path))
    split = split if split is not None else parsed.data_subtype
    if image_paths is not None:
        image_path = image_paths(split)
    else:
        image_path = template_image_paths(image_dir, image_name, split=split)

    annotations = None
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        annotations = parse_annotations(
            read_json(annotations_path, what="Annotations file"), source=str(annotations_path)
        )
        check_annotations_match(
            parsed.questions,
            annotations,
            questions_source=str(questions_path),
            annotations_source=str(annotations_path),
        )
    selected = select_questions(
        parsed.questions, limit=limit, question_ids=question_ids, source=str(questions_path)
    )
    return OfficialSource(selected, annotations, image_path, split=split)


# ------------------------------------------------------------------------------------------ helpers


def _top_level_list(document: Any, key: str, *, source: str, hint: str) -> list[Any]:
    if not isinstance(document, Mapping):
        raise DataError(f"{source}: expected {hint} (a JSON object), got a {type(document).__name__}")
    if key not in document:
        raise DataError(
            f"{source}: missing top-level field '{key}' (expected {hint}; top-level fields found: "
            f"{sorted(document)[:10]})"
        )
    entries = document[key]
    if not isinstance(entries, list):
        raise DataError(f"{source}: top-level field '{key}' must be a list, got {type(entries).__name__}")
    return entries


def _where(source: str, key: str, index: int, entry: Any) -> str:
    question_id = entry.get("question_id") if isinstance(entry, Mapping) else None
    suffix = f" (question_id {question_id!r})" if question_id is not None else ""
    return f"{source}: {key}[{index}]{suffix}"


def _id_field(entry: Mapping[str, Any], name: str, where: str) -> ItemId:
    if name not in entry:
        raise DataError(f"{where}: missing field '{name}'")
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataError(f"{where}: field '{name}' must be an integer or non-empty string, got {value!r}")
    return value


def _str_field(entry: Mapping[str, Any], name: str, where: str) -> str:
    if name not in entry:
        raise DataError(f"{where}: missing field '{name}'")
    value = entry[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {value!r}")
    return value


def _question_text(entry: Mapping[str, Any], where: str) -> str:
    """The question text; an empty one is an error because no stage can answer it meaningfully and a
    silent placeholder answer would skew the score."""
    text = _str_field(entry, "question", where)
    if not text.strip():
        raise DataError(f"{where}: the question text is empty; fix or remove this question")
    return text


def _optional_str_field(entry: Mapping[str, Any], name: str, where: str) -> str | None:
    value = entry.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {value!r}")
    return value


def _answers_field(entry: Mapping[str, Any], where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``answers[*].answer`` in order, and ``raw_answer`` where the file has it (OK-VQA v1.1).

    An annotation without a usable answer (an empty list, or only empty strings) is an error, like an
    empty question: its item would count as unannotated, which turns scoring off for the whole run while
    the other questions are still reported, or be scored against nothing.
    """
    if "answers" not in entry:
        raise DataError(f"{where}: missing field 'answers'")
    answers = entry["answers"]
    if not isinstance(answers, list):
        raise DataError(f"{where}: field 'answers' must be a list, got {type(answers).__name__}")
    if not answers:
        raise DataError(
            f"{where}: field 'answers' is empty; give the question's human answers, or remove the question "
            "from both the questions and the annotations file"
        )
    stemmed: list[str] = []
    raw: list[str] = []
    for position, answer in enumerate(answers):
        if not isinstance(answer, Mapping) or not isinstance(answer.get("answer"), str):
            raise DataError(
                f"{where}: answers[{position}] must be an object with a string field 'answer', got {answer!r}"
            )
        stemmed.append(answer["answer"])
        raw_answer = answer.get("raw_answer")
        if raw_answer is not None and not isinstance(raw_answer, str):
            raise DataError(f"{where}: answers[{position}].raw_answer must be a string, got {raw_answer!r}")
        raw.append(raw_answer if raw_answer is not None else answer["answer"])
    if not any(answer.strip() for answer in stemmed):
        raise DataError(
            f"{where}: every answer is an empty string; give the question's human answers, or remove the "
            "question from both the questions and the annotations file"
        )
    has_raw = any(isinstance(a, Mapping) and "raw_answer" in a for a in answers)
    return tuple(stemmed), tuple(raw) if has_raw else ()


def _reject_duplicates(ids: Iterable[ItemId], *, source: str, what: str) -> None:
    counts = Counter(normalize_id(i) for i in ids)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        raise DataError(f"{source}: duplicate {what}: {_format_ids(duplicates)}")


def _format_ids(ids: Sequence[ItemId]) -> str:
    shown = ", ".join(str(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")
