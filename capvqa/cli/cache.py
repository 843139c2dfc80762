"""``capvqa cache info|clear``: what the stage cache holds, and removing it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capvqa.cli.console import console, human_size

app = typer.Typer(no_args_is_help=True)

CacheDirOption = Annotated[Path | None, typer.Option(help="Cache directory (default ~/.cache/capvqa/cache).")]


@app.command("info")
def info(cache_dir: CacheDirOption = None) -> None:
    """Size on disk and entries per stage."""
    from rich.table import Table

    from capvqa.engine.store import CacheStore

    store = CacheStore(cache_dir)
    usage = store.usage()
    table = Table(title=f"stage cache {store.path}")
    table.add_column("stage")
    table.add_column("entries", justify="right")
    table.add_column("payload", justify="right")
    for row in usage:
        table.add_row(row.stage, str(row.entries), human_size(row.nbytes))
    console.print(table)
    console.print(f"total on disk: {human_size(store.file_size())}, {sum(r.entries for r in usage)} entries")


@app.command("clear")
def clear(
    stage: Annotated[str | None, typer.Option(help="Only this stage (as listed by `capvqa cache info`).")] = None,
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (never asked without a terminal).")] = False,
) -> None:
    """Delete cached results (all, or one stage's)."""
    from capvqa.engine.store import CacheStore
    from capvqa.errors import UserError

    store = CacheStore(cache_dir)
    known = [row.stage for row in store.usage()]
    if stage is not None and stage not in known:
        raise UserError(f"no cached stage {stage!r} in {store.path}; cached stages: {known or 'none'}")
    what = f"stage {stage}" if stage else "every stage"
    import sys

    interactive = sys.stdin.isatty()
    if not yes and interactive and not typer.confirm(f"Delete the cached results of {what} in {store.path}?"):
        raise typer.Abort()
    removed = store.clear(stage)
    console.print(f"removed {removed} entries ({what})")

