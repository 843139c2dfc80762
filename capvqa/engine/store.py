"""The on-disk stage cache: one embedded SQLite database per cache directory.

Why SQLite: it is in the standard library, needs no server, commits a whole batch of entries in one
atomic transaction, and lets several processes (parallel jobs, torchrun ranks) read and write the same
file safely. A process killed at any moment leaves either the whole batch or none of it -- never a
partial entry -- because the write-ahead log is rolled back on the next open.

Values are a JSON header plus raw array bytes (:mod:`capvqa.engine.codec`); nothing is pickled.

Integrity. SQLite keeps the file consistent across crashes, not against damage after the fact (a failing
disk, a bad copy, a stray write into the file). So:

- Every entry stores a SHA-256 of its key, header and array bytes, verified on every read
  (:meth:`CacheStore.existing_keys` and :meth:`CacheStore.get_many`). A damaged entry is never served: it
  is deleted with a warning naming the database file and counts as a miss, so the runner recomputes it.
  Verifying in ``existing_keys`` is what lets a damaged result be recomputed by its own stage instead
  of being found missing by the next one; the price is reading each cached value there too (SHA-256
  runs at 1.5-2 GB/s: on this project's machine about 13 us per 9 KiB entry against 1 us for the key
  alone, some 8 s over the 640k entries of a fully cached VQAv2-val rerun).
- Damage to the file's structure (SQLite's "file is not a database", "database disk image is
  malformed") raises :class:`CacheCorruptError`, a :class:`~capvqa.errors.UserError` naming the file and
  the two ways out: ``capvqa cache check --repair`` (copies every intact entry into a fresh file and
  keeps the damaged one beside it as ``<name>.corrupt-<timestamp>``) or ``capvqa cache clear``. The file
  is not swapped for a fresh one automatically: other processes (parallel runs, torchrun ranks) may
  hold it and its write-ahead log open, and moving it under them would split them across two databases;
  and a damaged page usually leaves most entries recoverable, which a silent fresh start would discard.
- Databases written before checksums existed (store schema 1) are migrated in place on open. Their
  entries have no checksum and are trusted after a structural check (the header is a JSON object and
  every array fits the stored bytes, :func:`~capvqa.engine.codec.encoding_problem`);
  ``capvqa cache check --repair`` gives each of them a checksum.

The checksum detects accidental damage; it is not a signature: whoever can write the file can also
rewrite an entry's checksum.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shlex
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from capvqa.engine.codec import encoding_problem
from capvqa.errors import UserError

log = logging.getLogger(__name__)

DB_FILENAME = "capvqa-cache.sqlite3"
#: ``PRAGMA user_version`` of a current database: 2 = entries carry checksums and the image-hash memo
#: keys on the file's identity (see :func:`file_signature`). Version 1 (no user_version) is migrated.
STORE_SCHEMA_VERSION = 2
#: A damaged database moved aside by ``capvqa cache check --repair`` is named ``<name>.corrupt-<time>``.
CORRUPT_SUFFIX = ".corrupt-"
_COMPANIONS = ("-wal", "-shm")  # SQLite's write-ahead log and its shared-memory index
_BUSY_TIMEOUT_SECONDS = 120.0
_MAX_SQL_VARIABLES = 500
_SCAN_ROWS = 256
_REPORTED_DAMAGE = 20
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

# The results table, as a cache and an export file (capvqa/engine/cache_transfer.py) both hold it.
ENTRIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    header BLOB NOT NULL,
    arrays BLOB,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    checksum BLOB
);
CREATE INDEX IF NOT EXISTS entries_stage ON entries(stage);
"""
_SCHEMA = ENTRIES_SCHEMA + """
CREATE TABLE IF NOT EXISTS image_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    signature TEXT
);
"""
# Columns added since store schema 1; older capvqa versions ignore them, so both can share a cache.
_ADDED_COLUMNS = (("entries", "checksum", "BLOB"), ("image_hashes", "signature", "TEXT"))


@dataclass(frozen=True)
class StageUsage:
    """How much of the cache one stage occupies."""

    stage: str
    entries: int
    nbytes: int


@dataclass(frozen=True)
class DamagedEntry:
    """An entry whose stored bytes fail verification."""

    key: str
    stage: str
    reason: str


@dataclass
class CheckReport:
    """What :meth:`CacheStore.check` found and, with ``repair``, did."""

    path: Path
    exists: bool = True
    structure: list[str] = field(default_factory=list)  # SQLite's findings; empty when the file is sound
    intact: int = 0  # entries whose checksum verified
    unsealed: int = 0  # entries without a checksum (older capvqa) that pass the structural check
    damaged: int = 0  # entries that fail verification
    damaged_examples: list[DamagedEntry] = field(default_factory=list)  # the first few of them
    unreadable: int = 0  # rows SQLite could not read at all (damaged pages)
    removed: int = 0  # repair: damaged entries deleted
    sealed: int = 0  # repair: unsealed entries given a checksum
    moved_to: Path | None = None  # repair: where the damaged file was moved (after a rebuild)

    @property
    def problems_found(self) -> bool:
        return bool(self.structure or self.damaged or self.unreadable)

    @property
    def repaired(self) -> bool:
        """Every problem found was dealt with (the damaged entries are gone or the file was rebuilt)."""
        return self.moved_to is not None or (not self.structure and self.removed == self.damaged)


class CacheCorruptError(UserError):
    """The cache database's structure is damaged; the message says which file and what to do."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        where = shlex.quote(str(path.parent))
        super().__init__(
            f"the stage cache database {path} is damaged ({reason}); no damaged result was used. Keep its "
            f"intact entries with `capvqa cache check --repair --cache-dir {where}` (the damaged file is "
            f"kept beside it as {path.name}{CORRUPT_SUFFIX}TIMESTAMP), or start empty with `capvqa cache "
            f"clear --yes --cache-dir {where}`. Stop other runs using this cache first; then rerun: every "
            "intact result is reused."
        )


def default_cache_dir() -> Path:
    """``$CAPVQA_CACHE_DIR``, else ``$CAPVQA_HOME/cache``, else ``~/.cache/capvqa/cache``."""
    if env := os.environ.get("CAPVQA_CACHE_DIR"):
        return Path(env)
    from capvqa.resources import capvqa_home

    return capvqa_home() / "cache"


def entry_checksum(key: str, header: bytes, arrays: bytes | None) -> bytes:
    """SHA-256 over the key and both value parts, each length-prefixed (so bytes cannot move between
    them unnoticed, and an entry copied under another key does not verify)."""
    digest = hashlib.sha256()
    for part in (key.encode(), header, arrays or b""):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def entry_problem(key: str, header: object, arrays: object, checksum: object) -> str | None:
    """Why a stored entry must not be served, or ``None`` when it verifies.

    An entry with a checksum must match it byte for byte; one without (written by capvqa before
    checksums) must pass the codec's structural check.
    """
    if not isinstance(header, bytes) or not (arrays is None or isinstance(arrays, bytes)):
        return "stored values are not bytes"
    if checksum is None:
        return encoding_problem(header, arrays)
    if not isinstance(checksum, bytes) or checksum != entry_checksum(key, header, arrays):
        return "checksum mismatch"
    return None


def file_signature(info: os.stat_result) -> str:
    """One version of a file as the image-hash memo recognises it without reading it: device, inode,
    size, mtime and ctime (nanoseconds). :class:`capvqa.engine.runner.ImageHasher` says what this
    trusts."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


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
        connection = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
            _initialise(connection)
        except (OSError, sqlite3.Error) as error:
            if connection is not None:
                connection.close()
            if isinstance(error, sqlite3.Error) and _is_corruption(error):
                raise CacheCorruptError(self.path, str(error)) from None
            raise UserError(
                f"cannot open the stage cache at {self.path}: {error}. Point --cache-dir (or "
                "CAPVQA_CACHE_DIR) at a writable local directory with free space."
            ) from error
        self._connection, self._pid = connection, os.getpid()
        return connection

    def check_readable(self) -> None:
        """Open an existing database now: a file that is not a database, or whose schema pages are
        damaged, raises :class:`CacheCorruptError` here, before a run starts (and touches its run folder),
        rather than at its first lookup. Damage deeper in the file shows when the damaged entries are read.
        A missing database is left to be created by the first write."""
        if self.path.exists():
            self._connect()

    def close(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """SQLite errors as user errors: damage as :class:`CacheCorruptError`, anything else (disk
        full, I/O error, a lock held past the busy timeout) as a message naming the file."""
        try:
            yield
        except sqlite3.Error as error:
            if _is_corruption(error):
                raise CacheCorruptError(self.path, str(error)) from None
            raise UserError(
                f"{action} the stage cache {self.path} failed: {error}. Finished batches are kept; make sure "
                "the directory is writable and has free space, or choose another --cache-dir, then rerun "
                "to resume."
            ) from error

    @contextmanager
    def _transaction(self, connection: sqlite3.Connection, action: str) -> Iterator[None]:
        with self._guard(action):
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    try:
                        connection.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original error says more
                raise

    @contextmanager
    def write_transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locked) transaction on the database, committed on success and rolled
        back on any error; SQLite errors become user errors naming the file (``action`` says what was
        being done, e.g. "merging into")."""
        connection = self._connect()
        with self._transaction(connection, action):
            yield connection

    # -- entries --------------------------------------------------------------------------------
    def existing_keys(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` that has an intact committed entry.

        Each entry found is verified (its checksum); a damaged one is deleted with a warning and left out,
        so the caller treats it as a miss and recomputes it.
        """
        return set(self._read_verified(keys, keep_values=False))

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[bytes, bytes | None]]:
        """Raw (header, arrays) for every key that has an intact entry; damaged entries are deleted
        with a warning and left out, as in :meth:`existing_keys`."""
        return self._read_verified(keys, keep_values=True)  # type: ignore[return-value]

    def _read_verified(
        self, keys: Sequence[str], *, keep_values: bool
    ) -> dict[str, tuple[bytes, bytes | None] | None]:
        found: dict[str, tuple[bytes, bytes | None] | None] = {}
        damaged: list[DamagedEntry] = []
        connection = self._connect()
        with self._guard("reading"):
            for chunk in _chunks(list(keys), _MAX_SQL_VARIABLES):
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT key, stage, header, arrays, checksum FROM entries WHERE key IN ({marks})", chunk
                )
                for key, stage, header, arrays, checksum in rows:
                    problem = entry_problem(key, header, arrays, checksum)
                    if problem is not None:
                        damaged.append(DamagedEntry(key, stage, problem))
                    else:
                        found[key] = (header, arrays) if keep_values else None
        if damaged:
            self._drop_damaged(damaged)
        return found

    def _drop_damaged(self, damaged: list[DamagedEntry]) -> None:
        """Delete entries found damaged (if they still are: another process may have done it first)."""
        shown = "; ".join(f"{d.stage} {d.key} ({d.reason})" for d in damaged[:3])
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        log.warning(
            "stage cache %s: removed %d damaged entr%s (never used; a miss, so recomputed): %s%s. "
            "`capvqa cache check` verifies the whole file.",
            self.path, len(damaged), "y" if len(damaged) == 1 else "ies", shown, more,
        )
        connection = self._connect()
        with self._transaction(connection, "removing damaged entries from"):
            for chunk in _chunks([d.key for d in damaged], _MAX_SQL_VARIABLES):
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT rowid, key, header, arrays, checksum FROM entries WHERE key IN ({marks})", chunk
                ).fetchall()
                gone = [(rowid,) for rowid, key, *stored in rows if entry_problem(key, *stored) is not None]
                connection.executemany("DELETE FROM entries WHERE rowid = ?", gone)

    def put_many(self, stage: str, entries: Iterable[tuple[str, bytes, bytes]]) -> int:
        """Commit a batch of entries in one transaction; existing keys are kept (results are pure)."""
        now = time.time()
        rows = [
            (key, stage, header, blob or None, len(header) + len(blob or b""), now, entry_checksum(key, header, blob))
            for key, header, blob in entries
        ]
        if not rows:
            return 0
        connection = self._connect()
        with self._transaction(connection, "writing to"):
            connection.executemany(
                "INSERT OR IGNORE INTO entries(key, stage, header, arrays, nbytes, created, checksum) "
                "VALUES (?,?,?,?,?,?,?)",
                rows,
            )
        return len(rows)

    # -- image hashes (memoised so reruns do not re-read every image) ----------------------------
    def lookup_image_hash(self, path: str, info: os.stat_result) -> str | None:
        """The memoised content hash of ``path`` if the file still has the identity it had when hashed
        (:func:`file_signature`), else ``None``."""
        connection = self._connect()
        with self._guard("reading"):
            row = connection.execute("SELECT sha256, signature FROM image_hashes WHERE path = ?", (path,)).fetchone()
        if row is None or row[1] != file_signature(info):
            return None
        return row[0]

    def remember_image_hash(self, path: str, info: os.stat_result, sha256: str) -> None:
        connection = self._connect()
        try:
            connection.execute(
                "INSERT OR REPLACE INTO image_hashes(path, size, mtime_ns, sha256, signature) VALUES (?,?,?,?,?)",
                (path, info.st_size, info.st_mtime_ns, sha256, file_signature(info)),
            )
        except sqlite3.Error as error:
            if _is_corruption(error):
                raise CacheCorruptError(self.path, str(error)) from None
            # a memo only: failing to remember costs a re-hash next time, nothing more

    # -- maintenance ----------------------------------------------------------------------------
    def usage(self) -> list[StageUsage]:
        if not self.path.exists():
            return []
        connection = self._connect()
        with self._guard("reading"):
            rows = connection.execute(
                "SELECT stage, COUNT(*), COALESCE(SUM(nbytes), 0) FROM entries GROUP BY stage ORDER BY stage"
            ).fetchall()
        return [StageUsage(stage, count, nbytes) for stage, count, nbytes in rows]

    def file_size(self) -> int:
        """Bytes on disk of the database and its write-ahead log (not of damaged copies moved aside)."""
        names = [DB_FILENAME] + [DB_FILENAME + suffix for suffix in _COMPANIONS]
        return sum(p.stat().st_size for p in (self.directory / n for n in names) if p.is_file())

    def damaged_copies(self) -> list[Path]:
        """Damaged databases that ``cache check --repair`` moved aside in this directory."""
        return sorted(
            p for p in self.directory.glob(DB_FILENAME + CORRUPT_SUFFIX + "*")
            if p.is_file() and not p.name.endswith(_COMPANIONS)
        )

    def clear(self, stage: str | None = None) -> int:
        """Delete all entries, or those of one stage; returns how many were removed.

        On a database too damaged to delete from, :class:`CacheCorruptError` is raised; then
        :meth:`delete_database` removes the whole file.
        """
        if not self.path.exists():
            return 0
        connection = self._connect()
        with self._guard("clearing"):
            if stage is None:
                removed = connection.execute("DELETE FROM entries").rowcount
                connection.execute("DELETE FROM image_hashes")
            else:
                removed = connection.execute("DELETE FROM entries WHERE stage = ?", (stage,)).rowcount
            connection.execute("VACUUM")
        return removed

    def delete_database(self) -> list[Path]:
        """Delete the database file and its write-ahead log: the way to clear a file too damaged to
        open. No other process may be using the cache. Returns the files deleted."""
        self.close()
        deleted = []
        for path in [self.path] + [_companion(self.path, suffix) for suffix in _COMPANIONS]:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as error:
                raise UserError(f"cannot delete {path}: {error}") from error
            deleted.append(path)
        return deleted

    def check(self, repair: bool = False) -> CheckReport:
        """Verify the whole database: SQLite's ``PRAGMA integrity_check`` and every entry's checksum.

        With ``repair``, when the file's structure is sound, damaged entries are deleted and entries
        without a checksum that pass the structural check get one. When it is not, every entry that can
        still be read and verifies is copied into a fresh database that replaces the file, and the
        damaged file is kept beside it as ``<name>.corrupt-<timestamp>`` (the image-hash memo is not
        copied: images are hashed again). No other process may use the cache during that rebuild.
        """
        report = CheckReport(path=self.path)
        if not self.path.exists():
            report.exists = False
            return report
        connection: sqlite3.Connection | None
        try:
            connection = self._connect()
            with self._guard("checking"):
                findings = [row[0] for row in connection.execute("PRAGMA integrity_check(100)")]
            if findings != ["ok"]:
                report.structure = findings
        except CacheCorruptError as error:
            report.structure = [error.reason]
            # still open when only the integrity check failed: what can be read is counted below
            connection = self._connection if self._pid == os.getpid() else None
        if report.structure and repair:
            self._rebuild(connection, report)
            return report
        if connection is None:
            return report
        with self._guard("checking"):
            for rows in _readable_rows(connection, report):
                fixes = _verify_rows(rows, report)
                if repair and not report.structure and (fixes[0] or fixes[1]):
                    self._apply_fixes(connection, *fixes, report)
        return report

    def _apply_fixes(
        self,
        connection: sqlite3.Connection,
        damaged: list[tuple[int, str, object]],
        unsealed: list[tuple[int, str, bytes, bytes | None]],
        report: CheckReport,
    ) -> None:
        with self._transaction(connection, "repairing"):
            for rowid, key, checksum in damaged:  # gone either way when another process removed it first
                connection.execute(
                    "DELETE FROM entries WHERE rowid = ? AND key = ? AND checksum IS ?", (rowid, key, checksum)
                )
                report.removed += 1
            for rowid, key, header, arrays in unsealed:
                report.sealed += connection.execute(
                    "UPDATE entries SET checksum = ? WHERE rowid = ? AND key = ? AND checksum IS NULL",
                    (entry_checksum(key, header, arrays), rowid, key),
                ).rowcount

    def _rebuild(self, source: sqlite3.Connection | None, report: CheckReport) -> None:
        """Copy every readable, verified entry into a fresh file, then swap it in (the damaged one is
        moved aside with its write-ahead log)."""
        fresh = self.path.with_name(f"{DB_FILENAME}.rebuild-{os.getpid()}")
        try:
            self._copy_intact_entries(source, fresh, report)
        except (OSError, sqlite3.Error) as error:
            _remove_with_companions(fresh)  # a half-built copy is of no use, and would be mistaken for one
            raise UserError(
                f"repairing the stage cache {self.path} failed while writing {fresh}: {error}. Nothing was "
                "changed; make sure the directory is writable and has free space (about the size of the "
                "cache), stop other runs using it, and retry."
            ) from None
        report.removed = report.damaged
        report.sealed = report.unsealed
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{DB_FILENAME}{CORRUPT_SUFFIX}{stamp}")
        attempt = 1
        while aside.exists():  # two repairs within one second keep both damaged copies
            attempt += 1
            aside = self.path.with_name(f"{DB_FILENAME}{CORRUPT_SUFFIX}{stamp}-{attempt}")
        try:
            _move_with_companions(self.path, aside)
            _move_with_companions(fresh, self.path)
        except OSError as error:
            raise UserError(
                f"repairing the stage cache {self.path}: the rebuilt copy {fresh} could not be swapped in "
                f"({error}); the damaged file is kept as {aside if aside.exists() else self.path}. Move "
                f"{fresh} to {self.path} by hand, or run `capvqa cache clear`."
            ) from None
        report.moved_to = aside

    def _copy_intact_entries(self, source: sqlite3.Connection | None, fresh: Path, report: CheckReport) -> None:
        """Write every readable, verified entry of the damaged file into the new file ``fresh``."""
        _remove_with_companions(fresh)
        if source is None:
            source = _open_raw(self.path)
        target = sqlite3.connect(fresh, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            _initialise(target)
            target.execute("BEGIN")
            for rows in (_readable_rows(source, report) if source is not None else ()):
                damaged, _unsealed = _verify_rows(rows, report)
                bad = {rowid for rowid, _key, _checksum in damaged}
                target.executemany(
                    "INSERT OR IGNORE INTO entries(key, stage, header, arrays, nbytes, created, checksum) "
                    "VALUES (?,?,?,?,?,?,?)",
                    [
                        (key, stage, header, arrays, len(header) + len(arrays or b""), created,
                         checksum if checksum is not None else entry_checksum(key, header, arrays))
                        for rowid, key, stage, header, arrays, checksum, created in rows
                        if rowid not in bad
                    ],
                )
            target.execute("COMMIT")
            target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            target.close()
            if source is not None and source is not self._connection:
                source.close()
            self.close()


def _initialise(connection: sqlite3.Connection) -> None:
    """Switch to WAL, create the schema and migrate an older one, retrying while another process does
    the same.

    SQLite does not call the busy handler for every lock these statements take (the journal-mode switch
    on a brand-new file in particular), so two runs opening a fresh cache at the same instant can get
    "database is locked" at once instead of waiting. Every statement is idempotent, so retrying with a
    jittered back-off until the busy timeout is safe.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_SECONDS
    delay = 0.01
    while True:
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            if connection.execute("PRAGMA user_version").fetchone()[0] < STORE_SCHEMA_VERSION:
                connection.executescript(_SCHEMA)
                _migrate(connection)
            return
        except sqlite3.OperationalError as error:
            if not _is_lock_contention(error) or time.monotonic() > deadline:
                raise
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            time.sleep(delay * (1.0 + random.random()))
            delay = min(delay * 2, 0.5)


def _migrate(connection: sqlite3.Connection) -> None:
    """Add the columns a store-schema-1 database lacks (entries keep a NULL checksum), in one
    transaction so concurrent openers do not both add them."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        for table, column, kind in _ADDED_COLUMNS:
            columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        connection.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _open_raw(path: Path) -> sqlite3.Connection | None:
    """A connection that neither creates nor migrates anything, to read what is left of a damaged file."""
    try:
        return sqlite3.connect(path, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
    except sqlite3.Error:
        return None


_Row = tuple  # (rowid, key, stage, header, arrays, checksum, created)


def _readable_rows(connection: sqlite3.Connection, report: CheckReport) -> Iterator[list[_Row]]:
    """Every row of ``entries`` SQLite can still read, in rowid order, in chunks.

    On a sound file this is a plain scan. Where a damaged page makes a range unreadable, the rowids up to
    the table's largest are probed one at a time (each unreadable one counts in ``report.unreadable``)
    until a range reads again; when even the largest rowid cannot be found, the rest counts as one
    unreadable region.
    """
    try:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(entries)")}
    except sqlite3.DatabaseError:
        report.unreadable += 1
        return
    if not columns:
        return
    checksum = "checksum" if "checksum" in columns else "NULL"
    select = f"SELECT rowid, key, stage, header, arrays, {checksum}, created FROM entries"
    try:
        last = connection.execute("SELECT MAX(rowid) FROM entries").fetchone()[0]
    except sqlite3.DatabaseError:
        last = None
    after = 0  # capvqa never sets rowids: SQLite numbers them from 1
    while True:
        try:
            rows = connection.execute(f"{select} WHERE rowid > ? ORDER BY rowid LIMIT {_SCAN_ROWS}", (after,)).fetchall()
        except sqlite3.DatabaseError as error:
            if not _is_corruption(error):
                raise
            if last is None or after >= last:
                report.unreadable += 1
                return
            after += 1
            try:
                row = connection.execute(f"{select} WHERE rowid = ?", (after,)).fetchone()
            except sqlite3.DatabaseError:
                report.unreadable += 1
                continue
            if row is not None:
                yield [row]
            continue
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def _verify_rows(
    rows: list[_Row], report: CheckReport
) -> tuple[list[tuple[int, str, object]], list[tuple[int, str, bytes, bytes | None]]]:
    """Count ``rows`` into ``report``; returns the damaged rows (rowid, key, stored checksum) and the
    unsealed ones (rowid, key, header, arrays)."""
    damaged, unsealed = [], []
    for rowid, key, stage, header, arrays, checksum, _created in rows:
        problem = entry_problem(key, header, arrays, checksum)
        if problem is not None:
            report.damaged += 1
            if len(report.damaged_examples) < _REPORTED_DAMAGE:
                report.damaged_examples.append(DamagedEntry(str(key), str(stage), problem))
            damaged.append((rowid, key, checksum))
        elif checksum is None:
            report.unsealed += 1
            unsealed.append((rowid, key, header, arrays))
        else:
            report.intact += 1
    return damaged, unsealed


def _companion(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_with_companions(path: Path) -> None:
    for victim in [path] + [_companion(path, suffix) for suffix in _COMPANIONS]:
        victim.unlink(missing_ok=True)


def _move_with_companions(source: Path, target: Path) -> None:
    """Rename a database and its write-ahead log together (the log belongs to the file by name); the
    shared-memory index is rebuilt by SQLite, so it is deleted."""
    os.replace(source, target)
    wal = _companion(source, "-wal")
    if wal.exists():
        os.replace(wal, _companion(target, "-wal"))
    _companion(source, "-shm").unlink(missing_ok=True)


def _is_corruption(error: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (by code where Python exposes it, 3.11+, else by message)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    message = str(error).lower()
    return "malformed" in message or "not a database" in message


def _is_lock_contention(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _chunks(values: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
