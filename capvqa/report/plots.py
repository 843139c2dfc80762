"""The report's charts, from :class:`ReportData` to SVG (layout lives in :mod:`capvqa.report.svg`)."""

from __future__ import annotations

from dataclasses import dataclass

from capvqa.report.htmlkit import Markup
from capvqa.report.model import ReportData
from capvqa.report.summary import flatten_config, stage_names
from capvqa.report.svg import grouped_hbar_chart, line_chart, stacked_hbar_chart

MAX_QUESTION_TYPES = 70  # VQAv2 has 65; beyond that the chart keeps the largest groups


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    svg: Markup
    caption: str = ""


def answer_type_chart(data: ReportData) -> Chart | None:
    rows = [r for r in data.rows if r.kind in ("overall", "answer type")]
    if not any(v is not None for r in rows for v in r.values):
        return None
    series = [(label, [r.values[i] for r in rows]) for i, label in enumerate(data.labels)]
    title = "VQA accuracy, overall and per answer type"
    return Chart("answer-types", title, grouped_hbar_chart([r.name for r in rows], series, title=title,
                                                             x_max=100, unit=""))


def question_type_chart(data: ReportData) -> Chart | None:
    rows = [r for r in data.rows if r.kind == "question type"][:MAX_QUESTION_TYPES]
    if not rows:
        return None
    series = [(label, [r.values[i] for r in rows]) for i, label in enumerate(data.labels)]
    notes = [f"(n={max((c or 0) for c in r.counts)})" for r in rows]
    title = "VQA accuracy per question type (largest groups first)"
    return Chart("question-types", title, grouped_hbar_chart([r.name for r in rows], series, title=title,
                                                               x_max=100, category_notes=notes))


def sweep_chart(data: ReportData) -> Chart | None:
    """Accuracy against the numeric config key the runs differ in (e.g. number of captions or shots)."""
    if data.sweep is None:
        return None
    xs = [flatten_config(v.run.config).get(data.sweep) for v in data.runs]
    series: list[tuple[str, list[tuple[float, float]]]] = []
    overall = [(float(x), v.scores.overall) for x, v in zip(xs, data.runs) if v.scores.overall is not None]
    if not overall:
        return None
    series.append(("overall", overall))
    for name in sorted({k for v in data.runs for k in v.scores.per_answer_type}):
        points = [(float(x), v.scores.per_answer_type[name]) for x, v in zip(xs, data.runs)
                  if name in v.scores.per_answer_type]
        series.append((name, points))
    others = [k for k, _ in data.differences if k != data.sweep and k.startswith("stages.")]
    caption = f"other stage settings differ too: {', '.join(others)}" if others else ""
    title = f"VQA accuracy vs. {data.sweep}"
    return Chart("sweep", title, line_chart(series, title=title, x_label=data.sweep, y_max=100), caption)


def timing_chart(data: ReportData) -> Chart | None:
    names = stage_names([v.timings for v in data.runs])
    if not names:
        return None
    values = []
    notes = []
    for view in data.runs:
        by_stage = {t.stage: t for t in view.timings}
        values.append([by_stage[n].seconds_per_item if n in by_stage else None for n in names])
        cached = [n for n in names if n in by_stage and by_stage[n].seconds_per_item is None]
        notes.append(f"({', '.join(cached)} cached)" if cached else "")
    if not any(v for row in values for v in row):
        return None
    title = "compute seconds per question, per stage"
    caption = ("Time per computed question (cache hits excluded); a stage served entirely from the cache "
               "has no bar.")
    return Chart("timings", title, stacked_hbar_chart(data.labels, names, values, title=title, unit="s",
                                                      row_notes=notes), caption)


def all_charts(data: ReportData) -> list[Chart]:
    charts = [answer_type_chart(data), question_type_chart(data), sweep_chart(data), timing_chart(data)]
    return [c for c in charts if c is not None]
