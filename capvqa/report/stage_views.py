"""HTML views of one stage record of records.jsonl, by the fields it has rather than by stage class.

Stages of PNP-VQA, Img2LLM and PICa (and future ones) share field names: ``captions`` (+ ``scores``),
``questions`` + ``answers`` (synthetic QA pairs), ``prompts`` (the exact LLM input), ``examples``
(in-context examples), ``passages``. Each known field gets a readable view; whatever is left is shown as
compact JSON, so a new stage appears in the report without any change here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from capvqa.report.htmlkit import Markup, join, tag

TOP_CAPTIONS = 8
MAX_JSON_LIST = 12
MAX_PASSAGES = 5  # passages repeat the captions; the first few show the exact format
MAX_JSON_CHARS = 4000

EXAMPLE_FIELDS = ("examples", "in_context_examples", "in_context", "shots", "exemplars")
PROMPT_FIELDS = ("prompts", "prompt")
QA_FIELDS = ("qa_pairs", "pairs", "synthetic_qa")


def render_stage(name: str, record: Mapping[str, Any]) -> Markup:
    """One stage's block: a heading and the views of its fields."""
    if not isinstance(record, Mapping):
        return tag("div", {"class": "stage"}, tag("h5", None, name), _json_block(record))
    used: set[str] = set()
    parts: list[Markup] = []
    if "relevance" in record and "grid" in record:
        used.update(("relevance", "grid"))
        grid = record.get("grid") or []
        shape = "×".join(str(g) for g in grid)
        parts.append(tag("p", {"class": "muted"}, f"relevance map {shape} (overlaid on the image; "
                                                  f"{len(record.get('relevance') or [])} patches)"))
    parts.extend(_captions(record, used))
    parts.extend(_qa_pairs(record, used))
    parts.extend(_weighted_chips(record, used))
    parts.extend(_examples(record, used))
    parts.extend(_prompts(record, used))
    if isinstance(record.get("passages"), list):
        used.add("passages")
        passages = record["passages"]
        shown = [tag("li", None, str(p)) for p in passages[:MAX_PASSAGES]]
        hidden = len(passages) - MAX_PASSAGES
        more = tag("p", {"class": "muted small"}, f"… {hidden} more") if hidden > 0 else ""
        parts.append(tag("details", None, tag("summary", None, f"reader passages ({len(passages)})"),
                         tag("ol", {"class": "small"}, shown), more))
    scalars = [(k, v) for k, v in record.items() if k not in used and _is_scalar(v)]
    if scalars:
        used.update(k for k, _ in scalars)
        parts.append(tag("table", {"class": "kv"}, [
            tag("tr", None, tag("th", None, k), tag("td", None, _scalar_text(v))) for k, v in scalars
        ]))
    short_lists = [(k, v) for k, v in record.items()
                   if k not in used and isinstance(v, list) and v and all(_is_scalar(x) for x in v) and len(v) <= 40]
    for key, values in short_lists:
        used.add(key)
        parts.append(tag("div", {"class": "chips"}, tag("span", {"class": "muted"}, f"{key}: "),
                         [tag("span", {"class": "chip"}, _scalar_text(v)) for v in values]))
    for key, value in record.items():
        if key not in used and _is_flat_table(value):
            used.add(key)
            parts.append(tag("details", None, tag("summary", None, f"{key} ({len(value)})"), _dict_table(value)))
    rest = {k: v for k, v in record.items() if k not in used}
    if rest:
        parts.append(tag("details", None, tag("summary", None, f"other fields: {', '.join(rest)}"),
                         _json_block(rest)))
    return tag("div", {"class": "stage"}, tag("h5", None, name), parts)


def _captions(record: Mapping[str, Any], used: set[str]) -> list[Markup]:
    captions = record.get("captions")
    if not isinstance(captions, list) or not captions:
        return []
    used.add("captions")
    scores = record.get("scores")
    if isinstance(scores, list) and len(scores) == len(captions):
        used.add("scores")
        ranked = sorted(zip(captions, scores), key=lambda cs: -_as_float(cs[1]))
        rows = [tag("li", None, str(c), " ", tag("span", {"class": "score"}, f"{_as_float(s):.2f}"))
                for c, s in ranked]
        title = f"captions ({len(captions)}, by score)"
    else:
        rows = [tag("li", None, str(c)) for c in captions]
        title = f"captions ({len(captions)})"
    all_scores = record.get("all_scores")
    if isinstance(all_scores, list):
        used.add("all_scores")
        title += f", {len(captions)} of {len(all_scores)} kept"
    out = [tag("div", {"class": "label"}, title), tag("ol", {"class": "captions"}, rows[:TOP_CAPTIONS])]
    if len(rows) > TOP_CAPTIONS:
        out.append(tag("details", None, tag("summary", None, f"{len(rows) - TOP_CAPTIONS} more captions"),
                       tag("ol", {"class": "captions", "start": TOP_CAPTIONS + 1}, rows[TOP_CAPTIONS:])))
    return out


def _qa_pairs(record: Mapping[str, Any], used: set[str]) -> list[Markup]:
    pairs: list[tuple[Any, Any]] = []
    questions, answers = record.get("questions"), record.get("answers")
    if isinstance(questions, list) and isinstance(answers, list) and len(questions) == len(answers):
        used.update(("questions", "answers"))
        pairs = list(zip(questions, answers))
    for key in QA_FIELDS:
        value = record.get(key)
        if isinstance(value, list):
            used.add(key)
            for pair in value:
                if isinstance(pair, Mapping):
                    pairs.append((pair.get("question", ""), pair.get("answer", "")))
                elif isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
                    pairs.append((pair[0], pair[1]))
    if not pairs:
        return []
    table = tag("table", {"class": "qa"}, tag("tr", None, tag("th", None, "synthetic question"),
                                                tag("th", None, "answer")),
                [tag("tr", None, tag("td", None, str(q)), tag("td", None, str(a))) for q, a in pairs])
    if len(pairs) <= 6:
        return [tag("div", {"class": "label"}, f"synthetic QA pairs ({len(pairs)})"), table]
    return [tag("details", None, tag("summary", None, f"synthetic QA pairs ({len(pairs)})"), table)]


def _weighted_chips(record: Mapping[str, Any], used: set[str]) -> list[Markup]:
    """Aligned value/weight lists as chips: candidate answers with their counts (Img2LLM answer
    extraction), image tags with their scores (PICa tags)."""
    out = []
    for values_key, weights_key, fmt in (("answers", "counts", "×{}"), ("tags", "scores", "{:.2f}")):
        values, weights = record.get(values_key), record.get(weights_key)
        if values_key in used or weights_key in used or not isinstance(values, list):
            continue
        if not isinstance(weights, list) or len(weights) != len(values):
            continue
        used.update((values_key, weights_key))
        chips = []
        for value, weight in zip(values, weights):
            try:
                suffix = fmt.format(weight)
            except (TypeError, ValueError):
                suffix = str(weight)
            chips.append(tag("span", {"class": "chip"}, f"{value} ", tag("span", {"class": "muted"}, suffix)))
        out.append(tag("div", {"class": "chips"}, tag("span", {"class": "muted"}, f"{values_key}: "), chips))
    return out


def _is_flat_table(value: Any) -> bool:
    """A short list of dicts of scalars (e.g. per-prompt LLM candidates): readable as a table."""
    return (isinstance(value, list) and 0 < len(value) <= 50
            and all(isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value))


def _dict_table(rows: Sequence[Mapping[str, Any]]) -> Markup:
    columns: list[str] = []
    for row in rows:
        columns.extend(str(c) for c in row if str(c) not in columns)
    return tag("table", {"class": "qa"}, tag("tr", None, [tag("th", None, c) for c in columns]),
               [tag("tr", None, [tag("td", None, _scalar_text(row.get(c))) for c in columns]) for row in rows])


def _examples(record: Mapping[str, Any], used: set[str]) -> list[Markup]:
    out = []
    for key in EXAMPLE_FIELDS:
        value = record.get(key)
        if not isinstance(value, list) or not value:
            continue
        used.add(key)
        if all(isinstance(v, Mapping) for v in value):
            body = _dict_table([{k: x for k, x in ex.items() if _is_scalar(x)} for ex in value])
        else:
            body = _json_block(value)
        out.append(tag("details", None, tag("summary", None, f"in-context examples ({len(value)})"), body))
    return out


def _prompts(record: Mapping[str, Any], used: set[str]) -> list[Markup]:
    out = []
    for key in PROMPT_FIELDS:
        value = record.get(key)
        prompts = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if not prompts:
            continue
        used.add(key)
        for i, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, indent=1)
            label = "LLM prompt" + (f" {i + 1} of {len(prompts)}" if len(prompts) > 1 else "")
            out.append(tag("details", {"class": "prompt"},
                           tag("summary", None, f"{label} ({len(text)} characters)"),
                           tag("pre", None, text)))
    return out


def _json_block(value: Any) -> Markup:
    text = json.dumps(compact(value), ensure_ascii=False, indent=1, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n… ({len(text) - MAX_JSON_CHARS} more characters)"
    return tag("pre", {"class": "json"}, text)


def compact(value: Any) -> Any:
    """Long lists cut to their first items plus a count, recursively (for the JSON fallback view)."""
    if isinstance(value, Mapping):
        return {str(k): compact(v) for k, v in value.items()}
    if isinstance(value, list):
        head = [compact(v) for v in value[:MAX_JSON_LIST]]
        if len(value) > MAX_JSON_LIST:
            head.append(f"… {len(value) - MAX_JSON_LIST} more")
        return head
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("-inf")


def render_stages(stages: Mapping[str, Any] | None) -> Markup:
    if not stages:
        return tag("p", {"class": "muted"}, "no stage records")
    return join(render_stage(str(name), record) for name, record in stages.items())
