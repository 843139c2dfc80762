"""Pure tables of a report: accuracies per group and run, deltas, config differences, stage timings.

Nothing here reads files or renders markup, so each rule (which number is the source of truth, what a
delta is against, which config keys count as "different") is testable on plain dicts.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ABSENT = "(absent)"

# config keys that a sweep plot may use as its x axis, best first (a stage param with this last name)
SWEEP_PARAMS = ("num_captions", "n_shot", "num_shots", "n_ensemble", "num_captions_fid", "num_patches",
                "num_examples", "num_qa_pairs", "max_captions")
# numeric keys that never make a meaningful x axis
NOT_SWEEPS = ("batch_size", "seed", "limit", "max_pairs_per_forward")


@dataclass
class RunScores:
    """One run's accuracies (x100) and how many scored questions each group has."""

    label: str
    overall: float | None
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    answer_type_counts: dict[str, int] = field(default_factory=dict)
    question_type_counts: dict[str, int] = field(default_factory=dict)
    num_questions: int = 0
    num_scored: int = 0
    missing: int = 0


def score_run(label: str, records: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any] | None) -> RunScores:
    """Scores of a run: ``metrics.json`` is the source of truth (it is what `capvqa evaluate` reports);
    without it, means of the records' per-question ``accuracy``. Group sizes always come from records."""
    at_counts: dict[str, int] = defaultdict(int)
    qt_counts: dict[str, int] = defaultdict(int)
    at_sums: dict[str, float] = defaultdict(float)
    qt_sums: dict[str, float] = defaultdict(float)
    scored = 0
    total = 0.0
    for record in records:
        acc = record.get("accuracy")
        if acc is None:
            continue
        scored += 1
        total += float(acc)
        if record.get("answer_type") is not None:
            at_counts[str(record["answer_type"])] += 1
            at_sums[str(record["answer_type"])] += float(acc)
        if record.get("question_type") is not None:
            qt_counts[str(record["question_type"])] += 1
            qt_sums[str(record["question_type"])] += float(acc)
    if metrics and _float_or_none(metrics.get("overall")) is not None:
        return RunScores(
            label=label,
            overall=_float_or_none(metrics["overall"]),
            per_answer_type=_score_map(metrics.get("per_answer_type")),
            per_question_type=_score_map(metrics.get("per_question_type")),
            answer_type_counts=dict(at_counts),
            question_type_counts=dict(qt_counts),
            num_questions=int(_float_or_none(metrics.get("num_questions")) or len(records)),
            num_scored=scored,
            missing=len(metrics.get("missing") or []) if isinstance(metrics.get("missing"), list) else 0,
        )
    return RunScores(
        label=label,
        overall=round(total / scored, 2) if scored else None,
        per_answer_type={k: round(at_sums[k] / n, 2) for k, n in at_counts.items()},
        per_question_type={k: round(qt_sums[k] / n, 2) for k, n in qt_counts.items()},
        answer_type_counts=dict(at_counts),
        question_type_counts=dict(qt_counts),
        num_questions=len(records),
        num_scored=scored,
    )


@dataclass(frozen=True)
class AccuracyRow:
    """One group (overall, an answer type or a question type) across runs; deltas are against run 0."""

    kind: str  # "overall" | "answer type" | "question type"
    name: str
    values: tuple[float | None, ...]
    counts: tuple[int | None, ...]

    @property
    def deltas(self) -> tuple[float | None, ...]:
        return tuple(delta(v, self.values[0]) for v in self.values)


def delta(value: float | None, reference: float | None) -> float | None:
    """value - reference, rounded to 2 decimals as the accuracies are; None when either is unknown."""
    if value is None or reference is None:
        return None
    return round(float(value) - float(reference), 2)


def accuracy_rows(scores: Sequence[RunScores]) -> list[AccuracyRow]:
    """Overall, then answer types (alphabetical), then question types (most questions first)."""
    rows = [AccuracyRow("overall", "overall", tuple(s.overall for s in scores),
                        tuple(s.num_scored or None for s in scores))]
    for name in sorted({k for s in scores for k in s.per_answer_type}):
        rows.append(AccuracyRow("answer type", name, tuple(s.per_answer_type.get(name) for s in scores),
                                tuple(s.answer_type_counts.get(name) for s in scores)))
    question_types = {k for s in scores for k in s.per_question_type}
    sizes = {k: max((s.question_type_counts.get(k) or 0) for s in scores) for k in question_types}
    for name in sorted(question_types, key=lambda k: (-sizes[k], k)):
        rows.append(AccuracyRow("question type", name, tuple(s.per_question_type.get(name) for s in scores),
                                tuple(s.question_type_counts.get(name) for s in scores)))
    return rows


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (``stages.captioning.num_captions``); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differing_config_keys(configs: Sequence[Mapping[str, Any]]) -> list[tuple[str, tuple[Any, ...]]]:
    """Dotted keys whose values are not the same in every config, in first-seen order, with each run's
    value (:data:`ABSENT` where a run lacks the key)."""
    flat = [flatten_config(c) for c in configs]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    out = []
    for key in keys:
        values = tuple(f.get(key, ABSENT) for f in flat)
        if len({_canonical(v) for v in values}) > 1:
            out.append((key, values))
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def format_config_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def sweep_key(differences: Sequence[tuple[str, tuple[Any, ...]]]) -> str | None:
    """The config key to plot accuracy against: a differing, numeric stage parameter (a known sweep
    parameter such as ``num_captions`` or ``n_shot`` first); None when the runs differ in none."""
    candidates = []
    for key, values in differences:
        last = key.rsplit(".", 1)[-1]
        if last in NOT_SWEEPS or not key.startswith("stages."):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            rank = SWEEP_PARAMS.index(last) if last in SWEEP_PARAMS else len(SWEEP_PARAMS)
            candidates.append((rank, key))
    return min(candidates)[1] if candidates else None


@dataclass(frozen=True)
class StageTiming:
    """Seconds of compute per computed question of one stage in one run (None: all cached/unknown)."""

    stage: str
    seconds_per_item: float | None
    computed: int
    cached: int
    setup_seconds: float | None
    wall_seconds: float | None


def stage_timings(timings: Mapping[str, Any] | None) -> list[StageTiming]:
    """Per-stage timing rows from ``timings.json``. A stage served entirely from the cache has no
    per-item cost in this run, which is reported as None rather than as a misleading zero."""
    out = []
    for name, stats in ((timings or {}).get("stages") or {}).items():
        if not isinstance(stats, Mapping):
            continue
        computed = int(stats.get("computed") or 0)
        per_item = stats.get("seconds_per_computed_item")
        if per_item is None and computed and stats.get("compute_seconds") is not None:
            per_item = float(stats["compute_seconds"]) / computed
        out.append(StageTiming(
            stage=str(name),
            seconds_per_item=float(per_item) if computed and per_item is not None else None,
            computed=computed,
            cached=int(stats.get("cached") or 0),
            setup_seconds=_float_or_none(stats.get("setup_seconds")),
            wall_seconds=_float_or_none(stats.get("wall_seconds")),
        ))
    return out


def _score_map(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): f for k, v in value.items() if (f := _float_or_none(v)) is not None}


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def stage_names(per_run: Sequence[Sequence[StageTiming]]) -> list[str]:
    names: list[str] = []
    for rows in per_run:
        names.extend(r.stage for r in rows if r.stage not in names)
    return names


def normalize_answer(answer: Any) -> str:
    """Runs "disagree" when their answers differ after trimming and lower-casing (not after the full
    VQA normalisation: a different article is still worth seeing side by side)."""
    return " ".join(str(answer or "").lower().split())


def answers_disagree(answers: Sequence[Any | None]) -> bool:
    """True when at least two runs answered and their answers differ."""
    present = {normalize_answer(a) for a in answers if a is not None}
    return len(present) > 1


def format_number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_delta(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}"
