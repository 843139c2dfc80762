"""``capvqa report RUN_DIR [RUN_DIR ...]``: an HTML report (and optionally Markdown and JSON) over run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capvqa.cli.console import check_output_file, print_text, print_warning


def report(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Run folders written by `capvqa run`; the first is the reference for deltas.")],
    out: Annotated[Path, typer.Option("--out", help="HTML report to write (one self-contained file).")] = Path("report.html"),
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write a short Markdown summary here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report's numbers (accuracy, per-question agreement) as JSON here.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Name of each run, in order (default: folder names).")] = None,
    gallery: Annotated[int, typer.Option("--gallery", help="At most this many example questions in the gallery.")] = 120,
    thumbnails: Annotated[bool, typer.Option(help="Embed image thumbnails (needs the run's dataset here).")] = True,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
) -> None:
    """Compare runs: accuracy overall / per answer type / per question type with deltas against the first
    run and the published number where one applies, the config keys that differ, per-question agreement
    between runs (who is right where the other is wrong, with examples), plots, and a filterable example
    gallery (images with relevance maps, captions, QA pairs, prompts)."""
    from capvqa.errors import UserError
    from capvqa.report.build import build_report

    if label and len(label) != len(run_dirs):
        raise UserError(f"--label given {len(label)} times for {len(run_dirs)} run folders")
    check_output_file(out, "--out")
    if markdown is not None:
        check_output_file(markdown, "--markdown")
    if json_out is not None:
        check_output_file(json_out, "--json")
    try:
        data = build_report(run_dirs, html_path=out, markdown_path=markdown, json_path=json_out, labels=label,
                            gallery_limit=gallery, thumbnails=thumbnails, title=title)
    except FileNotFoundError as error:
        raise UserError(str(error)) from error
    except OSError as error:  # writing the report: full disk, permissions changed during the run
        raise UserError(f"cannot write the report: {error.strerror or error} ({error.filename}); "
                        "give --out / --markdown / --json paths in a writable folder") from error
    for view in data.runs:
        overall = "n/a" if view.scores.overall is None else f"{view.scores.overall:.2f}"
        print_text(f"{view.label}: VQA accuracy {overall}; published: {view.published.describe()}")
    for pair in data.agreement.pairs if data.agreement else ():
        a, b = data.labels[pair.a], data.labels[pair.b]
        same = "n/a" if pair.agreement is None else f"{pair.agreement:.2f}%"
        print_text(f"{a} vs {b}: same answer on {same} of {pair.shared} shared questions; {a} right where {b} "
                   f"is wrong on {pair.a_better}, the reverse on {pair.b_better}")
    for note in data.notes:
        print_warning(note)
    others = [str(path) for path in (markdown, json_out) if path is not None]
    print_text(f"report written to {out}" + (f" and {' and '.join(others)}" if others else ""))
