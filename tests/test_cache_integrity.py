"""A damaged stage cache is detected, named, never served, and repairable; the image-hash memo notices a
rewritten image even when its size and mtime are restored."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.runner import ImageHasher
from capvqa.engine.store import DB_FILENAME, CacheCorruptError, CacheStore
from capvqa.errors import UserError

ENTRIES = 300


def _fill(directory: Path, count: int = ENTRIES) -> Path:
    """A cache of ``count`` entries of about 1 KiB, each with a unique marker in its header and arrays,
    checkpointed so every byte is in the main file (not in the write-ahead log)."""
    store = CacheStore(directory)
    store.put_many("stage_x", [
        (f"k{i}", b'{"caption":"marker-%04d"}' % i, b"ARRAY-%04d-" % i + bytes(range(256)) * 4)
        for i in range(count)
    ])
    store.close()
    database = directory / DB_FILENAME
    _checkpoint(database)
    return database


def _checkpoint(database: Path) -> None:
    connection = sqlite3.connect(database)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def _sql(database: Path, statement: str, *args) -> list[tuple]:
    connection = sqlite3.connect(database)
    rows = connection.execute(statement, args).fetchall()
    connection.commit()
    connection.close()
    return rows


def _flip_byte_at(database: Path, marker: bytes, offset: int = 0) -> None:
    """Flip one bit of the file at ``marker`` (which must occur exactly once), as a bad disk would."""
    data = bytearray(database.read_bytes())
    assert data.count(marker) == 1, marker
    data[data.index(marker) + offset] ^= 0x01
    database.write_bytes(bytes(data))


def _break_page_holding(database: Path, marker: bytes) -> None:
    """Overwrite the b-tree page-type byte of the page holding ``marker``: SQLite then reports that page as
    malformed, while every other page still reads."""
    page_size = _sql(database, "PRAGMA page_size")[0][0]
    data = bytearray(database.read_bytes())
    assert data.count(marker) == 1, marker
    page = data.index(marker) // page_size
    assert page > 0 and data[page * page_size] == 0x0D  # a table leaf page
    data[page * page_size] = 0xFF
    database.write_bytes(bytes(data))


def _garbage(database: Path) -> None:
    database.parent.mkdir(parents=True, exist_ok=True)
    database.write_bytes(b"this is not a database\n" * 300)


def _keys(count: int = ENTRIES) -> list[str]:
    return [f"k{i}" for i in range(count)]


# -- the store --------------------------------------------------------------------------------------


def test_garbage_file_is_a_clear_error_naming_it(tmp_path):
    database = tmp_path / DB_FILENAME
    _garbage(database)
    store = CacheStore(tmp_path)
    for call in (lambda: store.existing_keys(["a"]), lambda: store.get_many(["a"]), store.usage,
                 lambda: store.put_many("s", [("a", b"{}", b"")])):
        with pytest.raises(CacheCorruptError) as caught:
            call()
        message = str(caught.value)
        assert str(database) in message and "not a database" in message
        assert "capvqa cache check --repair" in message and "capvqa cache clear" in message
    assert isinstance(caught.value, UserError)  # printed without a traceback by the CLI
    assert database.read_bytes().startswith(b"this is not a database")  # nothing was swapped under a run


def test_entry_edited_in_place_is_never_served_and_is_recomputed(tmp_path, caplog):
    database = _fill(tmp_path)
    _sql(database, "UPDATE entries SET header = ? WHERE key = 'k5'", b'{"caption":"tampered"}')
    _sql(database, "UPDATE entries SET arrays = ? WHERE key = 'k6'", b"ARRAY-0006-tampered")
    store = CacheStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="capvqa.engine.store"):
        present = store.existing_keys(_keys())
    assert present == set(_keys()) - {"k5", "k6"}
    assert str(database) in caplog.text and "k5" in caplog.text and "checksum mismatch" in caplog.text
    assert _sql(database, "SELECT key FROM entries WHERE key IN ('k5', 'k6')") == []  # removed: misses now
    store.put_many("stage_x", [("k5", b'{"caption":"marker-0005"}', b"recomputed")])  # the runner recomputes
    assert store.get_many(["k5"]) == {"k5": (b'{"caption":"marker-0005"}', b"recomputed")}


def test_get_many_never_returns_a_damaged_entry(tmp_path):
    database = _fill(tmp_path, 10)
    _sql(database, "UPDATE entries SET header = ? WHERE key = 'k3'", b'{"caption":"tampered"}')
    found = CacheStore(tmp_path).get_many(_keys(10))
    assert sorted(found) == sorted(set(_keys(10)) - {"k3"})
    assert found["k4"] == (b'{"caption":"marker-0004"}', b"ARRAY-0004-" + bytes(range(256)) * 4)


def test_entry_copied_under_another_key_does_not_verify(tmp_path):
    database = _fill(tmp_path, 10)
    _sql(database, "UPDATE entries SET header = (SELECT header FROM entries WHERE key = 'k2'), "
                   "arrays = (SELECT arrays FROM entries WHERE key = 'k2'), "
                   "checksum = (SELECT checksum FROM entries WHERE key = 'k2') WHERE key = 'k1'")
    assert CacheStore(tmp_path).existing_keys(["k1", "k2"]) == {"k2"}


def test_raw_byte_flip_inside_a_value_is_caught_though_sqlite_sees_nothing(tmp_path):
    database = _fill(tmp_path)
    _flip_byte_at(database, b"ARRAY-0100-", offset=20)
    assert _sql(database, "PRAGMA integrity_check") == [("ok",)]  # SQLite has no checksum of its own
    store = CacheStore(tmp_path)
    assert store.existing_keys(_keys()) == set(_keys()) - {"k100"}
    report = store.check()
    assert not report.problems_found and report.intact == ENTRIES - 1  # the damaged entry is already gone


def test_damaged_page_stops_with_a_clear_error_and_repair_keeps_every_intact_entry(tmp_path):
    database = _fill(tmp_path)
    _flip_byte_at(database, b"marker-0010")  # a value (caught by its checksum)
    _break_page_holding(database, b"marker-0150")  # the page holding k150 and its neighbours
    damaged = database.read_bytes()
    store = CacheStore(tmp_path)
    with pytest.raises(CacheCorruptError, match="malformed"):
        store.existing_keys(_keys())

    found = store.check()
    assert found.structure and found.damaged == 1 and found.damaged_examples[0].key == "k10"
    assert found.unreadable >= 1 and found.intact == ENTRIES - 1 - found.unreadable
    assert found.moved_to is None and database.read_bytes() == damaged  # checking changes nothing

    repaired = CacheStore(tmp_path).check(repair=True)
    assert repaired.moved_to is not None and repaired.moved_to.read_bytes() == damaged
    assert repaired.moved_to.name.startswith(DB_FILENAME + ".corrupt-")
    store = CacheStore(tmp_path)
    kept = store.existing_keys(_keys())
    assert len(kept) == repaired.intact and "k10" not in kept and "k150" not in kept
    assert "k0" in kept and f"k{ENTRIES - 1}" in kept
    after = store.check()
    assert not after.problems_found and after.intact == len(kept)
    assert store.damaged_copies() == [repaired.moved_to]


def test_repair_of_a_sound_file_removes_only_the_damaged_entries(tmp_path):
    database = _fill(tmp_path, 20)
    _sql(database, "UPDATE entries SET header = ? WHERE key = 'k7'", b'{"caption":"tampered"}')
    store = CacheStore(tmp_path)
    report = store.check(repair=True)
    assert (report.damaged, report.removed, report.intact, report.moved_to) == (1, 1, 19, None)
    assert report.repaired and store.existing_keys(_keys(20)) == set(_keys(20)) - {"k7"}


def test_repair_of_a_garbage_file_starts_an_empty_database_and_keeps_the_old_one(tmp_path):
    database = tmp_path / DB_FILENAME
    _garbage(database)
    report = CacheStore(tmp_path).check(repair=True)
    assert report.structure == ["file is not a database"] and report.repaired
    assert report.moved_to.read_bytes().startswith(b"this is not a database")
    store = CacheStore(tmp_path)
    assert store.usage() == [] and store.put_many("s", [("a", b"{}", b"")]) == 1



def test_a_repair_that_cannot_write_changes_nothing_and_leaves_no_half_built_file(tmp_path, monkeypatch):
    import sqlite3

    from capvqa.engine import store as store_module
    from capvqa.errors import UserError

    database = tmp_path / DB_FILENAME
    _garbage(database)
    before = database.read_bytes()

    initialise = store_module._initialise

    def disk_full_for_the_new_file(connection):
        if "rebuild" in connection.execute("PRAGMA database_list").fetchone()[2]:
            raise sqlite3.OperationalError("database or disk is full")
        initialise(connection)

    monkeypatch.setattr(store_module, "_initialise", disk_full_for_the_new_file)
    with pytest.raises(UserError, match="repairing the stage cache .* failed .* Nothing was changed"):
        CacheStore(tmp_path).check(repair=True)
    assert database.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_FILENAME]


# -- the command line -------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "capvqa", "cache", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "Traceback" not in done.stdout + done.stderr
    return done


DAMAGE = {
    "garbage": lambda database: _garbage(database),
    "edited with sqlite": lambda database: _sql(database, "UPDATE entries SET header = ? WHERE key = 'k5'",
                                                b'{"caption":"tampered"}'),
    "flipped byte": lambda database: _flip_byte_at(database, b"ARRAY-0005-", offset=30),
    "broken page": lambda database: _break_page_holding(database, b"marker-0150"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_cache_commands_work_on_a_damaged_database(tmp_path, damage):
    database = _fill(tmp_path)
    DAMAGE[damage](database)
    directory = ["--cache-dir", str(tmp_path)]
    structural = damage in ("garbage", "broken page")

    info = _cli("info", *directory)
    if structural:
        assert info.returncode == 1 and "damaged" in info.stderr and str(database) in info.stderr.replace("\n", "")
    else:  # info only counts; checksums are verified on read and by `check`
        assert info.returncode == 0 and f"{ENTRIES} entries" in info.stdout

    check = _cli("check", *directory)
    assert check.returncode == 1 and "--repair" in check.stdout
    assert ("DAMAGED" in check.stdout) == structural
    if not structural:
        assert "damaged entries: 1" in check.stdout and "stage_x k5: checksum mismatch" in check.stdout

    repair = _cli("check", "--repair", *directory)
    assert repair.returncode == 0 and "repaired" in repair.stdout
    again = _cli("check", *directory)
    assert again.returncode == 0 and "no problems found" in again.stdout
    kept = CacheStore(tmp_path).existing_keys(_keys())
    if damage == "garbage":
        assert kept == set()
    else:  # a broken page loses the entries beside k150 too
        assert ("k150" if damage == "broken page" else "k5") not in kept and len(kept) >= ENTRIES - 20
    assert (".corrupt-" in repair.stdout) == structural

    cleared = _cli("clear", "--yes", *directory)
    assert cleared.returncode == 0 and f"removed {len(kept)} entries" in cleared.stdout
    assert CacheStore(tmp_path).usage() == []


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "broken page"])
def test_clear_deletes_a_database_too_damaged_to_clear(tmp_path, damage):
    database = _fill(tmp_path)
    DAMAGE[damage](database)
    one_stage = _cli("clear", "--stage", "stage_x", "--yes", "--cache-dir", str(tmp_path))
    assert one_stage.returncode == 2 and "cannot be cleared" in one_stage.stderr and database.exists()
    cleared = _cli("clear", "--yes", "--cache-dir", str(tmp_path))
    assert cleared.returncode == 0 and "damaged" in cleared.stdout and not database.exists()
    info = _cli("info", "--cache-dir", str(tmp_path))
    assert info.returncode == 0 and "0 entries" in info.stdout


def test_check_of_a_missing_cache(tmp_path):
    done = _cli("check", "--cache-dir", str(tmp_path / "none"))
    assert done.returncode == 0 and "nothing to check" in done.stdout
    assert not (tmp_path / "none").exists()


# -- a pipeline run over a damaged cache -------------------------------------------------------------

FAST = ["captioning.num_captions=3", "captioning.num_patches=4"]


@pytest.mark.slow
def test_run_recomputes_damaged_entries_and_gives_the_same_predictions(tmp_path, tiny_zoo):
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.pipeline import Pipeline

    data = open_dataset("sample", limit=4)
    cache = tmp_path / "cache"
    first = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(data, cache_dir=cache, out_dir=tmp_path / "a")
    database = cache / DB_FILENAME
    _checkpoint(database)
    # one entry per stage, each damaged differently: a raw bit flip in the relevance map's bytes, an edited
    # caption list, an edited answer
    (matching_arrays,) = _sql(database, "SELECT arrays FROM entries WHERE stage = 'gradcam_matching' "
                                        "ORDER BY rowid LIMIT 1")[0]
    file_bytes = database.read_bytes()
    unique = next(matching_arrays[start : start + 32] for start in range(0, len(matching_arrays) - 32, 8)
                  if file_bytes.count(matching_arrays[start : start + 32]) == 1)
    _flip_byte_at(database, unique, offset=16)
    _sql(database, "UPDATE entries SET header = CAST(REPLACE(CAST(header AS TEXT), '\"captions\":[', "
                   "'\"captions\":[\"tampered\",') AS BLOB) WHERE rowid = "
                   "(SELECT MIN(rowid) FROM entries WHERE stage = 'patch_captioning')")
    _sql(database, "UPDATE entries SET header = CAST(REPLACE(CAST(header AS TEXT), '\"answer\":\"', "
                   "'\"answer\":\"tampered ') AS BLOB) WHERE rowid = "
                   "(SELECT MIN(rowid) FROM entries WHERE stage = 'fid_reader')")
    assert _sql(database, "SELECT COUNT(*) FROM entries WHERE CAST(header AS TEXT) LIKE '%tampered%'") == [(2,)]

    again = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(data, cache_dir=cache, out_dir=tmp_path / "b")
    assert {s.name: (s.computed, s.cached) for s in again.stage_stats} == {
        "matching": (1, 3), "captioning": (1, 3), "reader": (1, 3)}
    assert again.predictions == first.predictions
    records = [(tmp_path / run / "records.jsonl").read_text() for run in ("a", "b")]
    assert "tampered" not in records[1]
    captions = [[json.loads(line)["stages"]["captioning"]["captions"] for line in text.splitlines()]
                for text in records]
    assert captions[0] == captions[1]
    assert not CacheStore(cache).check().problems_found


def test_run_on_an_unreadable_database_stops_before_any_work(tmp_path, tiny_zoo, monkeypatch):
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.pipeline import Pipeline
    from capvqa.stages.gradcam_matching import GradCamMatching

    database = tmp_path / "cache" / DB_FILENAME
    _garbage(database)
    monkeypatch.setattr(GradCamMatching, "setup", lambda *_: pytest.fail("a model was loaded"))
    with pytest.raises(CacheCorruptError, match="not a database") as caught:
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset("sample", limit=2),
                                                                 cache_dir=database.parent)
    assert str(database) in str(caught.value)


@pytest.mark.slow
def test_cli_run_on_an_unreadable_database_has_no_traceback(tmp_path, tiny_zoo):
    database = tmp_path / "cache" / DB_FILENAME
    _garbage(database)
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "2",
         "--quiet", "--cache-dir", str(database.parent), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a database" in done.stderr and "cache check --repair" in done.stderr


# -- the image-hash memo ----------------------------------------------------------------------------


def _bmp(color: tuple[int, int, int]) -> bytes:
    """An uncompressed image: every colour gives a file of the same size."""
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buffer, format="BMP")
    return buffer.getvalue()


def _item(path: Path) -> VQAItem:
    return VQAItem(question_id=1, image_id=1, question="What is it?", image=ImageRef(path=path))


def _run_hash(cache: Path, path: Path) -> str:
    """The image hash a new run (a new hasher over the same cache) gives ``path``."""
    return ImageHasher(CacheStore(cache))(_item(path))


@pytest.fixture()
def memoise_at_once(monkeypatch):
    """Memoise even a file written a moment ago (by default such a file is hashed again next time), so
    the tests below exercise the identity comparison itself."""
    monkeypatch.setattr(ImageHasher, "UNSETTLED_SECONDS", 0.0, raising=False)


def test_image_rewritten_in_place_with_size_and_mtime_restored_is_hashed_again(tmp_path, memoise_at_once):
    image_a, image_b = _bmp((255, 0, 0)), _bmp((0, 0, 255))
    assert len(image_a) == len(image_b) and image_a != image_b
    path = tmp_path / "photo.bmp"
    path.write_bytes(image_a)
    before = path.stat()
    assert _run_hash(tmp_path / "cache", path) == hashlib.sha256(image_a).hexdigest()
    time.sleep(0.05)  # past the filesystem's timestamp tick
    path.write_bytes(image_b)  # in place: same inode, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns  # what the memo relies on
    assert _run_hash(tmp_path / "cache", path) == hashlib.sha256(image_b).hexdigest()


def test_symlink_pointed_at_another_file_of_same_size_and_mtime_is_hashed_again(tmp_path, memoise_at_once):
    first, second = tmp_path / "a.bmp", tmp_path / "b.bmp"
    first.write_bytes(_bmp((255, 0, 0)))
    second.write_bytes(_bmp((0, 0, 255)))
    for path in (first, second):
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    link = tmp_path / "photo.bmp"
    link.symlink_to(first)
    assert _run_hash(tmp_path / "cache", link) == hashlib.sha256(first.read_bytes()).hexdigest()
    link.unlink()
    link.symlink_to(second)
    assert _run_hash(tmp_path / "cache", link) == hashlib.sha256(second.read_bytes()).hexdigest()


def test_unchanged_image_is_not_read_again(tmp_path, memoise_at_once, monkeypatch):
    import capvqa.data.images as images

    path = tmp_path / "photo.bmp"
    path.write_bytes(_bmp((1, 2, 3)))
    digest = _run_hash(tmp_path / "cache", path)
    monkeypatch.setattr(images, "image_content_hash", lambda ref: pytest.fail(f"{ref} was read again"))
    assert _run_hash(tmp_path / "cache", path) == digest


def test_image_changed_just_before_hashing_is_not_memoised(tmp_path, monkeypatch):
    import capvqa.data.images as images

    path = tmp_path / "photo.bmp"
    path.write_bytes(_bmp((1, 2, 3)))  # changed now: a rewrite within the same clock tick would look the same
    _run_hash(tmp_path / "cache", path)
    reads = []
    real = images.image_content_hash
    monkeypatch.setattr(images, "image_content_hash", lambda ref: reads.append(ref) or real(ref))
    _run_hash(tmp_path / "cache", path)
    assert len(reads) == 1


def test_image_changed_while_hashed_is_not_memoised(tmp_path, memoise_at_once, monkeypatch):
    import capvqa.data.images as images

    path = tmp_path / "photo.bmp"
    path.write_bytes(_bmp((1, 2, 3)))
    real = images.image_content_hash

    def hash_then_rewrite(ref):
        digest = real(ref)
        time.sleep(0.05)
        path.write_bytes(_bmp((3, 2, 1)))
        return digest

    monkeypatch.setattr(images, "image_content_hash", hash_then_rewrite)
    _run_hash(tmp_path / "cache", path)
    monkeypatch.setattr(images, "image_content_hash", real)
    assert _run_hash(tmp_path / "cache", path) == hashlib.sha256(path.read_bytes()).hexdigest()
