"""Small inline-SVG charts: grouped bars, stacked bars and lines, no JavaScript or plotting library.

The report must open offline and stay one file, so charts are plain SVG strings built with
:func:`capvqa.report.htmlkit.tag` (every label escaped). Each function returns a complete ``<svg>``
element that is also a well-formed XML document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from capvqa.report.htmlkit import Markup, tag

SVG_NS = "http://www.w3.org/2000/svg"
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
FONT = 12
CHAR_WIDTH = 6.6  # average width of a 12 px sans-serif character, for layout only


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 5 x 10^k) up to at least ``maximum``."""
    if not maximum or maximum <= 0 or not math.isfinite(maximum):
        return [0.0, 1.0]
    raw = maximum / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    ticks = [0.0]
    while ticks[-1] < maximum - 1e-12:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(1, max_chars - 1)] + "…"


def _svg(width: float, height: float, title: str, body: Sequence[Markup]) -> Markup:
    return tag("svg", {
        "xmlns": SVG_NS, "width": f"{width:.0f}", "height": f"{height:.0f}",
        "viewBox": f"0 0 {width:.0f} {height:.0f}", "role": "img", "class": "chart",
        "font-family": "system-ui, sans-serif", "font-size": FONT,
    }, tag("title", None, title), *body)


def _text(x: float, y: float, text: str, anchor: str = "start", **extra: object) -> Markup:
    attrs = {"x": f"{x:.1f}", "y": f"{y:.1f}", "text-anchor": anchor, **extra}
    return tag("text", attrs, text)


def _value_grid(
    ticks: Sequence[float], scale_max: float, left: float, plot_w: float, top: float, plot_h: float, unit: str
) -> list[Markup]:
    """Vertical grid lines at ``ticks`` with their labels under the plot (horizontal bar charts)."""
    marks: list[Markup] = []
    for t in ticks:
        x = left + plot_w * t / scale_max
        marks.append(tag("line", {"x1": f"{x:.1f}", "x2": f"{x:.1f}", "y1": top, "y2": f"{top + plot_h:.1f}",
                                  "stroke": "#ddd"}))
        marks.append(_text(x, top + plot_h + 16, format_tick(t) + unit, "middle", fill="#555"))
    return marks


def _legend(labels: Sequence[str], x: float, y: float, width: float) -> tuple[list[Markup], float]:
    """Legend swatches flowing over lines of ``width``; returns the elements and the height used."""
    parts: list[Markup] = []
    cx, cy = x, y
    for i, label in enumerate(labels):
        shown = _truncate(label, 40)
        item_width = 18 + len(shown) * CHAR_WIDTH + 14
        if cx > x and cx + item_width > x + width:
            cx, cy = x, cy + 18
        parts.append(tag("rect", {"x": f"{cx:.1f}", "y": f"{cy:.1f}", "width": 12, "height": 12,
                                  "fill": color(i)}))
        parts.append(_text(cx + 16, cy + 10.5, shown))
        cx += item_width
    return parts, (cy - y) + 22 if labels else 0


def grouped_hbar_chart(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    title: str,
    x_max: float | None = None,
    unit: str = "",
    width: int = 760,
    category_notes: Sequence[str] | None = None,
) -> Markup:
    """Horizontal grouped bars: one row per category, one bar per series (None: no bar, "n/a")."""
    labels = [c if not category_notes else f"{c} {category_notes[i]}".strip() for i, c in enumerate(categories)]
    label_chars = min(40, max([len(label) for label in labels] + [4]))
    left = 10 + label_chars * CHAR_WIDTH + 8
    right = 56
    plot_w = width - left - right
    bar_h = 14 if len(series) > 1 else 16
    row_h = bar_h * len(series) + 8
    legend, legend_h = _legend([s[0] for s in series], left, 8, plot_w) if len(series) > 1 else ([], 0)
    top = 8 + legend_h + 6
    values = [v for _, vs in series for v in vs if v is not None]
    maximum = x_max if x_max is not None else (max(values) if values else 1.0)
    ticks = nice_ticks(maximum)
    scale_max = max(ticks[-1], maximum) or 1.0
    plot_h = row_h * len(categories)
    height = top + plot_h + 30
    body: list[Markup] = list(legend)
    body += _value_grid(ticks, scale_max, left, plot_w, top, plot_h, unit)
    for row, category in enumerate(categories):
        y0 = top + row * row_h + 4
        label = labels[row]
        body.append(tag("text", {"x": f"{left - 8:.1f}", "y": f"{y0 + row_h / 2 - 1:.1f}", "text-anchor": "end",
                                 "dominant-baseline": "middle"},
                        tag("title", None, label), _truncate(label, label_chars)))
        for s, (name, vs) in enumerate(series):
            value = vs[row] if row < len(vs) else None
            y = y0 + s * bar_h
            if value is None:
                body.append(_text(left + 4, y + bar_h - 3, "n/a", fill="#999", **{"font-size": 10}))
                continue
            w = max(0.0, plot_w * float(value) / scale_max)
            body.append(tag("rect", {"x": f"{left:.1f}", "y": f"{y:.1f}", "width": f"{w:.1f}",
                                     "height": f"{bar_h - 2:.1f}", "fill": color(s)},
                            tag("title", None, f"{name} — {category}: {format_tick(float(value))}{unit}")))
            body.append(_text(left + w + 4, y + bar_h - 4, f"{float(value):.1f}", fill="#333",
                              **{"font-size": 10}))
    body.append(tag("line", {"x1": f"{left:.1f}", "x2": f"{left:.1f}", "y1": top, "y2": f"{top + plot_h:.1f}",
                             "stroke": "#888"}))
    return _svg(width, height, title, body)


def stacked_hbar_chart(
    rows: Sequence[str],
    segments: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    title: str,
    unit: str = "s",
    width: int = 760,
    row_notes: Sequence[str] | None = None,
) -> Markup:
    """Horizontal stacked bars: one bar per row (a run), one segment per ``segments`` entry (a stage).
    ``values[row][segment]``; None segments are skipped (e.g. a stage served from the cache)."""
    label_chars = min(30, max([len(r) for r in rows] + [4]))
    left = 10 + label_chars * CHAR_WIDTH + 8
    right = 80
    plot_w = width - left - right
    legend, legend_h = _legend(list(segments), left, 8, plot_w)
    top = 8 + legend_h + 6
    bar_h = 22
    totals = [sum(v for v in row if v is not None) for row in values]
    ticks = nice_ticks(max(totals) if totals else 1.0)
    scale_max = ticks[-1] or 1.0
    plot_h = (bar_h + 10) * len(rows)
    height = top + plot_h + 30
    body: list[Markup] = list(legend)
    body += _value_grid(ticks, scale_max, left, plot_w, top, plot_h, unit)
    for r, label in enumerate(rows):
        y = top + r * (bar_h + 10) + 5
        body.append(tag("text", {"x": f"{left - 8:.1f}", "y": f"{y + bar_h / 2:.1f}", "text-anchor": "end",
                                 "dominant-baseline": "middle"},
                        tag("title", None, label), _truncate(label, label_chars)))
        x = float(left)
        for s, name in enumerate(segments):
            value = values[r][s] if s < len(values[r]) else None
            if value is None or value <= 0:
                continue
            w = plot_w * value / scale_max
            body.append(tag("rect", {"x": f"{x:.1f}", "y": f"{y:.1f}", "width": f"{w:.1f}", "height": bar_h,
                                     "fill": color(s)},
                            tag("title", None, f"{label} — {name}: {value:.4g} {unit} per question")))
            x += w
        note = f"{totals[r]:.3g} {unit}" + (f" {row_notes[r]}" if row_notes and row_notes[r] else "")
        body.append(_text(x + 4, y + bar_h / 2 + 4, note, fill="#333", **{"font-size": 10}))
    body.append(tag("line", {"x1": f"{left:.1f}", "x2": f"{left:.1f}", "y1": top, "y2": f"{top + plot_h:.1f}",
                             "stroke": "#888"}))
    return _svg(width, height, title, body)


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    title: str,
    x_label: str,
    y_label: str = "accuracy",
    y_max: float | None = None,
    width: int = 760,
    height: int = 320,
) -> Markup:
    """Lines with markers; x positions are the distinct x values (categorical spacing when they are
    few and uneven would mislead, so the axis is linear in x)."""
    legend, legend_h = _legend([s[0] for s in series], 60, 8, width - 80)
    top = 8 + legend_h + 8
    left, right, bottom = 60, 24, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = sorted({x for _, pts in series for x, _ in pts})
    ys = [y for _, pts in series for _, y in pts]
    x_lo, x_hi = (xs[0], xs[-1]) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    ticks = nice_ticks(y_max if y_max is not None else (max(ys) if ys else 1.0))
    y_top = ticks[-1] or 1.0

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h * (1 - y / y_top)

    body: list[Markup] = list(legend)
    for t in ticks:
        body.append(tag("line", {"x1": left, "x2": left + plot_w, "y1": f"{py(t):.1f}", "y2": f"{py(t):.1f}",
                                 "stroke": "#ddd"}))
        body.append(_text(left - 6, py(t) + 4, format_tick(t), "end", fill="#555"))
    for x in xs:
        body.append(_text(px(x), top + plot_h + 16, format_tick(x), "middle", fill="#555"))
    body.append(_text(left + plot_w / 2, height - 8, x_label, "middle", fill="#333"))
    body.append(_text(14, top + plot_h / 2, y_label, "middle", fill="#333",
                      transform=f"rotate(-90 14 {top + plot_h / 2:.1f})"))
    body.append(tag("rect", {"x": left, "y": f"{top:.1f}", "width": plot_w, "height": f"{plot_h:.1f}",
                             "fill": "none", "stroke": "#888"}))
    for s, (name, points) in enumerate(series):
        pts = sorted(points)
        if len(pts) > 1:
            body.append(tag("polyline", {"points": " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts),
                                         "fill": "none", "stroke": color(s), "stroke-width": 2}))
        for x, y in pts:
            body.append(tag("circle", {"cx": f"{px(x):.1f}", "cy": f"{py(y):.1f}", "r": 4, "fill": color(s)},
                            tag("title", None, f"{name}: {format_tick(x)} -> {y:.2f}")))
    return _svg(width, height, title, body)
