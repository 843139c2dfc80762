"""Per-question agreement between runs (pure): how often two runs give the same answer, and on which
questions one is right where the other is wrong, with a few examples of each.

Each rule lives here once (docs/methods.md#vqa-accuracy, "Comparing runs question by question"):

* **Shared questions.** Two runs are compared on the questions both have, matched by
  ``str(question_id)`` (:func:`capvqa.report.runs.qid_key`). Nothing is refused: runs over different
  subsets are compared on their intersection, and the counts say how large it is.
* **Same answer.** Two answers agree when they are equal after the metric's normalisation of a
  prediction (:func:`capvqa.eval.normalize.normalize_prediction`: punctuation, digits, articles,
  contractions; both scoring variants normalise predictions alike), so "Two" and "2" agree. The OK-VQA
  lemmatizer is a scoring option of each run and is not applied.
* **Right where the other is wrong** (:func:`scores_higher`). On a question both runs scored, run A
  counts as right where B is wrong when A's per-question VQA accuracy (the ``accuracy`` the metric wrote
  into ``records.jsonl``) is higher than B's: 100 vs 0, but also 60 vs 30, since VQA accuracy gives
  partial credit. Equal accuracies count for neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from capvqa.eval.normalize import normalize_prediction

DEFAULT_EXAMPLES_PER_KIND = 3

# the kinds of disagreement examples are shown for; "a"/"b" are the pair's first and second run
A_BETTER = "a_better"
B_BETTER = "b_better"
DIFFERENT_TIE = "different_tie"
KINDS = (A_BETTER, B_BETTER, DIFFERENT_TIE)

RULE = ("A is right where B is wrong on a question both scored when A's per-question VQA accuracy is "
        "higher than B's (100 vs 0, or 60 vs 30); equal accuracies count for neither")
SAME_ANSWER_RULE = ("answers are the same when equal after the metric's answer normalisation "
                    "(capvqa.eval.normalize.normalize_prediction)")


def same_answer(first: Any, second: Any) -> bool:
    """True when two answers are equal after the VQA metric's prediction normalisation."""
    return _normalised(_text(first)) == _normalised(_text(second))


@lru_cache(maxsize=1 << 16)
def _normalised(answer: str) -> str:
    """Memoised: a full VQAv2 run has 214k answers but few distinct ones ("yes", "no", "2"), and each
    run's answers are compared once per pair."""
    return normalize_prediction(answer)


def scores_higher(accuracy: float | None, other: float | None) -> bool:
    """The report's one rule for "right where the other run is wrong": both scored, and ``accuracy``
    (per-question VQA accuracy, 0-100) is strictly higher than ``other``."""
    return accuracy is not None and other is not None and float(accuracy) > float(other)


@dataclass(frozen=True)
class PairAgreement:
    """Two runs (indices ``a`` < ``b`` into the report's runs) compared on their shared questions.

    ``examples`` maps each of :data:`KINDS` to question keys: ``a_better`` (A right, B wrong under
    :func:`scores_higher`), ``b_better`` (the reverse) and ``different_tie`` (different answers, neither
    scores higher: equal accuracy, e.g. both 0, or not scored).
    """

    a: int
    b: int
    shared: int
    same: int
    scored: int
    a_better: int
    b_better: int
    different_tie: int
    different_question: int = 0  # shared ids whose question text differs: the runs may not be on one dataset
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        """Percent of shared questions with the same answer (2 decimals); None with nothing shared."""
        return round(100 * self.same / self.shared, 2) if self.shared else None

    def count(self, kind: str) -> int:
        return {A_BETTER: self.a_better, B_BETTER: self.b_better, DIFFERENT_TIE: self.different_tie}[kind]


@dataclass(frozen=True)
class Agreement:
    """Agreement between every pair of a report's runs. ``question_counts`` are each run's questions
    (records), ``shared_by_all`` the questions every run has."""

    question_counts: tuple[int, ...]
    shared_by_all: int
    pairs: tuple[PairAgreement, ...]

    def matrix(self) -> list[list[float | None]]:
        """Percent agreement per pair of runs, symmetric; 100 on the diagonal of a run with questions."""
        size = len(self.question_counts)
        cells: list[list[float | None]] = [[100.0 if i == j and self.question_counts[i] else None
                                            for j in range(size)] for i in range(size)]
        for pair in self.pairs:
            cells[pair.a][pair.b] = cells[pair.b][pair.a] = pair.agreement
        return cells

    def pair(self, a: int, b: int) -> PairAgreement | None:
        return next((p for p in self.pairs if (p.a, p.b) == (a, b)), None)


def shared_keys(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    """Question keys both runs have, in the first run's record order."""
    return [key for key in first if key in second]


def compare_pair(
    first: Mapping[str, Mapping[str, Any]],
    second: Mapping[str, Mapping[str, Any]],
    *,
    a: int = 0,
    b: int = 1,
    examples_per_kind: int = DEFAULT_EXAMPLES_PER_KIND,
) -> PairAgreement:
    """Compare two runs' records (question key -> record with ``answer``, ``accuracy``, ``question``).

    Examples: for the two "better" kinds the largest accuracy gaps first, then record order; for
    ``different_tie`` record order. Deterministic, so a rebuilt report shows the same questions.
    """
    same = scored = a_better = b_better = different_tie = different_question = 0
    candidates: dict[str, list[tuple[float, int, str]]] = {kind: [] for kind in KINDS}
    keys = shared_keys(first, second)
    for position, key in enumerate(keys):
        left, right = first[key], second[key]
        acc_a, acc_b = _accuracy(left), _accuracy(right)
        if left.get("question") and right.get("question") and left["question"] != right["question"]:
            different_question += 1
        equal = same_answer(left.get("answer"), right.get("answer"))
        same += equal
        gap = 0.0
        if acc_a is not None and acc_b is not None:
            scored += 1
            gap = acc_a - acc_b
        if scores_higher(acc_a, acc_b):
            a_better += 1
            candidates[A_BETTER].append((-gap, position, key))  # largest gap sorts first
        elif scores_higher(acc_b, acc_a):
            b_better += 1
            candidates[B_BETTER].append((gap, position, key))
        elif not equal:
            different_tie += 1
            candidates[DIFFERENT_TIE].append((0.0, position, key))
    examples = {kind: tuple(key for _, _, key in sorted(found)[:max(0, examples_per_kind)])
                for kind, found in candidates.items()}
    return PairAgreement(a=a, b=b, shared=len(keys), same=same, scored=scored, a_better=a_better,
                         b_better=b_better, different_tie=different_tie, different_question=different_question,
                         examples=examples)


def compare_runs(
    per_run: Sequence[Mapping[str, Mapping[str, Any]]],
    examples_per_kind: int = DEFAULT_EXAMPLES_PER_KIND,
) -> Agreement:
    """Every pair of runs (in run order: first with second, first with third, ..., second with third)."""
    pairs = tuple(compare_pair(per_run[i], per_run[j], a=i, b=j, examples_per_kind=examples_per_kind)
                  for i in range(len(per_run)) for j in range(i + 1, len(per_run)))
    common = set(per_run[0]) if per_run else set()
    for records in per_run[1:]:
        common &= set(records)
    return Agreement(question_counts=tuple(len(r) for r in per_run), shared_by_all=len(common), pairs=pairs)


def example_keys(agreement: Agreement) -> list[str]:
    """Every question key some pair shows as an example, first-seen order, no repeats."""
    return list(dict.fromkeys(key for pair in agreement.pairs for kind in KINDS
                              for key in pair.examples.get(kind, ())))


def kind_title(kind: str, first: str, second: str) -> str:
    """What a kind of example shows, in the pair's run labels."""
    if kind == A_BETTER:
        return f"{first} right, {second} wrong (higher VQA accuracy)"
    if kind == B_BETTER:
        return f"{second} right, {first} wrong (higher VQA accuracy)"
    return "different answers, neither scores higher"


def _accuracy(record: Mapping[str, Any]) -> float | None:
    value = record.get("accuracy")
    return None if value is None else float(value)


def _text(answer: Any) -> str:
    return "" if answer is None else str(answer)
