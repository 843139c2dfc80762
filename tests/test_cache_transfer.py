"""`capvqa cache export` / `merge`: results move between machines as a union of content-keyed entries,
verified on both sides, and a key with different bytes is reported, never overwritten."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from capvqa.engine.cache_transfer import export_cache, merge_caches, read_export_info
from capvqa.engine.store import DB_FILENAME, CacheStore
from capvqa.errors import UserError


def capvqa_main(monkeypatch, capsys, *args):
    """Run the console entry point in this process: (exit status, stdout, stderr)."""
    from capvqa.cli import main

    monkeypatch.setattr(sys, "argv", ["capvqa", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def _entry(i: int, variant: bytes = b"") -> tuple[str, bytes, bytes]:
    return f"k{i}", b'{"answer":"a%d%s"}' % (i, variant), bytes([i % 256]) * 64 + variant


def _cache(directory: Path, stages: dict[str, range]) -> CacheStore:
    store = CacheStore(directory)
    for stage, indices in stages.items():
        store.put_many(stage, [_entry(i) for i in indices])
    return store


def _all_entries(store: CacheStore) -> dict[str, tuple[str, bytes, bytes | None]]:
    connection = sqlite3.connect(store.path)
    try:
        return {key: (stage, header, arrays) for key, stage, header, arrays in
                connection.execute("SELECT key, stage, header, arrays FROM entries")}
    finally:
        connection.close()


def test_export_then_merge_into_an_empty_cache_copies_every_entry_byte_for_byte(tmp_path):
    source = _cache(tmp_path / "a", {"matching": range(0, 300), "captioning": range(300, 340)})
    report = export_cache(source, tmp_path / "a.capvqa-export")
    assert (report.entries, report.damaged, report.per_stage) == (340, 0, {"matching": 300, "captioning": 40})
    info = read_export_info(tmp_path / "a.capvqa-export")
    assert info["format"] == "capvqa-cache-export" and info["entries"] == "340"

    target = CacheStore(tmp_path / "b")
    merged = merge_caches(target, [tmp_path / "a.capvqa-export"])
    assert (merged.added, merged.identical, merged.conflicts, merged.damaged) == (340, 0, 0, 0)
    assert _all_entries(target) == _all_entries(source)
    assert not target.check().problems_found  # checksums came along and verify
    keys = [f"k{i}" for i in range(340)]
    assert target.get_many(keys) == source.get_many(keys)

    again = merge_caches(target, [tmp_path / "a.capvqa-export"])
    assert (again.added, again.identical) == (0, 340)


def test_paths_with_uri_characters(tmp_path):
    """'#', '?' and '%' in a cache's path are file-name characters, not URI syntax."""
    source = _cache(tmp_path / "run #1?%20", {"matching": range(0, 3)})
    export_cache(source, tmp_path / "out #2.db")
    report = merge_caches(CacheStore(tmp_path / "b"), [tmp_path / "run #1?%20", tmp_path / "out #2.db"])
    assert (report.added, report.identical) == (3, 3)


def test_export_of_one_stage(tmp_path):
    source = _cache(tmp_path / "a", {"matching": range(0, 5), "captioning": range(5, 8)})
    report = export_cache(source, tmp_path / "cap.db", stage="captioning")
    assert report.per_stage == {"captioning": 3}
    target = CacheStore(tmp_path / "b")
    merge_caches(target, [tmp_path / "cap.db"])
    assert {stage for stage, *_ in _all_entries(target).values()} == {"captioning"}
    with pytest.raises(UserError, match="no cached stage 'reader'.*captioning"):
        export_cache(source, tmp_path / "none.db", stage="reader")


def test_merge_is_a_union_of_several_caches_and_cache_directories(tmp_path):
    """Two nodes' caches (overlapping in the items both finished) merged into a third, by directory and
    by database file."""
    _cache(tmp_path / "node0", {"matching": range(0, 60)})
    node1 = _cache(tmp_path / "node1", {"matching": range(40, 100)})
    target = _cache(tmp_path / "main", {"matching": range(90, 110)})
    report = merge_caches(target, [tmp_path / "node0", node1.path])
    assert (report.added, report.identical, report.conflicts) == (90, 30, 0)
    assert set(_all_entries(target)) == {f"k{i}" for i in range(110)}


def test_conflicting_bytes_are_reported_and_the_target_is_kept(tmp_path):
    source = CacheStore(tmp_path / "a")
    source.put_many("reader", [_entry(i, b"-other-machine" if i in (3, 7) else b"") for i in range(10)])
    target = _cache(tmp_path / "b", {"reader": range(0, 10)})
    before = _all_entries(target)
    report = merge_caches(target, [tmp_path / "a"])
    assert (report.added, report.identical, report.conflicts) == (0, 8, 2)
    assert {(c.stage, c.key) for c in report.conflict_examples} == {("reader", "k3"), ("reader", "k7")}
    assert _all_entries(target) == before


def test_damaged_entries_are_never_exported_nor_merged(tmp_path):
    source = _cache(tmp_path / "a", {"matching": range(0, 10)})
    source.close()
    connection = sqlite3.connect(source.path)
    connection.execute("UPDATE entries SET header = ? WHERE key = 'k4'", (b'{"answer":"tampered"}',))
    connection.commit()
    connection.close()
    exported = export_cache(CacheStore(tmp_path / "a"), tmp_path / "a.db")
    assert (exported.entries, exported.damaged) == (9, 1)

    # damage in transit: an entry of the export file itself edited after export
    connection = sqlite3.connect(tmp_path / "a.db")
    connection.execute("UPDATE entries SET arrays = ? WHERE key = 'k2'", (b"\x00" * 64,))
    connection.commit()
    connection.close()
    target = CacheStore(tmp_path / "b")
    report = merge_caches(target, [tmp_path / "a.db"])
    assert (report.added, report.damaged) == (8, 1)
    assert "k2" not in _all_entries(target) and "k4" not in _all_entries(target)


def test_a_damaged_target_entry_is_replaced_by_an_intact_copy(tmp_path):
    source = _cache(tmp_path / "a", {"matching": range(0, 3)})
    target = _cache(tmp_path / "b", {"matching": range(0, 3)})
    target.close()
    connection = sqlite3.connect(target.path)
    connection.execute("UPDATE entries SET header = ? WHERE key = 'k1'", (b'{"answer":"tampered"}',))
    connection.commit()
    connection.close()
    report = merge_caches(CacheStore(tmp_path / "b"), [source.path])
    assert (report.replaced_damaged, report.added, report.identical) == (1, 1, 2)
    assert not CacheStore(tmp_path / "b").check().problems_found


def test_bad_inputs_are_clear_errors(tmp_path):
    store = _cache(tmp_path / "a", {"matching": range(3)})
    (tmp_path / "exists.db").write_bytes(b"")
    with pytest.raises(UserError, match="already exists"):
        export_cache(store, tmp_path / "exists.db")
    with pytest.raises(UserError, match="nothing to export"):
        export_cache(CacheStore(tmp_path / "empty"), tmp_path / "x.db")
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    with pytest.raises(UserError, match="notes.txt"):
        merge_caches(store, [tmp_path / "notes.txt"])
    with pytest.raises(UserError, match="does not exist"):
        merge_caches(store, [tmp_path / "missing.db"])
    (tmp_path / "nocache").mkdir()
    with pytest.raises(UserError, match="directory without a stage cache"):
        merge_caches(store, [tmp_path / "nocache"])
    with pytest.raises(UserError, match="target cache itself"):
        merge_caches(store, [tmp_path / "a"])
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_export_and_merge(tmp_path, monkeypatch, capsys):
    _cache(tmp_path / "a", {"matching": range(0, 4)})
    status, out, _ = capvqa_main(monkeypatch, capsys, "cache", "export", str(tmp_path / "a.db"),
                                 "--cache-dir", str(tmp_path / "a"))
    assert status in (0, None) and "exported 4 entries" in out and "matching 4" in out

    target = CacheStore(tmp_path / "b")
    target.put_many("matching", [_entry(0, b"-different")])
    status, out, _ = capvqa_main(monkeypatch, capsys, "cache", "merge", str(tmp_path / "a.db"),
                                 "--cache-dir", str(tmp_path / "b"))
    assert status == 1
    assert "added 3 entries" in out and "1 conflicts" in out and "matching k0" in out

    status, _, err = capvqa_main(monkeypatch, capsys, "cache", "export", str(tmp_path / "a.db"),
                                 "--cache-dir", str(tmp_path / "a"))
    assert status == 2 and "already exists" in err


@pytest.mark.slow
def test_a_run_completed_elsewhere_is_reused_after_merge(tmp_path, tiny_zoo):
    """Machine A runs PNP-VQA and exports its cache; machine B merges it and reruns: nothing is
    recomputed and the predictions are equal."""
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.pipeline import Pipeline

    fast = ["captioning.num_captions=3", "captioning.num_patches=4"]
    data = open_dataset("sample", limit=3)
    first = Pipeline.from_yaml("pnp-vqa", fast, models="tiny").run(data, cache_dir=tmp_path / "a", out_dir=tmp_path / "ra")
    export_cache(CacheStore(tmp_path / "a"), tmp_path / "a.db")
    merge_caches(CacheStore(tmp_path / "b"), [tmp_path / "a.db"])
    again = Pipeline.from_yaml("pnp-vqa", fast, models="tiny").run(data, cache_dir=tmp_path / "b", out_dir=tmp_path / "rb")
    assert {s.name: s.computed for s in again.stage_stats} == {"matching": 0, "captioning": 0, "reader": 0}
    assert again.predictions == first.predictions
    assert (tmp_path / "b" / DB_FILENAME).is_file()
