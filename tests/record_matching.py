"""Comparing the records.jsonl of two runs of the same items up to the float noise that differing batch
layouts or CPU kernels cause (what README's "What is reproducible" guarantees): floats within a stated
tolerance, everything else (ids, captions, answers, accuracies, counts) equal."""

import math
from typing import Any

#: Float results (relevance maps, match logits) of runs whose batches or machines differ agree within
#: this relative tolerance; a value near zero within RTOL_NEAR_ZERO of the largest value of its array
#: (GradCAM clamps gradients at 0, so a value made of clamped terms can move from 0 to a tiny number).
RTOL = 1e-5
RTOL_NEAR_ZERO = 1e-6
#: records.jsonl writes floats with 6 significant digits: two values that round differently differ by
#: one unit in the 6th digit, at most 1e-5 of the value.
RECORD_ROUNDING = 1e-5


def assert_records_match(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Records of two runs of the same items: floats within the tolerances above, everything else
    (question ids, captions, answers, accuracies, counts) equal."""
    problems: list[str] = []
    if [r.get("question_id") for r in actual] != [r.get("question_id") for r in expected]:
        problems.append("the records hold other questions or another order")
    for got, want in zip(actual, expected):
        _compare(got, want, f"question {want.get('question_id')}", 0.0, problems)
    assert not problems, "records differ beyond float tolerance:\n" + "\n".join(problems[:20])


def _compare(got: Any, want: Any, where: str, scale: float, problems: list[str]) -> None:
    numbers = (int, float)
    if isinstance(got, float) or isinstance(want, float):
        if isinstance(got, bool) or isinstance(want, bool) or not (
                isinstance(got, numbers) and isinstance(want, numbers)):
            problems.append(f"{where}: {got!r} != {want!r}")
            return
        if got == want or (math.isnan(got) and math.isnan(want)):
            return
        tolerance = (RTOL + RECORD_ROUNDING) * max(abs(got), abs(want)) + RTOL_NEAR_ZERO * scale
        if not (math.isfinite(got) and math.isfinite(want) and abs(got - want) <= tolerance):
            problems.append(f"{where}: {got!r} != {want!r} (difference {abs(got - want):.3g} > {tolerance:.3g})")
    elif isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            problems.append(f"{where}: fields {sorted(got)} != {sorted(want)}")
        for key in want.keys() & got.keys():
            _compare(got[key], want[key], f"{where}.{key}", 0.0, problems)
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            problems.append(f"{where}: {len(got)} values != {len(want)}")
            return
        floats = [abs(v) for v in [*got, *want] if isinstance(v, float) and math.isfinite(v)]
        array_scale = max(floats, default=0.0)
        for index, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}[{index}]", array_scale, problems)
    elif got != want:
        problems.append(f"{where}: {got!r} != {want!r}")
