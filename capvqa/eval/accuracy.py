"""Score predictions against annotated VQA items: overall, per answer type, per question type, per question.

Unlike the reference script, which asserts that the results cover every question of the split, any
subset of annotated items can be scored: the items given *are* the evaluation set. Questions without a
prediction count as wrong (0) and are listed, so a partial run is visible rather than silently
inflated. Numbers follow the reference: each is ``round(100 * accuracy, 2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from capvqa.data.items import VQAItem
from capvqa.errors import DataError
from capvqa.eval.lemmatize import lemmatizer_name
from capvqa.eval.normalize import OFFICIAL, check_variant, question_accuracy

QuestionId = int | str

_MAX_IDS_IN_MESSAGE = 10
_DECIMALS = 2  # the reference's ``n=2``


@dataclass(frozen=True)
class EvalResult:
    """VQA accuracies in percent (0-100, two decimals), plus how they were computed.

    ``per_question`` is keyed by ``str(question_id)`` (JSON object keys are strings anyway); ``missing``
    keeps the original ids, in item order. ``variant`` and ``lemmatizer`` record the normalisation
    variant and the prediction lemmatizer ("none" if none) and are deliberately not part of
    :meth:`to_json`, whose shape is fixed.
    """

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[str, float]
    num_questions: int
    missing: tuple[QuestionId, ...]
    variant: str = OFFICIAL
    lemmatizer: str = "none"

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON-ready data with exactly the documented keys (copies, not views)."""
        return {
            "overall": self.overall,
            "per_answer_type": dict(self.per_answer_type),
            "per_question_type": dict(self.per_question_type),
            "per_question": dict(self.per_question),
            "num_questions": self.num_questions,
            "missing": list(self.missing),
        }


def score_predictions(
    items: Iterable[VQAItem],
    predictions: Mapping[QuestionId, str],
    *,
    variant: str = OFFICIAL,
    lemmatizer: Callable[[str], str] | None = None,
) -> EvalResult:
    """Score ``predictions`` (question id -> answer) on the annotated ``items``.

    Ids are matched by ``str(question_id)``, so VQAv2's int ids and string ids read from JSON or from
    the Hugging Face OK-VQA export agree. ``lemmatizer`` (see :mod:`capvqa.eval.lemmatize`) is applied to
    each prediction before normalisation, as LAVIS does for OK-VQA. Raises DataError for unannotated
    items, duplicate question ids, non-string answers, or predictions for questions not among ``items``.
    """
    check_variant(variant)
    items = list(items)
    if not items:
        raise DataError("no questions to score: the item list is empty")
    _check_items(items)
    predictions_by_key = _predictions_by_key(predictions)
    _check_no_unknown_predictions(items, predictions_by_key)

    accuracies: list[float] = []
    raw_accuracy: dict[str, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    missing: list[QuestionId] = []
    for item in items:
        key = str(item.question_id)
        prediction = predictions_by_key.get(key)
        if prediction is None:
            missing.append(item.question_id)
            accuracy = 0.0
        else:
            if lemmatizer is not None:
                prediction = lemmatizer(prediction)
            accuracy = question_accuracy(prediction, item.answers, variant=variant)
        accuracies.append(accuracy)
        raw_accuracy[key] = accuracy
        if item.answer_type is not None:
            by_answer_type.setdefault(item.answer_type, []).append(accuracy)
        if item.question_type is not None:
            by_question_type.setdefault(item.question_type, []).append(accuracy)

    return EvalResult(
        overall=mean_percent(accuracies),
        per_answer_type={name: mean_percent(accs) for name, accs in by_answer_type.items()},
        per_question_type={name: mean_percent(accs) for name, accs in by_question_type.items()},
        per_question={key: round(100 * acc, _DECIMALS) for key, acc in raw_accuracy.items()},
        num_questions=len(items),
        missing=tuple(missing),
        variant=variant,
        lemmatizer=lemmatizer_name(lemmatizer),
    )


def mean_percent(accuracies: Sequence[float]) -> float:
    """``round(100 * mean, 2)`` written as the reference writes it (``100 * sum / len``), so the floats and
    hence the rounding agree with it exactly."""
    return round(100 * float(sum(accuracies)) / len(accuracies), _DECIMALS)


def _check_items(items: Sequence[VQAItem]) -> None:
    """Every item must be annotated and have a distinct question id (compared as strings)."""
    unannotated = [item.question_id for item in items if not item.is_annotated]
    if unannotated:
        raise DataError(
            f"{_count(unannotated, 'question')} without ground-truth answers ({_list_ids(unannotated)}); "
            "an unannotated split (e.g. VQAv2 test-dev) cannot be scored locally: write the predictions "
            "and submit them to the EvalAI server instead"
        )
    seen: set[str] = set()
    for item in items:
        key = str(item.question_id)
        if key in seen:
            raise DataError(f"question id {item.question_id!r} occurs more than once among the items scored")
        seen.add(key)


def _predictions_by_key(predictions: Mapping[QuestionId, str]) -> dict[str, str]:
    """Predictions re-keyed by ``str(question_id)``; rejects ids that collide and non-string answers."""
    by_key: dict[str, str] = {}
    for question_id, answer in predictions.items():
        if not isinstance(answer, str):
            raise DataError(
                f"prediction for question {question_id!r} must be a string, got {type(answer).__name__}"
            )
        key = str(question_id)
        if key in by_key:
            raise DataError(
                f"predictions contain question id {question_id!r} twice (as an int and as a string)"
            )
        by_key[key] = answer
    return by_key


def _check_no_unknown_predictions(items: Sequence[VQAItem], predictions_by_key: Mapping[str, str]) -> None:
    """Predictions must all be for the items scored: a stray id means mismatched files or splits."""
    known = {str(item.question_id) for item in items}
    unknown = [key for key in predictions_by_key if key not in known]
    if unknown:
        raise DataError(
            f"{_count(unknown, 'prediction')} for question ids not among the {len(items)} questions being "
            f"scored ({_list_ids(unknown)}); check that the predictions and the annotations are for the "
            "same split, or drop the extra predictions when scoring a subset"
        )


def _count(things: Sequence[object], noun: str) -> str:
    return f"{len(things)} {noun}{'' if len(things) == 1 else 's'}"


def _list_ids(ids: Sequence[object]) -> str:
    shown = ", ".join(str(question_id) for question_id in ids[:_MAX_IDS_IN_MESSAGE])
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return f"{shown}, and {more} more" if more > 0 else shown
