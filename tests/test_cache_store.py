"""The SQLite stage cache and the pickle-free record codec."""

import multiprocessing
from dataclasses import dataclass

import numpy as np
import pytest

from capvqa.engine.codec import decode_record, encode_record
from capvqa.engine.keys import item_fingerprint, stage_fingerprint, stage_item_key
from capvqa.engine.store import CacheStore


@dataclass(frozen=True)
class Example:
    text: str
    values: list
    grid: np.ndarray


def test_codec_round_trip_without_pickle():
    record = Example(text="héllo", values=[1, 2.5, None], grid=np.arange(12, dtype=np.float32).reshape(3, 4))
    header, blob = encode_record(record)
    assert b"pickle" not in header and header.startswith(b"{")
    back = decode_record(Example, header, blob)
    assert back.text == record.text and back.values == record.values
    np.testing.assert_array_equal(back.grid, record.grid)
    assert back.grid.dtype == np.float32


def test_put_get_and_usage(tmp_path):
    store = CacheStore(tmp_path)
    assert store.existing_keys(["a"]) == set()
    store.put_many("stage_x", [("a", b"{}", b""), ("b", b'{"k":1}', b"12")])
    assert store.existing_keys(["a", "b", "c"]) == {"a", "b"}
    assert store.get_many(["b"])["b"] == (b'{"k":1}', b"12")
    assert [(u.stage, u.entries) for u in store.usage()] == [("stage_x", 2)]
    assert store.clear("stage_x") == 2 and store.usage() == []


def test_keys_chain_and_isolate_changes():
    item = item_fingerprint("imagehash", "what is it?")
    fp_a = stage_fingerprint("matching", "1", {"block_num": 7}, {"model": "m"})
    fp_a2 = stage_fingerprint("matching", "1", {"block_num": 6}, {"model": "m"})
    key_a, key_a2 = stage_item_key(fp_a, item, {}), stage_item_key(fp_a2, item, {})
    fp_b = stage_fingerprint("captioning", "1", {}, {})
    assert key_a != key_a2
    assert stage_item_key(fp_b, item, {"relevance": key_a}) != stage_item_key(fp_b, item, {"relevance": key_a2})
    assert stage_fingerprint("matching", "2", {"block_num": 7}, {"model": "m"}) != fp_a  # VERSION bump
    assert item_fingerprint("imagehash", "what is it") != item


def _writer(directory: str, worker: int, count: int) -> None:
    store = CacheStore(directory)
    for start in range(0, count, 10):
        # overlapping keys between workers: both try to write every key
        store.put_many("s", [(f"k{i}", f'{{"i":{i}}}'.encode(), b"") for i in range(start, start + 10)])


def test_concurrent_writers_lose_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(tmp_path), w, 200)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    store = CacheStore(tmp_path)
    found = store.get_many([f"k{i}" for i in range(200)])
    assert len(found) == 200
    assert all(found[f"k{i}"][0] == f'{{"i":{i}}}'.encode() for i in range(200))


def _open_fresh_cache_at_once(directory: str, barrier, results) -> None:
    barrier.wait()  # every process opens the brand-new database at the same instant
    try:
        store = CacheStore(directory)
        store.existing_keys(["a"])
        store.put_many("s", [("a", b"{}", b"")])
        results.put("ok")
    except Exception as error:  # reported to the parent, which asserts on it
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.slow
def test_processes_opening_a_fresh_cache_together_all_succeed(tmp_path):
    # Regression: the WAL switch on a new file does not wait on SQLite's busy handler, so a second run
    # started beside the first used to fail with "database is locked".
    context = multiprocessing.get_context("fork")
    for trial in range(30):
        barrier, results = context.Barrier(6), context.Queue()
        workers = [
            context.Process(target=_open_fresh_cache_at_once, args=(str(tmp_path / str(trial)), barrier, results))
            for _ in range(6)
        ]
        for w in workers:
            w.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for w in workers:
            w.join(60)
        assert outcomes == ["ok"] * 6, outcomes


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    import pytest

    from capvqa.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="--cache-dir"):
        CacheStore(blocker / "cache").existing_keys(["a"])


# What capvqa wrote before entries carried checksums (store schema 1, no user_version).
_SCHEMA_1 = """
CREATE TABLE entries (key TEXT PRIMARY KEY, stage TEXT NOT NULL, header BLOB NOT NULL, arrays BLOB,
                      nbytes INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX entries_stage ON entries(stage);
CREATE TABLE image_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                           sha256 TEXT NOT NULL);
"""


def test_schema_1_cache_is_migrated_trusted_after_a_structural_check_and_sealed_by_repair(tmp_path):
    import sqlite3

    from capvqa.engine.store import DB_FILENAME, STORE_SCHEMA_VERSION

    header, blob = encode_record(Example(text="old", values=[1], grid=np.ones((2, 2), dtype=np.float32)))
    database = tmp_path / DB_FILENAME
    old = sqlite3.connect(database)
    old.executescript(_SCHEMA_1)
    old.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?)", [
        ("good", "s", header, blob, len(header) + len(blob), 0.0),
        ("short", "s", header, blob[:-1], len(header) + len(blob) - 1, 0.0),  # an array cut short
        ("not-json", "s", b"{garbage", None, 8, 0.0),
    ])
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    info = image.stat()
    old.execute("INSERT INTO image_hashes VALUES (?,?,?,?)", (str(image), info.st_size, info.st_mtime_ns, "0" * 64))
    old.commit()
    old.close()

    store = CacheStore(tmp_path)
    assert store.existing_keys(["good", "short", "not-json"]) == {"good"}  # the broken ones are dropped
    back = decode_record(Example, *store.get_many(["good"])["good"])
    assert back.text == "old" and back.grid.shape == (2, 2)
    assert store.lookup_image_hash(str(image), info) is None  # a size+mtime memo is not trusted any more
    store.close()
    migrated = sqlite3.connect(database)
    assert migrated.execute("PRAGMA user_version").fetchone()[0] == STORE_SCHEMA_VERSION
    # an older capvqa sharing the cache can still write its rows (without a checksum)
    migrated.execute("INSERT INTO entries(key, stage, header, arrays, nbytes, created) VALUES ('older', 's', ?, ?, 1, 0)",
                     (header, blob))
    migrated.commit()
    migrated.close()

    store = CacheStore(tmp_path)
    report = store.check(repair=True)
    assert (report.unsealed, report.sealed, report.damaged, report.structure) == (2, 2, 0, [])
    again = store.check()
    assert again.intact == 2 and again.unsealed == 0 and not again.problems_found
    store.close()
    edited = sqlite3.connect(database)  # now sealed, a changed byte is caught
    edited.execute("UPDATE entries SET arrays = ? WHERE key = 'good'", (blob[:-1] + b"\x01",))
    edited.commit()
    edited.close()
    assert CacheStore(tmp_path).existing_keys(["good", "older"]) == {"older"}
