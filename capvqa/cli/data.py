"""``capvqa data``: download the official datasets into the loader layout, and list what is available.

A thin layer over :mod:`capvqa.data.download`; that module is imported inside each command so
``capvqa --help`` does not pay for it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command("download")
def download(
    target: Annotated[
        str,
        typer.Argument(help="vqav2, okvqa, coco-val2014, coco-train2014 or coco-test2015."),
    ],
    root: Annotated[Path, typer.Option("--root", help="Data root (loader layout goes under it).")],
    force: Annotated[bool, typer.Option("--force", help="Download and extract again even if done.")] = False,
    mirror: Annotated[
        str | None,
        typer.Option(
            "--mirror",
            help="Base URL replacing scheme and host of every source (default: $CAPVQA_DOWNLOAD_MIRROR).",
        ),
    ] = None,
    delete_archives: Annotated[
        bool, typer.Option("--delete-archives", help="Delete each archive once it is extracted.")
    ] = False,
) -> None:
    """Download, verify (size, sha256) and extract a dataset; resumes interrupted downloads."""
    from capvqa.cli.console import command_line, err_console, on_interrupt, print_text
    from capvqa.data.download import DOWNLOADS_DIR, download_target

    on_interrupt(f"interrupted: finished archives are kept under {root} and a partial download in "
                 f"{root / DOWNLOADS_DIR}; rerun the same command to resume: {shlex.join(command_line())}")
    reports = download_target(
        target, root, force=force, mirror=mirror, delete_archives=delete_archives, console=err_console
    )
    fetched = sum(not report.skipped for report in reports)
    print_text(
        f"{target}: {fetched} archive(s) downloaded and extracted, "
        f"{len(reports) - fetched} already done, under {root}"
    )


@app.command("list")
def list_targets() -> None:
    """Print the download targets, their archives, sizes and where the files go."""
    from rich.table import Table

    from capvqa.cli.console import console, human_size
    from capvqa.data.download import TARGETS

    table = Table("target", "archive", "size", "sha256", "extracts to")
    for target in TARGETS.values():
        for index, source in enumerate(target.files):
            table.add_row(
                target.name if index == 0 else "",
                source.name,
                human_size(source.size, binary=False),
                "known" if source.sha256 else "-",
                source.rule.describe(),
            )
    console.print(table)

