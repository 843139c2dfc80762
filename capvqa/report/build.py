"""Assemble a report from run folders and write it: the only module here that does I/O end to end.

``write_run_reports`` runs at the end of every ``capvqa run``; it must be fast (light records, thumbnails
only for the gallery) and must never turn a finished run into a failure, so its callers may wrap it,
but it also degrades by itself: a missing dataset means no thumbnails, an unreadable file is a note.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from capvqa.atomic import atomic_write_text
from capvqa.report.agreement import DEFAULT_EXAMPLES_PER_KIND, Agreement, compare_runs, example_keys
from capvqa.report.gallery import (
    DEFAULT_GALLERY_LIMIT,
    GalleryItem,
    build_items,
    relevance_of,
    select_gallery,
)
from capvqa.report.model import ReportData, RunView
from capvqa.report.published import lookup_published
from capvqa.report.runs import RunFolder, load_runs
from capvqa.report.summary import accuracy_rows, differing_config_keys, score_run, stage_timings, sweep_key
from capvqa.report.thumbnails import THUMBNAIL_SIDE, heatmap_png, load_thumbnails


def collect_report(
    runs: Sequence[RunFolder],
    *,
    gallery_limit: int = DEFAULT_GALLERY_LIMIT,
    thumbnails: bool = True,
    thumbnail_side: int = THUMBNAIL_SIDE,
    title: str | None = None,
    agreement_examples: int = DEFAULT_EXAMPLES_PER_KIND,
) -> ReportData:
    """Everything the renderers need, computed from loaded runs."""
    if not runs:
        raise ValueError("a report needs at least one run folder")
    views = []
    notes: list[str] = []
    for run in runs:
        scores = score_run(run.label, run.records, run.metrics)
        views.append(RunView(run=run, scores=scores,
                             published=lookup_published(run.config, scores.num_questions or len(run.records)),
                             timings=stage_timings(run.timings)))
        notes.extend(f"{run.label}: {problem}" for problem in run.problems)
    differences = differing_config_keys([r.config for r in runs]) if len(runs) > 1 else []

    light = [r.by_qid() for r in runs]
    keys = select_gallery(light, gallery_limit)
    full = [r.full_records(keys) for r in runs]
    items = build_items(keys, [r.label for r in runs], light, full)
    agreement = compare_runs(light, agreement_examples) if len(runs) > 1 else None
    agreement_items: dict[str, GalleryItem] = {}
    if agreement is not None:
        # the examples need no stage records: question, answers, scores and the image
        shown = example_keys(agreement)
        agreement_items = {item.qid: item for item in build_items(shown, [r.label for r in runs], light,
                                                                  [{} for _ in runs])}
        notes.extend(_agreement_notes(runs, agreement))

    heatmaps: dict[str, tuple[bytes, str]] = {}
    for item in items:
        found = relevance_of(item)
        if found is not None:
            png = heatmap_png(found[0], found[1])
            if png is not None:
                heatmaps[item.qid] = (png, found[2])
    images: dict[str, bytes] = {}
    wanted = {item.qid: item.question_id for item in [*items, *agreement_items.values()]}
    if thumbnails and wanted:
        images, why = _thumbnails_for(runs, wanted, thumbnail_side)
        if why:
            notes.append(f"thumbnails: {why}")

    total = len({k for records in light for k in records})
    name = title or ("capvqa report: " + " vs ".join(r.label for r in runs))
    return ReportData(
        title=name,
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        runs=views,
        rows=accuracy_rows([v.scores for v in views]),
        differences=differences,
        sweep=sweep_key(differences),
        gallery=items,
        gallery_total=total,
        thumbnails=images,
        heatmaps=heatmaps,
        notes=notes,
        agreement=agreement,
        agreement_items=agreement_items,
    )


def _agreement_notes(runs: Sequence[RunFolder], agreement: Agreement) -> list[str]:
    """Say when a comparison is on part of the questions only, or the shared ids may not be one dataset."""
    notes = []
    counts = agreement.question_counts
    if len(set(counts)) > 1 or agreement.shared_by_all < max(counts, default=0):
        each = ", ".join(f"{run.label} {n}" for run, n in zip(runs, counts))
        notes.append(f"agreement: the runs have different questions ({each}); {agreement.shared_by_all} are "
                     "shared by all, and each pair is compared on the questions both have")
    datasets = {(str(r.run_settings.get("dataset")), str(r.run_settings.get("split"))) for r in runs if r.records}
    if len(datasets) > 1:
        notes.append("agreement: the runs name different datasets or splits; questions are matched by id only")
    for pair in agreement.pairs:
        if pair.different_question:
            notes.append(f"agreement: {pair.different_question} question id(s) shared by {runs[pair.a].label} and "
                         f"{runs[pair.b].label} have different question text: the runs may not be on the same data")
    return notes


def _thumbnails_for(runs: Sequence[RunFolder], wanted: dict[str, object], side: int) -> tuple[dict[str, bytes], str]:
    """Thumbnails (question key -> question id wanted) through the first run's dataset; questions only
    later runs have use theirs."""
    images: dict[str, bytes] = {}
    reasons: list[str] = []
    remaining = dict(wanted)
    for run in runs:
        if not remaining:
            break
        present = run.by_qid()
        wanted = [qid for key, qid in remaining.items() if key in present]
        if not wanted:
            continue
        found, why = load_thumbnails(run.run_settings, wanted, side)
        images.update(found)
        for key in found:
            remaining.pop(key, None)
        if why:
            reasons.append(f"{run.label}: {why}")
    return images, "; ".join(reasons)


def build_report(
    run_dirs: Sequence[str | Path],
    *,
    html_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    json_path: str | Path | None = None,
    labels: Sequence[str] | None = None,
    gallery_limit: int = DEFAULT_GALLERY_LIMIT,
    thumbnails: bool = True,
    title: str | None = None,
    agreement_examples: int = DEFAULT_EXAMPLES_PER_KIND,
) -> ReportData:
    """Load run folders, build the report and write the requested files (atomically)."""
    from capvqa.report.html_report import render_html
    from capvqa.report.json_report import render_json
    from capvqa.report.markdown_report import render_markdown

    data = collect_report(load_runs(run_dirs, labels), gallery_limit=gallery_limit, thumbnails=thumbnails,
                          title=title, agreement_examples=agreement_examples)
    if html_path is not None:
        atomic_write_text(Path(html_path), render_html(data))
    if markdown_path is not None:
        atomic_write_text(Path(markdown_path), render_markdown(data))
    if json_path is not None:
        atomic_write_text(Path(json_path), render_json(data))
    return data


def write_run_reports(run_dir: str | Path, *, gallery_limit: int = DEFAULT_GALLERY_LIMIT) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into a run folder (called at the end of ``capvqa run``)."""
    run_dir = Path(run_dir)
    html_path, markdown_path = run_dir / "report.html", run_dir / "report.md"
    build_report([run_dir], html_path=html_path, markdown_path=markdown_path, gallery_limit=gallery_limit)
    return html_path, markdown_path


