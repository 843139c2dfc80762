"""The SQLite stage cache and the pickle-free record codec."""

import multiprocessing
from dataclasses import dataclass

import numpy as np

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
