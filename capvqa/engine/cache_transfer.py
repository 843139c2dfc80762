"""Moving stage results between machines: ``capvqa cache export`` and ``capvqa cache merge``.

A cache entry's key is a hash of everything its value depends on (stage, code version, config, model
revision, item content and the upstream keys), so two caches never disagree about what a key means:
merging is a union. An export file is itself an SQLite database holding the ``entries`` table of a
cache (rollback journal, so it is one self-contained file to copy) plus an ``export_info`` table saying
what it holds; ``merge`` reads export files, cache databases and cache directories alike.

Integrity on both sides: every entry is verified against its checksum when exported and again when
merged (an export damaged in transit is caught entry by entry); entries that fail are skipped and
counted, never copied. A key already in the target with *different* bytes is a conflict: the target's
entry is kept and the conflict reported -- never silently overwritten, since both can be legitimate
(the same computation on another CPU's kernels can differ in the last bits) and only the user knows
which run's results they want. A target entry that is itself damaged is replaced by an intact copy.

Not carried: the image-hash memo (it names local paths) and PICa's example-pool arrays beside the
database (recomputed from the pool on first use).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from capvqa.engine.store import (
    DB_FILENAME,
    ENTRIES_SCHEMA,
    STORE_SCHEMA_VERSION,
    CacheStore,
    entry_checksum,
    entry_problem,
)
from capvqa.errors import UserError

EXPORT_FORMAT = "capvqa-cache-export"
EXPORT_FORMAT_VERSION = 1
_CHUNK_ROWS = 256
_MAX_EXAMPLES = 20

_EXPORT_SCHEMA = ENTRIES_SCHEMA + """
CREATE TABLE export_info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Conflict:
    """A key present on both sides with different bytes (the target's entry was kept)."""

    source: Path
    stage: str
    key: str


@dataclass
class ExportReport:
    path: Path
    stage: str | None
    entries: int = 0
    nbytes: int = 0
    damaged: int = 0  # entries of the cache that failed verification and were left out
    per_stage: dict[str, int] = field(default_factory=dict)


@dataclass
class MergeReport:
    target: Path
    sources: list[Path] = field(default_factory=list)
    added: int = 0
    identical: int = 0  # already in the target, byte for byte
    replaced_damaged: int = 0  # target entries that failed verification, replaced by the source's
    damaged: int = 0  # source entries that failed verification (skipped)
    conflicts: int = 0
    conflict_examples: list[Conflict] = field(default_factory=list)
    added_per_stage: dict[str, int] = field(default_factory=dict)


def export_cache(store: CacheStore, destination: Path, stage: str | None = None) -> ExportReport:
    """Write the verified entries of ``store`` (or of one ``stage``) into a new export file.

    The file is written beside ``destination`` under a temporary name and renamed into place when
    complete, so an interrupted export leaves no file that looks finished. ``destination`` must not
    exist (an export is never merged into by accident).
    """
    destination = Path(destination)
    if destination.exists():
        raise UserError(f"{destination} already exists; choose another file name or delete it first")
    if not store.path.exists():
        raise UserError(f"no stage cache at {store.path} (nothing to export); pass --cache-dir")
    known = {row.stage: row.entries for row in store.usage()}
    if stage is not None and stage not in known:
        raise UserError(f"no cached stage {stage!r} in {store.path}; cached stages: {sorted(known) or 'none'}")
    report = ExportReport(path=destination, stage=stage)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            target.executescript(_EXPORT_SCHEMA)
            target.execute("BEGIN")
            for rows in _source_rows(store.path, stage):
                kept = []
                for key, row_stage, header, arrays, checksum, created in rows:
                    if entry_problem(key, header, arrays, checksum) is not None:
                        report.damaged += 1
                        continue
                    sealed = checksum if checksum is not None else entry_checksum(key, header, arrays)
                    size = len(header) + len(arrays or b"")
                    kept.append((key, row_stage, header, arrays, size, created, sealed))
                    report.entries += 1
                    report.nbytes += size
                    report.per_stage[row_stage] = report.per_stage.get(row_stage, 0) + 1
                target.executemany(
                    "INSERT INTO entries(key, stage, header, arrays, nbytes, created, checksum) VALUES (?,?,?,?,?,?,?)",
                    kept,
                )
            info = _export_info(store.path, stage, report)
            target.executemany("INSERT INTO export_info(name, value) VALUES (?, ?)", sorted(info.items()))
            target.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION}")
            target.execute("COMMIT")
        finally:
            target.close()
        os.replace(partial, destination)
    except (OSError, sqlite3.Error) as error:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"exporting {store.path} to {destination} failed: {error}. Nothing was written; make sure the "
            "destination's directory is writable and has free space."
        ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return report


def merge_caches(store: CacheStore, sources: list[Path]) -> MergeReport:
    """Copy every verified entry of ``sources`` (export files, cache databases or cache directories)
    that ``store`` lacks; report identical, conflicting and damaged entries. Each chunk of entries is
    committed in one transaction, so an interrupted merge keeps what it copied and a rerun finishes it."""
    resolved = [_resolve_source(Path(source)) for source in sources]
    if store.path.resolve() in {path.resolve() for path in resolved}:
        raise UserError(f"{store.path} is the target cache itself; name other caches or export files to merge")
    report = MergeReport(target=store.path, sources=resolved)
    for source in resolved:
        _check_structure(source)
        for rows in _source_rows(source, None):
            _merge_chunk(store, source, rows, report)
    return report


def _merge_chunk(store: CacheStore, source: Path, rows: list[tuple], report: MergeReport) -> None:
    verified = []
    for key, stage, header, arrays, checksum, created in rows:
        if entry_problem(key, header, arrays, checksum) is not None:
            report.damaged += 1
            continue
        verified.append((key, stage, header, arrays, checksum or entry_checksum(key, header, arrays), created))
    if not verified:
        return
    with store.write_transaction("merging into") as connection:
        marks = ",".join("?" * len(verified))
        existing = {
            key: (header, arrays, checksum)
            for key, header, arrays, checksum in connection.execute(
                f"SELECT key, header, arrays, checksum FROM entries WHERE key IN ({marks})",
                [row[0] for row in verified],
            )
        }
        inserts = []
        for key, stage, header, arrays, checksum, created in verified:
            present = existing.get(key)
            if present is not None:
                if entry_problem(key, *present) is not None:
                    connection.execute("DELETE FROM entries WHERE key = ?", (key,))
                    report.replaced_damaged += 1
                elif present[0] == header and (present[1] or None) == (arrays or None):
                    report.identical += 1
                    continue
                else:
                    report.conflicts += 1
                    if len(report.conflict_examples) < _MAX_EXAMPLES:
                        report.conflict_examples.append(Conflict(source, stage, key))
                    continue
            inserts.append((key, stage, header, arrays or None, len(header) + len(arrays or b""), created, checksum))
            report.added_per_stage[stage] = report.added_per_stage.get(stage, 0) + 1
        connection.executemany(
            "INSERT INTO entries(key, stage, header, arrays, nbytes, created, checksum) VALUES (?,?,?,?,?,?,?)",
            inserts,
        )
        report.added += len(inserts)


def _resolve_source(path: Path) -> Path:
    """A cache directory stands for its database file; anything else must be a file."""
    if path.is_dir():
        database = path / DB_FILENAME
        if not database.is_file():
            raise UserError(f"{path} is a directory without a stage cache ({DB_FILENAME}); name a cache "
                            "directory, its database or a file written by `capvqa cache export`")
        return database
    if not path.is_file():
        raise UserError(f"{path} does not exist; name a cache directory, its database or an export file")
    return path


def _open_read_only(path: Path) -> sqlite3.Connection:
    try:
        # as_uri() percent-encodes the path: '#', '?' and '%' in a file name are not URI syntax
        return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as error:
        raise UserError(f"cannot open {path}: {error}") from None


def _check_structure(path: Path) -> None:
    """Refuse a file that is not a capvqa cache or export, or whose structure SQLite finds damaged."""
    connection = _open_read_only(path)
    try:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(entries)")}
        if not {"key", "stage", "header", "arrays"} <= columns:
            raise UserError(f"{path} is not a capvqa stage cache or export (it has no entries table)")
        findings = [row[0] for row in connection.execute("PRAGMA quick_check(20)")]
        if findings != ["ok"]:
            raise UserError(
                f"{path} is damaged ({'; '.join(findings[:3])}); nothing was merged from it. Run `capvqa cache "
                "check --repair` on the cache it came from and export again."
            )
    except sqlite3.DatabaseError as error:
        raise UserError(f"{path} is not a readable capvqa stage cache or export: {error}") from None
    finally:
        connection.close()


def _source_rows(path: Path, stage: str | None) -> Iterator[list[tuple]]:
    """(key, stage, header, arrays, checksum, created) rows in rowid order, in chunks, read-only."""
    connection = _open_read_only(path)
    try:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(entries)")}
        checksum = "checksum" if "checksum" in columns else "NULL"
        where = "AND stage = ?" if stage is not None else ""
        after = 0
        while True:
            arguments: tuple = (after, stage) if stage is not None else (after,)
            rows = connection.execute(
                f"SELECT rowid, key, stage, header, arrays, {checksum}, created FROM entries "
                f"WHERE rowid > ? {where} ORDER BY rowid LIMIT {_CHUNK_ROWS}",
                arguments,
            ).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [row[1:] for row in rows]
    except sqlite3.DatabaseError as error:
        raise UserError(f"reading {path} failed: {error}. Run `capvqa cache check` on it.") from None
    finally:
        connection.close()


def _export_info(source: Path, stage: str | None, report: ExportReport) -> dict[str, str]:
    from capvqa import __version__

    return {
        "format": EXPORT_FORMAT,
        "format_version": str(EXPORT_FORMAT_VERSION),
        "capvqa_version": __version__,
        "store_schema": str(STORE_SCHEMA_VERSION),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(source),
        "stage": stage or "",
        "entries": str(report.entries),
        "per_stage": json.dumps(report.per_stage, sort_keys=True),
    }


def read_export_info(path: Path) -> dict[str, str]:
    """The ``export_info`` of an export file (empty for a plain cache database)."""
    connection = _open_read_only(path)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "export_info" not in tables:
            return {}
        return dict(connection.execute("SELECT name, value FROM export_info").fetchall())
    finally:
        connection.close()
