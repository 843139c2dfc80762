"""A short Markdown summary to paste into a pull request or a paper draft: accuracy table(s),
published numbers with deltas, the config keys that differ and, for several runs, per-question
agreement with a few examples of each disagreement. The gallery stays in the HTML."""

from __future__ import annotations

from collections.abc import Sequence

from capvqa.report.agreement import KINDS, RULE, SAME_ANSWER_RULE, kind_title
from capvqa.report.gallery import answer_counts
from capvqa.report.htmlkit import clean_text
from capvqa.report.model import ReportData
from capvqa.report.summary import format_config_value, format_delta, format_number

MAX_MD_QUESTION_TYPES = 12


def md_cell(value: object) -> str:
    """Escape what would break a table cell or render as markup: pipes, backslashes, newlines, ``<``/``>``
    (GitHub renders inline HTML) and backticks; control characters show as visible stand-ins."""
    text = "" if value is None else clean_text(str(value))
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(text.split())


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _value_with_delta(value: float | None, change: float | None, first: bool) -> str:
    text = format_number(value)
    if not first and change is not None:
        text += f" ({format_delta(change)})"
    return text


def render_markdown(data: ReportData) -> str:
    out = [f"## {md_cell(data.title)}", ""]
    if data.tiny_labels:
        warning = (f"> **Tiny random-weight models** ({md_cell(', '.join(data.tiny_labels))}): answers and "
                   "accuracy are meaningless; published numbers do not apply.")
        out += [warning, ""]
    runs_rows = []
    for view in data.runs:
        run = view.run.run_settings
        dataset = f"{run.get('dataset') or '?'}" + (f" / {run['split']}" if run.get("split") else "")
        runs_rows.append([view.label, view.run.config.get("name") or "?", dataset,
                          view.scores.num_questions or len(view.run.records)])
    out += [md_table(["run", "pipeline", "dataset", "questions"], runs_rows, right=[3]), ""]

    rows = [r for r in data.rows if r.kind in ("overall", "answer type")]
    if any(v is not None for r in rows for v in r.values):
        header = ["VQA accuracy"] + [label + ("" if i == 0 else f" (Δ vs {data.labels[0]})")
                                     for i, label in enumerate(data.labels)]
        body = [[r.name] + [_value_with_delta(v, d, i == 0) for i, (v, d) in enumerate(zip(r.values, r.deltas))]
                for r in rows]
        out += [md_table(header, body, right=list(range(1, len(header)))), ""]
        question_rows = [r for r in data.rows if r.kind == "question type"][:MAX_MD_QUESTION_TYPES]
        if question_rows and data.multi:
            body = [[r.name] + [_value_with_delta(v, d, i == 0) for i, (v, d) in enumerate(zip(r.values, r.deltas))]
                    for r in question_rows]
            out += [f"Largest question types ({len(question_rows)}):", "",
                    md_table(["question type"] + data.labels, body, right=list(range(1, len(data.labels) + 1))), ""]
    else:
        out += ["No accuracy: the data has no human answers.", ""]

    published_rows = []
    for view in data.runs:
        result = view.published.result
        published_rows.append([view.label, format_number(view.scores.overall),
                               format_number(result.accuracy, 1) if result else "n/a",
                               format_delta(view.published_delta), view.published.describe()])
    out += [md_table(["run", "overall", "published", "Δ", "setting / why not"], published_rows, right=[1, 2, 3]), ""]

    if data.differences:
        out += ["Config differences:", "",
                md_table(["key"] + data.labels, [[key] + [format_config_value(v) for v in values]
                                                 for key, values in data.differences]), ""]
    out += _agreement(data)
    return "\n".join(out).rstrip() + "\n"


def _agreement(data: ReportData) -> list[str]:
    """Agreement matrix, right/wrong counts per pair and a few examples of each kind of disagreement."""
    agreement = data.agreement
    if agreement is None:
        return []
    counts = ", ".join(f"{label} {n}" for label, n in zip(data.labels, agreement.question_counts))
    out = [f"Per-question agreement (questions per run: {counts}; shared by all: {agreement.shared_by_all}; "
           f"each pair on the questions both have). Same answer: {SAME_ANSWER_RULE}. Right and wrong: {RULE}.", ""]
    matrix = agreement.matrix()
    body = []
    for i, view in enumerate(data.runs):
        name = f"{view.label} ({view.method_label})" if view.method_label else view.label
        cells = []
        for j in range(len(data.runs)):
            pair = agreement.pair(min(i, j), max(i, j))
            cells.append("—" if i == j or pair is None else f"{format_number(matrix[i][j])} (of {pair.shared})")
        body.append([name] + cells)
    out += [md_table(["same answer, % of shared"] + data.labels, body, right=list(range(1, len(data.labels) + 1))),
            ""]
    pair_rows = [[data.labels[p.a], data.labels[p.b], p.shared, p.same, format_number(p.agreement), p.scored,
                  p.a_better, p.b_better, p.different_tie] for p in agreement.pairs]
    out += [md_table(["run A", "run B", "shared", "same answer", "%", "scored both", "A right, B wrong",
                      "B right, A wrong", "different, neither higher"], pair_rows, right=list(range(2, 9))), ""]
    for pair in agreement.pairs:
        first, second = data.labels[pair.a], data.labels[pair.b]
        rows = []
        for kind in KINDS:
            for key in pair.examples.get(kind, ()):
                item = data.agreement_items.get(key)
                if item is None:
                    continue
                human = ", ".join(f"{a} ×{n}" if n > 1 else a for a, n in answer_counts(list(item.gt_answers))[:3])
                rows.append([kind_title(kind, first, second), item.question,
                             _answer(item.answers[pair.a].answer, item.answers[pair.a].accuracy),
                             _answer(item.answers[pair.b].answer, item.answers[pair.b].accuracy), human])
        if rows:
            out += [f"Examples, {first} vs {second}:", "",
                    md_table(["kind", "question", first, second, "human answers"], rows), ""]
    return out


def _answer(answer: str | None, accuracy: float | None) -> str:
    text = "(empty answer)" if answer is not None and not answer.strip() else answer or ""
    return f"{text} ({format_number(accuracy, 0)})" if accuracy is not None else text
