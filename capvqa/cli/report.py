"""``capvqa report RUN_DIR [RUN_DIR ...]``: an HTML report (and optionally Markdown) over run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capvqa.cli.console import check_output_file, print_text, print_warning


def report(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Run folders written by `capvqa run`; the first is the reference for deltas.")],
    out: Annotated[Path, typer.Option("--out", help="HTML report to write (one self-contained file).")] = Path("report.html"),
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write a short Markdown summary here.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Name of each run, in order (default: folder names).")] = None,
    gallery: Annotated[int, typer.Option("--gallery", help="At most this many example questions in the gallery.")] = 120,
    thumbnails: Annotated[bool, typer.Option(help="Embed image thumbnails (needs the run's dataset here).")] = True,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
) -> None:
    """Compare runs: accuracy overall / per answer type / per question type with deltas against the first
    run and the published number where one applies, the config keys that differ, plots, and a filterable
    example gallery (images with relevance maps, captions, QA pairs, prompts)."""
    from capvqa.errors import UserError
    from capvqa.report.build import build_report

    if label and len(label) != len(run_dirs):
        raise UserError(f"--label given {len(label)} times for {len(run_dirs)} run folders")
    check_output_file(out, "--out")
    if markdown is not None:
        check_output_file(markdown, "--markdown")
    try:
        data = build_report(run_dirs, html_path=out, markdown_path=markdown, labels=label,
                            gallery_limit=gallery, thumbnails=thumbnails, title=title)
    except FileNotFoundError as error:
        raise UserError(str(error)) from error
    except OSError as error:  # writing the report: full disk, permissions changed during the run
        raise UserError(f"cannot write the report: {error.strerror or error} ({error.filename}); "
                        "give --out / --markdown paths in a writable folder") from error
    for view in data.runs:
        overall = "n/a" if view.scores.overall is None else f"{view.scores.overall:.2f}"
        print_text(f"{view.label}: VQA accuracy {overall}; published: {view.published.describe()}")
    for note in data.notes:
        print_warning(note)
    print_text(f"report written to {out}" + (f" and {markdown}" if markdown else ""))
