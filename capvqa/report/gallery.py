"""Which questions the example gallery shows, and what it shows for each (pure).

A full VQAv2 run has 214k questions; the gallery keeps at most ``limit`` of them. The selection is
deterministic and balanced, so a capped gallery still has something to look at under every filter:
it takes questions in turn from "runs disagree", "wrong", "partly right", "right" and "unscored",
each group in record order, then shows the chosen ones in record order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from capvqa.report.summary import answers_disagree

DEFAULT_GALLERY_LIMIT = 120


@dataclass(frozen=True)
class RunAnswer:
    """One run's answer to a gallery question (``answer`` None: the run did not have the question)."""

    label: str
    answer: str | None
    accuracy: float | None
    stages: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class GalleryItem:
    qid: str
    question_id: Any
    image_id: Any
    question: str
    gt_answers: tuple[str, ...]
    answer_type: str | None
    question_type: str | None
    answers: tuple[RunAnswer, ...]
    disagree: bool

    @property
    def scores(self) -> list[float]:
        return [a.accuracy for a in self.answers if a.accuracy is not None]

    @property
    def wrong(self) -> bool:
        """Score 0 in at least one run (VQA accuracy gives partial credit, so < 100 is not "wrong")."""
        return any(s == 0 for s in self.scores)

    @property
    def outcome(self) -> str:
        """'wrong' | 'partial' | 'right' | 'unscored' (over all runs: the worst one counts)."""
        scores = self.scores
        if not scores:
            return "unscored"
        worst = min(scores)
        return "wrong" if worst == 0 else "partial" if worst < 100 else "right"


def question_order(per_run: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Question keys in the first run's record order, then any only the later runs have."""
    order: list[str] = []
    seen: set[str] = set()
    for records in per_run:
        for key in records:
            if key not in seen:
                seen.add(key)
                order.append(key)
    return order


def _group_of(records: Sequence[Mapping[str, Any] | None]) -> str:
    present = [r for r in records if r is not None]
    if len(present) > 1 and answers_disagree([r.get("answer") for r in present]):
        return "disagree"
    scores = [float(r["accuracy"]) for r in present if r.get("accuracy") is not None]
    if not scores:
        return "unscored"
    worst = min(scores)
    return "wrong" if worst == 0 else "partial" if worst < 100 else "right"


def select_gallery(per_run: Sequence[Mapping[str, Mapping[str, Any]]], limit: int) -> list[str]:
    """Up to ``limit`` question keys, balanced across outcome groups (see the module docstring)."""
    order = question_order(per_run)
    if limit <= 0:
        return []
    if len(order) <= limit:
        return order
    groups: dict[str, list[str]] = {g: [] for g in ("disagree", "wrong", "partial", "right", "unscored")}
    for key in order:
        groups[_group_of([records.get(key) for records in per_run])].append(key)
    chosen: set[str] = set()
    cursors = {g: 0 for g in groups}
    while len(chosen) < limit:
        progressed = False
        for name, keys in groups.items():
            if cursors[name] < len(keys) and len(chosen) < limit:
                chosen.add(keys[cursors[name]])
                cursors[name] += 1
                progressed = True
        if not progressed:
            break
    return [key for key in order if key in chosen]


def build_items(
    keys: Sequence[str],
    labels: Sequence[str],
    light: Sequence[Mapping[str, Mapping[str, Any]]],
    full: Sequence[Mapping[str, Mapping[str, Any]]],
) -> list[GalleryItem]:
    """Gallery items from each run's light records (all questions) and full records (with stages, for
    the selected questions). Question text and human answers come from the first run that has them."""
    items = []
    for key in keys:
        records = [runs.get(key) for runs in light]
        first = next(r for r in records if r is not None)
        answers = []
        for label, record, full_records in zip(labels, records, full):
            if record is None:
                answers.append(RunAnswer(label, None, None, None))
                continue
            full_record = full_records.get(key) or {}
            answers.append(RunAnswer(
                label=label,
                answer=str(record.get("answer", "")),
                accuracy=float(record["accuracy"]) if record.get("accuracy") is not None else None,
                stages=full_record.get("stages") if isinstance(full_record.get("stages"), Mapping) else None,
            ))
        items.append(GalleryItem(
            qid=key,
            question_id=first.get("question_id"),
            image_id=first.get("image_id"),
            question=str(first.get("question", "")),
            gt_answers=tuple(str(a) for a in (first.get("gt_answers") or ())),
            answer_type=first.get("answer_type"),
            question_type=first.get("question_type"),
            answers=tuple(answers),
            disagree=answers_disagree([a.answer for a in answers]),
        ))
    return items


def relevance_of(item: GalleryItem) -> tuple[list[float], list[int], str] | None:
    """The first run's relevance map of an item (any stage record with ``relevance`` and ``grid``)."""
    for answer in item.answers:
        for stage_name, record in (answer.stages or {}).items():
            if isinstance(record, Mapping) and record.get("relevance") and record.get("grid"):
                return list(record["relevance"]), list(record["grid"]), f"{answer.label}: {stage_name}"
    return None


def answer_counts(answers: Sequence[str]) -> list[tuple[str, int]]:
    """Human answers with their counts, most frequent first (ties in annotation order)."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])
