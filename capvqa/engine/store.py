"""The on-disk stage cache: one embedded SQLite database per cache directory.

Why SQLite: it is in the standard library, needs no server, commits a whole batch of entries in one
atomic transaction, and lets several processes (parallel jobs, torchrun ranks) read and write the same
file safely. A process killed at any moment leaves either the whole batch or none of it -- never a
partial entry -- because the write-ahead log is rolled back on the next open.

Values are a JSON header plus raw array bytes (:mod:`capvqa.engine.codec`); nothing is pickled.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from capvqa.errors import UserError

DB_FILENAME = "capvqa-cache.sqlite3"
_BUSY_TIMEOUT_SECONDS = 120.0
_MAX_SQL_VARIABLES = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    header BLOB NOT NULL,
    arrays BLOB,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_stage ON entries(stage);
CREATE TABLE IF NOT EXISTS image_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StageUsage:
    """How much of the cache one stage occupies."""

    stage: str
    entries: int
    nbytes: int


def default_cache_dir() -> Path:
    """``$CAPVQA_CACHE_DIR``, else ``$CAPVQA_HOME/cache``, else ``~/.cache/capvqa/cache``."""
    if env := os.environ.get("CAPVQA_CACHE_DIR"):
        return Path(env)
    from capvqa.resources import capvqa_home

    return capvqa_home() / "cache"


class CacheStore:
    """Per-item stage results keyed by :func:`capvqa.engine.keys.stage_item_key`.

    The connection is opened lazily and re-opened after a fork, so one store object can be handed to
    worker processes.
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.path = self.directory / DB_FILENAME
        self._connection: sqlite3.Connection | None = None
        self._pid: int | None = None

    # -- connection -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
            _initialise(connection)
        except (OSError, sqlite3.OperationalError) as error:
            raise UserError(
                f"cannot open the stage cache at {self.path}: {error}. Point --cache-dir (or "
                "CAPVQA_CACHE_DIR) at a writable local directory with free space."
            ) from error
        self._connection, self._pid = connection, os.getpid()
        return connection

    def close(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None

    # -- entries --------------------------------------------------------------------------------
    def existing_keys(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` that has a committed entry."""
        found: set[str] = set()
        connection = self._connect()
        for chunk in _chunks(list(keys), _MAX_SQL_VARIABLES):
            marks = ",".join("?" * len(chunk))
            rows = connection.execute(f"SELECT key FROM entries WHERE key IN ({marks})", chunk)
            found.update(row[0] for row in rows)
        return found

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[bytes, bytes | None]]:
        """Raw (header, arrays) for every key that is present."""
        found: dict[str, tuple[bytes, bytes | None]] = {}
        connection = self._connect()
        for chunk in _chunks(list(keys), _MAX_SQL_VARIABLES):
            marks = ",".join("?" * len(chunk))
            rows = connection.execute(f"SELECT key, header, arrays FROM entries WHERE key IN ({marks})", chunk)
            found.update((key, (header, arrays)) for key, header, arrays in rows)
        return found

    def put_many(self, stage: str, entries: Iterable[tuple[str, bytes, bytes]]) -> int:
        """Commit a batch of entries in one transaction; existing keys are kept (results are pure)."""
        now = time.time()
        rows = [
            (key, stage, header, blob or None, len(header) + len(blob or b""), now) for key, header, blob in entries
        ]
        if not rows:
            return 0
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "INSERT OR IGNORE INTO entries(key, stage, header, arrays, nbytes, created) VALUES (?,?,?,?,?,?)",
                rows,
            )
            connection.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise UserError(
                f"writing to the stage cache {self.path} failed: {error}. Finished batches are kept; free "
                "disk space or choose another --cache-dir, then rerun to resume."
            ) from error
        return len(rows)

    # -- image hashes (memoised so reruns do not re-read every image) ----------------------------
    def lookup_image_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = (
            self._connect()
            .execute("SELECT size, mtime_ns, sha256 FROM image_hashes WHERE path = ?", (path,))
            .fetchone()
        )
        if row is None or row[0] != size or row[1] != mtime_ns:
            return None
        return row[2]

    def remember_image_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        try:
            self._connect().execute(
                "INSERT OR REPLACE INTO image_hashes(path, size, mtime_ns, sha256) VALUES (?,?,?,?)",
                (path, size, mtime_ns, sha256),
            )
        except sqlite3.OperationalError:
            pass  # a memo only: failing to remember costs a re-hash next time, nothing more

    # -- maintenance ----------------------------------------------------------------------------
    def usage(self) -> list[StageUsage]:
        if not self.path.exists():
            return []
        rows = self._connect().execute(
            "SELECT stage, COUNT(*), COALESCE(SUM(nbytes), 0) FROM entries GROUP BY stage ORDER BY stage"
        )
        return [StageUsage(stage, count, nbytes) for stage, count, nbytes in rows]

    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob(DB_FILENAME + "*") if p.is_file())

    def clear(self, stage: str | None = None) -> int:
        """Delete all entries, or those of one stage; returns how many were removed."""
        if not self.path.exists():
            return 0
        connection = self._connect()
        if stage is None:
            removed = connection.execute("DELETE FROM entries").rowcount
            connection.execute("DELETE FROM image_hashes")
        else:
            removed = connection.execute("DELETE FROM entries WHERE stage = ?", (stage,)).rowcount
        connection.execute("VACUUM")
        return removed


def _initialise(connection: sqlite3.Connection) -> None:
    """Switch to WAL and create the schema, retrying while another process does the same.

    SQLite does not call the busy handler for every lock these statements take (the journal-mode switch
    on a brand-new file in particular), so two runs opening a fresh cache at the same instant can get
    "database is locked" at once instead of waiting. Both statements are idempotent, so retrying with a
    jittered back-off until the busy timeout is safe.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_SECONDS
    delay = 0.01
    while True:
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as error:
            if not _is_lock_contention(error) or time.monotonic() > deadline:
                raise
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            time.sleep(delay * (1.0 + random.random()))
            delay = min(delay * 2, 0.5)


def _is_lock_contention(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _chunks(values: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
