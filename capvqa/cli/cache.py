"""``capvqa cache info|check|clear|export|merge``: what the stage cache holds, whether it is intact,
removing it, and moving results between machines (capvqa/engine/cache_transfer.py says how).

Every command works on a damaged database too: ``info`` says it is damaged (exit status 1), ``check``
says what is wrong and ``--repair`` fixes it, ``clear`` deletes a file too damaged to clear entry by entry.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from capvqa.cli.console import console, human_size, print_error, print_text

if TYPE_CHECKING:
    from capvqa.engine.store import CacheStore

app = typer.Typer(no_args_is_help=True)

CacheDirOption = Annotated[Path | None, typer.Option(help="Cache directory (default ~/.cache/capvqa/cache).")]


@app.command("info")
def info(cache_dir: CacheDirOption = None) -> None:
    """Size on disk and entries per stage."""
    from rich.table import Table

    from capvqa.engine.store import CacheCorruptError, CacheStore

    store = CacheStore(cache_dir)
    try:
        usage = store.usage()
    except CacheCorruptError as error:
        print_text(f"stage cache {store.path}: {human_size(store.file_size())} on disk")
        _print_damaged_copies(store)
        print_error(error)
        raise typer.Exit(1) from None
    table = Table(title=escape(f"stage cache {store.path}"))
    table.add_column("stage")
    table.add_column("entries", justify="right")
    table.add_column("payload", justify="right")
    for row in usage:
        table.add_row(escape(row.stage), str(row.entries), human_size(row.nbytes))
    console.print(table)
    print_text(f"total on disk: {human_size(store.file_size())}, {sum(r.entries for r in usage)} entries")
    _print_damaged_copies(store)


@app.command("check")
def check(
    repair: Annotated[bool, typer.Option(help="Remove damaged entries; rebuild a structurally damaged file from its intact entries (the damaged file is kept beside it). Stop other runs using this cache first.")] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Verify the cache: SQLite's integrity check and every entry's checksum. Exit status 1 when
    problems remain."""
    from capvqa.engine.store import CacheStore

    store = CacheStore(cache_dir)
    report = store.check(repair=repair)
    if not report.exists:
        print_text(f"no stage cache at {store.path} (nothing to check)")
        return
    print_text(f"stage cache {store.path}")
    if report.structure:
        shown = "; ".join(report.structure[:5]) + (" ..." if len(report.structure) > 5 else "")
        print_text(f"  file structure: DAMAGED ({shown})")
    else:
        print_text("  file structure: ok (SQLite integrity check)")
    print_text(f"  entries verified by checksum: {report.intact}")
    if report.unsealed:
        print_text(f"  entries without a checksum (written by an older capvqa; structure checked): {report.unsealed}")
    if report.damaged:
        print_text(f"  damaged entries: {report.damaged}")
        for entry in report.damaged_examples:
            print_text(f"    {entry.stage} {entry.key}: {entry.reason}")
    if report.unreadable:
        print_text(f"  rows SQLite could not read: {report.unreadable}")
    if repair:
        if report.moved_to is not None:
            print_text(
                f"repaired: rebuilt {store.path} from its {report.intact + report.unsealed} intact entries; the "
                f"damaged file is kept as {report.moved_to} (delete it when no longer needed)"
            )
        else:
            done = [f"removed {report.removed} damaged entries"] if report.damaged else []
            done += [f"added checksums to {report.sealed} entries"] if report.sealed else []
            print_text("repaired: " + ", ".join(done) if done else "nothing to repair")
        if report.problems_found:
            print_text("rerun your pipelines: the removed results are recomputed, everything else is reused")
        if not report.repaired:
            raise typer.Exit(1)
        return
    if report.problems_found:
        print_text(f"run `capvqa cache check --repair --cache-dir {shlex.quote(str(store.directory))}` to fix "
                      "(stop other runs using this cache first)")
        raise typer.Exit(1)
    print_text("no problems found")


@app.command("clear")
def clear(
    stage: Annotated[str | None, typer.Option(help="Only this stage (as listed by `capvqa cache info`).")] = None,
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (never asked without a terminal).")] = False,
) -> None:
    """Delete cached results (all, or one stage's). A database too damaged to clear entry by entry is
    deleted as a whole (without --stage)."""
    from capvqa.engine.store import CacheCorruptError, CacheStore
    from capvqa.errors import UserError

    store = CacheStore(cache_dir)
    try:
        known: list[str] | None = [row.stage for row in store.usage()]
    except CacheCorruptError as error:
        if stage is not None:
            raise UserError(
                f"{store.path} is damaged ({error.reason}), so one stage cannot be cleared from it. "
                f"`capvqa cache check --repair --cache-dir {shlex.quote(str(store.directory))}` keeps its intact entries; "
                "`capvqa cache clear` without --stage deletes the whole file."
            ) from None
        known = None
    if stage is not None and stage not in (known or []):
        raise UserError(f"no cached stage {stage!r} in {store.path}; cached stages: {known or 'none'}")
    what = f"stage {stage}" if stage else "every stage"
    if not yes and sys.stdin.isatty() and not typer.confirm(f"Delete the cached results of {what} in {store.path}?"):
        raise typer.Abort()
    if stage is None or stage == _POOL_STAGE:
        _clear_example_pools(store.directory)
    if known is not None:
        try:
            removed = store.clear(stage)
        except CacheCorruptError:
            if stage is not None:
                raise
        else:
            print_text(f"removed {removed} entries ({what})")
            return
    deleted = store.delete_database()
    print_text(
        f"the cache database was damaged; deleted it ({', '.join(str(p) for p in deleted) or 'nothing left'}). "
        "The next run starts an empty cache."
    )


@app.command("export")
def export(
    file: Annotated[Path, typer.Argument(help="The export file to write (must not exist).")],
    stage: Annotated[str | None, typer.Option(help="Only this stage (as listed by `capvqa cache info`).")] = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Write the cache's verified entries (all, or one stage's) into one portable file, for
    `capvqa cache merge` on another machine."""
    from capvqa.engine.cache_transfer import export_cache
    from capvqa.engine.store import CacheStore

    store = CacheStore(cache_dir)
    report = export_cache(store, file, stage)
    stages = ", ".join(f"{name} {count}" for name, count in sorted(report.per_stage.items())) or "none"
    print_text(f"exported {report.entries} entries ({human_size(report.nbytes)}; {stages}) from {store.path} to {file}")
    if report.damaged:
        print_text(f"left out {report.damaged} damaged entries (they failed verification; "
                   f"`capvqa cache check --repair --cache-dir {shlex.quote(str(store.directory))}` removes them)")


@app.command("merge")
def merge(
    sources: Annotated[list[Path], typer.Argument(help="Export files, cache databases or cache directories to merge in.")],
    cache_dir: CacheDirOption = None,
) -> None:
    """Add the entries of other caches or export files to this cache: a union of content-keyed
    results. An entry present on both sides with different bytes is a conflict: this cache's entry is
    kept, the conflicts are listed and the exit status is 1."""
    from capvqa.engine.cache_transfer import merge_caches
    from capvqa.engine.store import CacheStore

    store = CacheStore(cache_dir)
    report = merge_caches(store, sources)
    added = ", ".join(f"{name} {count}" for name, count in sorted(report.added_per_stage.items()))
    print_text(f"merged {len(report.sources)} source(s) into {store.path}: added {report.added} entries"
               + (f" ({added})" if added else "") + f", {report.identical} already present")
    if report.replaced_damaged:
        print_text(f"replaced {report.replaced_damaged} damaged entries of this cache with intact copies")
    if report.damaged:
        print_text(f"skipped {report.damaged} damaged entries of the sources (they failed verification)")
    if report.conflicts:
        print_text(f"{report.conflicts} conflicts: the same key with different bytes; this cache's entries were kept")
        for conflict in report.conflict_examples:
            print_text(f"  {conflict.stage} {conflict.key} (from {conflict.source})")
        if report.conflicts > len(report.conflict_examples):
            print_text(f"  ... and {report.conflicts - len(report.conflict_examples)} more")
        print_text("to take the other side's results instead, `capvqa cache clear --stage NAME` here first, "
                   "then merge again")
        raise typer.Exit(1)


_POOL_STAGE = "pica_example_selection"


def _clear_example_pools(cache_dir: Path) -> None:
    """PICa's pool embeddings and pool-fingerprint memos live beside the database; they go with it."""
    import shutil

    from capvqa.data.example_pool import POOL_CACHE_SUBDIR

    pools = cache_dir / POOL_CACHE_SUBDIR
    if pools.is_dir():
        shutil.rmtree(pools)
        print_text(f"removed the example-pool arrays and memos in {pools}")


def _print_damaged_copies(store: CacheStore) -> None:
    for copy in store.damaged_copies():
        print_text(f"damaged copy kept by `cache check --repair`: {copy} ({human_size(copy.stat().st_size)}); "
                      "delete it when no longer needed")
