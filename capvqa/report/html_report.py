"""The self-contained HTML report: inline CSS, inline SVG, embedded images, a few lines of vanilla JS.

It must open from a file:// URL on a machine without network, so nothing is fetched at view time. All
text from runs (questions, answers, captions, prompts, labels, config values) goes through
:func:`capvqa.report.htmlkit.tag`, which escapes it; the only JSON embedded in a ``<script>`` goes
through :func:`capvqa.report.htmlkit.script_json`.
"""

from __future__ import annotations

from collections import Counter

from capvqa import __version__
from capvqa.report.agreement import KINDS, RULE, SAME_ANSWER_RULE, PairAgreement, kind_title
from capvqa.report.gallery import GalleryItem, answer_counts
from capvqa.report.htmlkit import Markup, join, script_json, tag
from capvqa.report.json_report import report_json
from capvqa.report.model import ReportData, RunView
from capvqa.report.plots import all_charts
from capvqa.report.published import (
    CAPTION_PIPELINE,
    COMPARISON_ONLY_METHODS,
    DATASET_NAMES,
    END_TO_END,
    END_TO_END_METHODS,
    METHOD_NAMES,
    published_table,
)
from capvqa.report.stage_views import render_stages
from capvqa.report.summary import format_config_value, format_delta, format_number
from capvqa.report.thumbnails import data_uri

OPEN_QUESTION_TYPES = 15  # the per-question-type table starts expanded up to this many rows

CSS = Markup("""
:root { --fg:#1d2330; --muted:#667085; --line:#e3e6eb; --bg:#f7f8fa; --wrong:#c0392b; --partial:#c98a00;
        --right:#2e8b57; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0;
       background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 64px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 2px; font-weight: 600; }
h4 { margin: 0 0 4px; font-size: 15px; } h5 { margin: 8px 0 4px; font-size: 13px; color: var(--accent); }
.muted { color: var(--muted); } .small { font-size: 12px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.delta-pos { color: var(--right); } .delta-neg { color: var(--wrong); }
.banner { border-left: 4px solid var(--partial); background: #fff8e6; padding: 8px 12px; margin: 10px 0; }
.banner.info { border-color: var(--accent); background: #eef4fb; }
.chart { background: #fff; border: 1px solid var(--line); margin: 8px 0; max-width: 100%; height: auto; }
figure { margin: 12px 0; } figcaption { color: var(--muted); font-size: 12px; }
.filters { position: sticky; top: 0; z-index: 5; background: var(--bg); padding: 8px 0; display: flex;
           flex-wrap: wrap; gap: 14px; align-items: center; border-bottom: 1px solid var(--line); }
.filters label { white-space: nowrap; }
.item { display: grid; grid-template-columns: 240px 1fr; gap: 16px; background: #fff; border: 1px solid var(--line);
        border-radius: 6px; padding: 12px; margin: 10px 0; }
.item[hidden] { display: none; }
.item { scroll-margin-top: 96px; }
.item.noimg { grid-template-columns: 1fr; }
.imgwrap { position: relative; display: inline-block; line-height: 0; }
.imgwrap img.photo { max-width: 224px; max-height: 224px; border-radius: 3px; }
.imgwrap img.heat { position: absolute; left: 0; top: 0; width: 100%; height: 100%; opacity: .6;
                    image-rendering: auto; pointer-events: none; }
body.no-overlay .imgwrap img.heat { display: none; }
.score { display: inline-block; min-width: 44px; text-align: center; border-radius: 10px; padding: 0 6px;
         color: #fff; font-size: 12px; background: var(--muted); }
.score.wrong { background: var(--wrong); } .score.partial { background: var(--partial); }
.score.right { background: var(--right); }
ol.captions li .score { background: #eef0f3; color: var(--fg); min-width: 0; }
.chips { margin: 4px 0; } .chip { display: inline-block; background: #eef0f3; border-radius: 10px; padding: 0 8px;
        margin: 2px 4px 2px 0; font-size: 12px; }
.chip.gt-top { background: #dcefe3; }
pre { white-space: pre-wrap; word-break: break-word; background: #f3f4f6; padding: 8px; border-radius: 4px;
      font-size: 12px; max-height: 420px; overflow: auto; }
details > summary { cursor: pointer; color: var(--accent); margin: 4px 0; }
.stage { border-top: 1px dashed var(--line); margin-top: 6px; }
table.answers td.answer { font-weight: 600; }
table.kv th { font-weight: 500; color: var(--muted); }
tr.disagree td { background: #fff8e6; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 8px; }
.example { display: grid; grid-template-columns: 112px 1fr; gap: 10px; background: #fff; border: 1px solid var(--line);
           border-radius: 6px; padding: 8px; }
.example.noimg { grid-template-columns: 1fr; }
.example img.thumb { max-width: 104px; max-height: 104px; border-radius: 3px; }
.example table.answers { margin: 4px 0; } .example table.answers td:first-child { white-space: nowrap; }
details.pair { margin: 10px 0; }
td.hl { background: #e8f1fb; font-weight: 600; }
""")

JS = Markup("""
(function () {
  var items = Array.prototype.slice.call(document.querySelectorAll('article.item'));
  var byId = function (id) { return document.getElementById(id); };
  var wrong = byId('f-wrong'), disagree = byId('f-disagree'), atype = byId('f-atype'),
      qtype = byId('f-qtype'), text = byId('f-text'), overlay = byId('f-overlay'), count = byId('f-count');
  function apply() {
    var needle = text ? text.value.trim().toLowerCase() : '';
    var shown = 0;
    items.forEach(function (el) {
      var d = el.dataset;
      var ok = (!wrong || !wrong.checked || d.wrong === '1') &&
               (!disagree || !disagree.checked || d.disagree === '1') &&
               (!atype || atype.value === '' || d.atype === atype.value) &&
               (!qtype || qtype.value === '' || d.qtype === qtype.value) &&
               (needle === '' || d.text.indexOf(needle) !== -1);
      el.hidden = !ok;
      if (ok) { shown += 1; }
    });
    if (count) { count.textContent = shown + ' of ' + items.length + ' shown'; }
  }
  [wrong, disagree, atype, qtype, text].forEach(function (control) {
    if (control) { control.addEventListener('input', apply); control.addEventListener('change', apply); }
  });
  if (overlay) {
    overlay.addEventListener('change', function () {
      document.body.classList.toggle('no-overlay', !overlay.checked);
    });
  }
  apply();
})();
""")


def render_html(data: ReportData) -> str:
    """The whole report as one HTML document."""
    meta = report_json(data)
    head = join([
        Markup('<meta charset="utf-8">'),
        Markup('<meta name="viewport" content="width=device-width, initial-scale=1">'),
        tag("title", None, data.title),
        tag("style", None, CSS),
    ])
    body = tag("main", None,
               tag("h1", None, data.title),
               tag("p", {"class": "muted"}, f"generated {data.generated} by capvqa {__version__}"),
               _banners(data),
               _runs_section(data),
               _summary_section(data),
               _published_section(data),
               _differences_section(data),
               _agreement_section(data),
               _charts_section(data),
               _timings_section(data),
               _gallery_section(data))
    document = join([
        Markup("<!DOCTYPE html>\n"),
        tag("html", {"lang": "en"},
            tag("head", None, head),
            tag("body", None, body,
                tag("script", {"type": "application/json", "id": "report-meta"}, script_json(meta)),
                tag("script", None, JS))),
    ])
    return str(document) + "\n"


def _banners(data: ReportData) -> Markup:
    parts = []
    if data.tiny_labels:
        who = ", ".join(data.tiny_labels)
        parts.append(tag("div", {"class": "banner"}, tag("strong", None, "Tiny random-weight models. "),
                         f"{who}: run with --models tiny, so answers and accuracy are meaningless and published "
                         "numbers do not apply; the run only exercises the pipeline end to end."))
    for note in data.notes:
        parts.append(tag("div", {"class": "banner info"}, note))
    return join(parts)


def _runs_section(data: ReportData) -> Markup:
    header = ["run", "pipeline", "method", "dataset", "questions", "models", "device", "wall s", "folder"]
    rows = []
    for view in data.runs:
        config, run = view.run.config, view.run.run_settings
        timings = view.run.timings or {}
        dataset = str(run.get("dataset") or "?") + (f" / {run['split']}" if run.get("split") else "")
        if run.get("limit"):
            dataset += f" (limit {run['limit']})"
        rows.append(tag("tr", None,
                        tag("td", None, tag("strong", None, view.label)),
                        tag("td", None, config.get("name") or "?"),
                        tag("td", None, config.get("method") or "?"),
                        tag("td", None, dataset),
                        tag("td", {"class": "num"}, view.scores.num_questions or len(view.run.records)),
                        tag("td", None, config.get("models_preset") or "hub"),
                        tag("td", None, " ".join(str(x) for x in (run.get("device"), run.get("dtype")) if x)),
                        tag("td", {"class": "num"}, format_number(_float(timings.get("total_seconds")), 1)),
                        tag("td", {"class": "small muted"}, str(view.run.path))))
    return tag("section", {"id": "runs"}, tag("h2", None, "Runs"),
               tag("table", None, tag("tr", None, [tag("th", None, h) for h in header]), rows))


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _delta_cell(value: float | None) -> Markup:
    text = format_delta(value)
    cls = "num delta-pos" if value and value > 0 else "num delta-neg" if value and value < 0 else "num"
    return tag("td", {"class": cls}, text)


def _accuracy_table(data: ReportData, rows) -> Markup:
    header = [tag("th", None, "group"), tag("th", {"class": "num"}, "n")]
    for i, label in enumerate(data.labels):
        header.append(tag("th", {"class": "num"}, label))
        if i > 0:
            header.append(tag("th", {"class": "num"}, f"Δ vs {data.labels[0]}"))
    body = []
    for row in rows:
        counts = [c for c in row.counts if c]
        cells = [tag("td", None, row.name if row.kind != "overall" else tag("strong", None, "overall")),
                 tag("td", {"class": "num"}, str(max(counts)) if counts else "")]
        for i, value in enumerate(row.values):
            cells.append(tag("td", {"class": "num"}, format_number(value)))
            if i > 0:
                cells.append(_delta_cell(row.deltas[i]))
        body.append(tag("tr", None, cells))
    return tag("table", None, tag("tr", None, header), body)


def _summary_section(data: ReportData) -> Markup:
    if not any(v is not None for r in data.rows for v in r.values):
        return tag("section", {"id": "summary"}, tag("h2", None, "Accuracy"),
                   tag("p", {"class": "muted"}, "No accuracy: the runs' data has no human answers "
                                                "(e.g. a test split)."))
    main_rows = [r for r in data.rows if r.kind in ("overall", "answer type")]
    question_rows = [r for r in data.rows if r.kind == "question type"]
    parts = [tag("h2", None, "Accuracy (VQA accuracy ×100)"), _accuracy_table(data, main_rows)]
    missing = [f"{v.label}: {v.scores.missing}" for v in data.runs if v.scores.missing]
    if missing:
        parts.append(tag("p", {"class": "muted"}, "questions without a prediction (counted as wrong): "
                                                  + ", ".join(missing)))
    if question_rows:
        parts.append(tag("details", {"open": len(question_rows) <= OPEN_QUESTION_TYPES},
                         tag("summary", None, f"per question type ({len(question_rows)} types)"),
                         _accuracy_table(data, question_rows)))
    return tag("section", {"id": "summary"}, parts)


def _published_section(data: ReportData) -> Markup:
    header = ["run", "overall", "published", "Δ", "setting / why not"]
    rows = []
    for view in data.runs:
        result = view.published.result
        rows.append(tag("tr", None,
                        tag("td", None, view.label),
                        tag("td", {"class": "num"}, format_number(view.scores.overall)),
                        tag("td", {"class": "num"}, format_number(result.accuracy, 1) if result else "n/a"),
                        _delta_cell(view.published_delta),
                        tag("td", None, view.published.describe())))
    parts = [tag("h2", None, "Published numbers"),
             tag("table", None, tag("tr", None, [tag("th", None, h) for h in header]), rows)]
    methods = [v.published.method for v in data.runs if v.published.method in METHOD_NAMES]
    if any(v.published.method in END_TO_END_METHODS for v in data.runs):
        methods += COMPARISON_ONLY_METHODS  # systems capvqa cannot run, for comparison
    for method in dict.fromkeys(methods):
        parts.append(_paper_table(method, data.runs))
    return tag("section", {"id": "published"}, parts)


def _paper_table(method: str, views: list[RunView]) -> Markup:
    """The paper's whole table, with the cells that apply to one of the runs highlighted."""
    columns, table = published_table(method)
    used = {(v.published.result.size, v.published.result.dataset) for v in views if v.published.result}
    names = {name: key for key, name in DATASET_NAMES.items()}
    rows = []
    for size, values in table:
        cells = [tag("td", None, size)]
        for column, value in zip(columns, values):
            highlighted = (size, names[column]) in used
            cells.append(tag("td", {"class": "num hl" if highlighted else "num"}, format_number(value, 1)))
        rows.append(tag("tr", None, cells))
    return tag("details", None, tag("summary", None, f"{METHOD_NAMES[method]}: published VQA accuracy"),
               tag("table", None, tag("tr", None, tag("th", None, "size"), [tag("th", None, c) for c in columns]),
                   rows))


def _differences_section(data: ReportData) -> Markup:
    if not data.multi:
        return Markup("")
    if not data.differences:
        return tag("section", {"id": "config"}, tag("h2", None, "Config differences"),
                   tag("p", None, "The runs' configs are identical."))
    header = tag("tr", None, tag("th", None, "key"), [tag("th", None, label) for label in data.labels])
    rows = [tag("tr", None, tag("td", None, tag("code", None, key)),
                [tag("td", None, format_config_value(v)) for v in values]) for key, values in data.differences]
    return tag("section", {"id": "config"}, tag("h2", None, "Config differences"),
               tag("table", None, header, rows))


def _agreement_section(data: ReportData) -> Markup:
    """Per-question agreement of every pair of runs, who is right where the other is wrong, and examples
    (the rules: :mod:`capvqa.report.agreement`)."""
    agreement = data.agreement
    if agreement is None:
        return Markup("")
    counts = ", ".join(f"{label}: {n}" for label, n in zip(data.labels, agreement.question_counts))
    intro = tag("p", None, f"Questions per run: {counts}; shared by all runs: {agreement.shared_by_all}. Each pair is "
                f"compared on the questions both have; {SAME_ANSWER_RULE}. Right and wrong: {RULE}.")
    corner = tag("th", None, "same answer, % of shared")
    header = tag("tr", None, corner, [tag("th", {"class": "num"}, label) for label in data.labels])
    rows = []
    matrix = agreement.matrix()
    for i, view in enumerate(data.runs):
        cells = [tag("th", None, view.label, tag("div", {"class": "small muted"}, view.method_label)
                     if view.method_label else "")]
        for j in range(len(data.runs)):
            pair = agreement.pair(min(i, j), max(i, j))
            if i == j or pair is None:
                cells.append(tag("td", {"class": "num muted"}, "—"))
            else:
                cells.append(tag("td", {"class": "num"}, format_number(matrix[i][j]),
                                 tag("div", {"class": "small muted"}, f"of {pair.shared}")))
        rows.append(tag("tr", None, cells))
    pair_header = ["run A", "run B", "shared", "same answer", "%", "scored both", "A right, B wrong",
                   "B right, A wrong", "different, neither higher"]
    pair_rows = [tag("tr", None, tag("td", None, data.labels[p.a]), tag("td", None, data.labels[p.b]),
                     [tag("td", {"class": "num"}, v) for v in (p.shared, p.same, format_number(p.agreement),
                                                               p.scored, p.a_better, p.b_better, p.different_tie)])
                 for p in agreement.pairs]
    return tag("section", {"id": "agreement"}, tag("h2", None, "Per-question agreement"), intro,
               tag("table", {"class": "matrix"}, header, rows),
               tag("table", None, tag("tr", None, [tag("th", None, h) for h in pair_header]), pair_rows),
               [_pair_details(data, pair, index == 0) for index, pair in enumerate(agreement.pairs)])


def _run_title(view: RunView) -> str:
    return f"{view.label} ({view.method_label})" if view.method_label else view.label


def _pair_details(data: ReportData, pair: PairAgreement, first: bool) -> Markup:
    a, b = data.runs[pair.a], data.runs[pair.b]
    families = {a.run.family, b.run.family}
    summary = (f"{_run_title(a)} vs {_run_title(b)}: {pair.a_better} right where the other is wrong vs "
               f"{pair.b_better}, on {pair.shared} shared questions")
    gallery = {item.qid for item in data.gallery}
    sections = []
    for kind in KINDS:
        keys = [key for key in pair.examples.get(kind, ()) if key in data.agreement_items]
        title = f"{kind_title(kind, a.label, b.label)}: {pair.count(kind)}"
        body = tag("div", {"class": "examples"}, [_example(data, data.agreement_items[key], pair, key in gallery)
                                                  for key in keys]) if keys \
            else tag("p", {"class": "muted small"}, "none")
        sections.append(tag("div", {"class": f"kind kind-{kind}"}, tag("h3", None, title), body))
    # the comparison the report is most often built for is open from the start
    is_open = first or families == {END_TO_END, CAPTION_PIPELINE}
    return tag("details", {"class": "pair", "open": is_open}, tag("summary", None, summary), sections)


def _example(data: ReportData, item: GalleryItem, pair: PairAgreement, in_gallery: bool) -> Markup:
    figure: Markup | str = ""
    if item.qid in data.thumbnails:
        figure = tag("div", None, tag("img", {"class": "thumb", "src": data_uri(data.thumbnails[item.qid], "image/jpeg"),
                                              "alt": f"image {item.image_id}"}))
    rows = [tag("tr", None, tag("td", None, answer.label), tag("td", {"class": "answer"}, _answer_text(answer.answer)),
                tag("td", None, _score_badge(answer.accuracy)))
            for answer in (item.answers[pair.a], item.answers[pair.b])]
    chips = _human_answers(item.gt_answers)
    link = tag("a", {"href": f"#q-{item.qid}", "class": "small"}, "in the gallery") if in_gallery else ""
    content = tag("div", None, tag("strong", None, item.question),
                  tag("div", {"class": "small muted"}, f"question {item.question_id} ", link),
                  tag("table", {"class": "answers"}, rows), chips)
    return tag("div", {"class": "example" if figure else "example noimg", "data-qid": item.qid}, figure, content)


def _charts_section(data: ReportData) -> Markup:
    charts = all_charts(data)
    if not charts:
        return Markup("")
    figures = [tag("figure", {"id": f"chart-{c.key}"}, tag("h3", None, c.title), c.svg,
                   tag("figcaption", None, c.caption) if c.caption else "") for c in charts]
    return tag("section", {"id": "charts"}, tag("h2", None, "Plots"), figures)


def _timings_section(data: ReportData) -> Markup:
    if not any(v.timings for v in data.runs):
        return Markup("")
    header = ["run", "stage", "computed", "cached", "s / computed question", "setup s", "wall s"]
    rows = []
    for view in data.runs:
        for t in view.timings:
            rows.append(tag("tr", None, tag("td", None, view.label), tag("td", None, t.stage),
                            tag("td", {"class": "num"}, t.computed), tag("td", {"class": "num"}, t.cached),
                            tag("td", {"class": "num"}, format_number(t.seconds_per_item, 4)),
                            tag("td", {"class": "num"}, format_number(t.setup_seconds, 2)),
                            tag("td", {"class": "num"}, format_number(t.wall_seconds, 2))))
    return tag("section", {"id": "timings"}, tag("details", None, tag("summary", None, "stage timings table"),
                                                 tag("table", None, tag("tr", None, [tag("th", None, h) for h in header]),
                                                     rows)))


def _score_badge(score: float | None) -> Markup:
    if score is None:
        return tag("span", {"class": "score"}, "—")
    cls = "wrong" if score == 0 else "partial" if score < 100 else "right"
    return tag("span", {"class": f"score {cls}"}, f"{score:.0f}")


def _answer_text(answer: str | None) -> Markup:
    """Empty answers (a model that generated nothing) must be visible, not a blank cell."""
    if answer is None:
        return tag("em", {"class": "muted"}, "(not in this run)")
    if not answer.strip():
        return tag("em", {"class": "muted"}, "(empty answer)")
    return tag("span", None, answer)


def _options(values: list[str | None], everything: str) -> list[Markup]:
    counts = Counter(v for v in values if v)
    return [tag("option", {"value": ""}, everything)] + [
        tag("option", {"value": name}, f"{name} ({n})") for name, n in sorted(counts.items())
    ]


def _gallery_section(data: ReportData) -> Markup:
    items = data.gallery
    heading = tag("h2", None, f"Examples ({len(items)} of {data.gallery_total} questions)")
    if not items:
        return tag("section", {"id": "gallery"}, heading, tag("p", {"class": "muted"}, "no records"))
    scored = any(item.scores for item in items)
    controls = []
    if scored:
        label = "wrong only" + (" (score 0 in any run)" if data.multi else "")
        controls.append(tag("label", None, tag("input", {"type": "checkbox", "id": "f-wrong"}), f" {label}"))
    if data.multi:
        controls.append(tag("label", None, tag("input", {"type": "checkbox", "id": "f-disagree"}),
                            " runs disagree"))
    controls.append(tag("label", None, "answer type ",
                        tag("select", {"id": "f-atype"}, _options([i.answer_type for i in items], "all"))))
    controls.append(tag("label", None, "question type ",
                        tag("select", {"id": "f-qtype"}, _options([i.question_type for i in items], "all"))))
    controls.append(tag("label", None, "search ", tag("input", {"type": "search", "id": "f-text",
                                                                "placeholder": "question or answer"})))
    if data.heatmaps:
        controls.append(tag("label", None, tag("input", {"type": "checkbox", "id": "f-overlay", "checked": True}),
                            " relevance overlay"))
    controls.append(tag("span", {"id": "f-count", "class": "muted"}, ""))
    intro = (f"Showing {len(items)} of {data.gallery_total} questions, chosen in turn from: runs disagree, "
             "wrong, partly right, right." if len(items) < data.gallery_total else "")
    return tag("section", {"id": "gallery"}, heading,
               tag("p", {"class": "muted"}, intro) if intro else "",
               tag("div", {"class": "filters"}, controls),
               tag("div", {"id": "items"}, [_gallery_item(data, item) for item in items]))


def _gallery_item(data: ReportData, item: GalleryItem) -> Markup:
    searchable = " ".join([item.question, *(a.answer or "" for a in item.answers), *item.gt_answers]).lower()
    attrs = {
        "class": "item" if item.qid in data.thumbnails else "item noimg",
        "id": f"q-{item.qid}",
        "data-qid": item.qid,
        "data-wrong": "1" if item.wrong else "0",
        "data-outcome": item.outcome,
        "data-disagree": "1" if item.disagree else "0",
        "data-atype": item.answer_type or "",
        "data-qtype": item.question_type or "",
        "data-text": searchable,
    }
    figure: Markup = Markup("")
    if item.qid in data.thumbnails:
        images = [tag("img", {"class": "photo", "src": data_uri(data.thumbnails[item.qid], "image/jpeg"),
                              "alt": f"image {item.image_id}"})]
        caption = f"image {item.image_id}"
        if item.qid in data.heatmaps:
            png, source = data.heatmaps[item.qid]
            images.append(tag("img", {"class": "heat", "src": data_uri(png, "image/png"), "alt": ""}))
            caption += f"; relevance from {source}"
        figure = tag("div", {"class": "figure"}, tag("div", {"class": "imgwrap"}, images),
                     tag("div", {"class": "small muted"}, caption))
    answer_rows = [tag("tr", {"class": "disagree"} if item.disagree else None,
                       tag("td", None, a.label),
                       tag("td", {"class": "answer"}, _answer_text(a.answer)),
                       tag("td", None, _score_badge(a.accuracy)))
                   for a in item.answers]
    answers_table = tag("table", {"class": "answers"},
                        tag("tr", None, tag("th", None, "run"), tag("th", None, "answer"), tag("th", None, "score")),
                        answer_rows)
    human_html = _human_answers(item.gt_answers)
    meta = " · ".join(str(x) for x in (f"question {item.question_id}", item.answer_type, item.question_type) if x)
    details = [tag("details", {"open": i == 0, "class": "run-stages"},
                   tag("summary", None, f"{a.label}: intermediate results"), render_stages(a.stages))
               for i, a in enumerate(item.answers) if a.stages]
    content = tag("div", {"class": "content"}, tag("h4", None, item.question), tag("div", {"class": "small muted"}, meta),
                  answers_table, human_html, details)
    return tag("article", attrs, figure, content)


def _human_answers(gt_answers: tuple[str, ...]) -> Markup:
    """The human answers as chips, most frequent first (the top one highlighted)."""
    human = answer_counts(list(gt_answers))
    if not human:
        return Markup("")
    return tag("div", {"class": "chips"}, tag("span", {"class": "muted"}, "human answers: "),
               [tag("span", {"class": "chip gt-top" if i == 0 else "chip"}, f"{answer} ×{n}" if n > 1 else answer)
                for i, (answer, n) in enumerate(human)])
