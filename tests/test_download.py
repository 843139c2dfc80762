"""``capvqa data download`` against a local HTTP server serving tiny look-alike archives.

The server runs on 127.0.0.1 with an ephemeral port in a daemon thread, supports ``Range`` and can be
told to answer 503 or to cut a response off midway; every test shuts it down, and a timer stops it
anyway after a minute so a hung test cannot leave it running.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capvqa.cli.data import app as data_app
from capvqa.data import download as dl
from capvqa.data.archives import MemberFiles, UnsafeArchiveError, extract
from capvqa.errors import DataError, UserError

FAST = dl.RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05, timeout_s=5.0)

VQA_PATH = "/cvmlp/vqa/mscoco/vqa/"
OKVQA_PATH = "/static/data/"


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, link_target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # S_IFLNK | 0777, as zip -y stores links
            zf.writestr(info, link_target)
    return buffer.getvalue()


def questions(split: str) -> bytes:
    return json.dumps({"data_subtype": split, "questions": [{"image_id": 42, "question": "what?",
                                                              "question_id": 420}]}).encode()


def vqav2_archives() -> dict[str, bytes]:
    """Same file and member names as the real VQAv2 zips (members at the root, as upstream)."""
    return {
        VQA_PATH + "v2_Questions_Train_mscoco.zip": make_zip(
            {"v2_OpenEnded_mscoco_train2014_questions.json": questions("train2014")}),
        VQA_PATH + "v2_Questions_Val_mscoco.zip": make_zip(
            {"v2_OpenEnded_mscoco_val2014_questions.json": questions("val2014")}),
        VQA_PATH + "v2_Questions_Test_mscoco.zip": make_zip({
            "v2_OpenEnded_mscoco_test2015_questions.json": questions("test2015"),
            "v2_OpenEnded_mscoco_test-dev2015_questions.json": questions("test-dev2015"),
        }),
        VQA_PATH + "v2_Annotations_Train_mscoco.zip": make_zip(
            {"v2_mscoco_train2014_annotations.json": b'{"annotations": []}'}),
        VQA_PATH + "v2_Annotations_Val_mscoco.zip": make_zip(
            {"v2_mscoco_val2014_annotations.json": b'{"annotations": []}'}),
    }


def okvqa_archives() -> dict[str, bytes]:
    """OK-VQA zips; one has a top folder and macOS junk, to show members are found by name."""
    return {
        OKVQA_PATH + "OpenEnded_mscoco_train2014_questions.json.zip": make_zip(
            {"OpenEnded_mscoco_train2014_questions.json": questions("train2014")}),
        OKVQA_PATH + "OpenEnded_mscoco_val2014_questions.json.zip": make_zip({
            "okvqa/OpenEnded_mscoco_val2014_questions.json": questions("val2014"),
            "__MACOSX/okvqa/._OpenEnded_mscoco_val2014_questions.json": b"junk",
        }),
        OKVQA_PATH + "mscoco_train2014_annotations.json.zip": make_zip(
            {"mscoco_train2014_annotations.json": b'{"annotations": []}'}),
        OKVQA_PATH + "mscoco_val2014_annotations.json.zip": make_zip(
            {"mscoco_val2014_annotations.json": b'{"annotations": []}'}),
    }


def coco_val_zip() -> bytes:
    # Big enough (incompressible) that a cut-off midway leaves a real partial file.
    noise = hashlib.sha256(b"seed").digest() * 2048
    return make_zip({
        "val2014/": b"",
        "val2014/COCO_val2014_000000000042.jpg": b"\xff\xd8jpeg42" + noise,
        "val2014/COCO_val2014_000000000073.jpg": b"\xff\xd8jpeg73" + noise[::-1],
    })


# --------------------------------------------------------------------------------------------------
# A tiny HTTP server with Range support and scripted failures
# --------------------------------------------------------------------------------------------------


@dataclass
class FakeHost:
    """What the server serves, what it was asked, and the failures it should stage (per path, FIFO).

    A failure is ``"503"`` (answer 503) or ``"cut:N"`` (announce the full length, send N bytes, close).
    """

    files: dict[str, bytes] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    ignore_range: bool = False
    base_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ranges_for(self, path: str) -> list[str | None]:
        return [header for seen, header in self.requests if seen == path]


def _handler(host: FakeHost) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            with host.lock:
                host.requests.append((self.path, range_header))
                queue = host.failures.get(self.path, [])
                failure = queue.pop(0) if queue else None
            body = host.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            if failure == "503":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            if range_header and not host.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Content-Type", "application/zip")
            self.end_headers()
            if failure and failure.startswith("cut:"):
                payload = payload[: int(failure.split(":")[1])]
                self.close_connection = True
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def host() -> Iterator[FakeHost]:
    fake = FakeHost()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60.0, server.shutdown)  # bounded even if teardown never runs
    watchdog.daemon = True
    watchdog.start()
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def mirror(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(dl.MIRROR_ENV, host.base_url)
    return host.base_url


def run_cli(*args: str):
    return CliRunner().invoke(data_app, ["download", *args], catch_exceptions=True)


def with_known(target: str, **known: object) -> dl.Target:
    """A copy of a target whose first file has the given known size / sha256."""
    original = dl.TARGETS[target]
    return replace(original, files=(replace(original.files[0], **known), *original.files[1:]))


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_cli_downloads_and_extracts_the_loader_layout(
    host: FakeHost, mirror: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.files.update(vqav2_archives())
    host.files.update(okvqa_archives())
    host.files["/zips/val2014.zip"] = coco_val_zip()
    # the real COCO size would not match the tiny stand-in
    monkeypatch.setitem(dl.TARGETS, "coco-val2014", with_known("coco-val2014", size=len(coco_val_zip())))
    for target in ("vqav2", "okvqa", "coco-val2014"):
        result = run_cli(target, "--root", str(tmp_path))
        assert result.exit_code == 0, result.output + repr(result.exception)

    for split in ("train2014", "val2014", "test2015", "test-dev2015"):
        data = json.loads((tmp_path / f"vqav2/v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        assert data["data_subtype"] == split
    for split in ("train2014", "val2014"):
        assert (tmp_path / f"vqav2/v2_mscoco_{split}_annotations.json").is_file()
        assert (tmp_path / f"okvqa/OpenEnded_mscoco_{split}_questions.json").is_file()
        assert (tmp_path / f"okvqa/mscoco_{split}_annotations.json").is_file()
    images = sorted(p.name for p in (tmp_path / "coco/val2014").iterdir())
    assert images == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]
    first_image = (tmp_path / "coco/val2014/COCO_val2014_000000000042.jpg").read_bytes()
    assert first_image.startswith(b"\xff\xd8jpeg42")
    assert not (tmp_path / "okvqa/__MACOSX").exists() and not (tmp_path / "okvqa/okvqa").exists()

    # archives kept, markers record the computed sha256, no scratch left behind
    archive = tmp_path / ".downloads/v2_Questions_Val_mscoco.zip"
    marker = json.loads((tmp_path / ".downloads/v2_Questions_Val_mscoco.zip.done").read_text())
    assert marker["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert marker["url"] == mirror + VQA_PATH + "v2_Questions_Val_mscoco.zip"
    scratch = (".part", ".extracting", ".tmp")
    assert [p.name for p in (tmp_path / ".downloads").iterdir() if p.name.endswith(scratch)] == []


def test_main_prints_user_error_without_traceback_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from capvqa.cli import main

    monkeypatch.setattr(sys, "argv", ["capvqa", "data", "download", "vqa3", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "valid targets: vqav2, okvqa, coco-val2014, coco-train2014" in err
    assert "Traceback" not in err


def test_unknown_target_lists_valid_ones(tmp_path: Path) -> None:
    result = run_cli("vqa3", "--root", str(tmp_path))
    assert isinstance(result.exception, UserError)
    assert "valid targets: vqav2, okvqa, coco-val2014, coco-train2014" in str(result.exception)


def test_list_prints_targets_and_sizes() -> None:
    result = CliRunner().invoke(data_app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("vqav2", "okvqa", "coco-train2014", "v2_Questions_Val_mscoco.zip", "6.6 GB", "13.5 GB"):
        assert text in result.output


def test_resumes_a_cut_off_transfer_with_range(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    body = coco_val_zip()
    host.files["/zips/val2014.zip"] = body
    host.failures["/zips/val2014.zip"] = [f"cut:{len(body) // 3}"]
    target = with_known("coco-val2014", size=len(body), sha256=hashlib.sha256(body).hexdigest())
    reports = _download(target, tmp_path)

    ranges = host.ranges_for("/zips/val2014.zip")
    assert ranges == [None, f"bytes={len(body) // 3}-"]
    assert reports[0].verified and reports[0].sha256 == hashlib.sha256(body).hexdigest()
    assert (tmp_path / ".downloads/val2014.zip").read_bytes() == body
    assert len(list((tmp_path / "coco/val2014").iterdir())) == 2


def test_resumes_a_part_file_left_by_an_earlier_run(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    body = host.files[VQA_PATH + "v2_Questions_Val_mscoco.zip"] = vqav2_archives()[
        VQA_PATH + "v2_Questions_Val_mscoco.zip"]
    target = replace(dl.TARGETS["vqav2"], files=(dl.TARGETS["vqav2"].files[1],))
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads/v2_Questions_Val_mscoco.zip.part").write_bytes(body[:100])
    reports = _download(target, tmp_path)
    assert host.ranges_for(VQA_PATH + "v2_Questions_Val_mscoco.zip") == ["bytes=100-"]
    assert reports[0].sha256 == hashlib.sha256(body).hexdigest()
    assert (tmp_path / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json").is_file()


def test_server_ignoring_range_restarts_from_zero(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    body = host.files[VQA_PATH + "v2_Questions_Val_mscoco.zip"] = vqav2_archives()[
        VQA_PATH + "v2_Questions_Val_mscoco.zip"]
    host.ignore_range = True
    target = replace(dl.TARGETS["vqav2"], files=(dl.TARGETS["vqav2"].files[1],))
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads/v2_Questions_Val_mscoco.zip.part").write_bytes(body[:100])
    reports = _download(target, tmp_path)
    assert reports[0].sha256 == hashlib.sha256(body).hexdigest()
    assert (tmp_path / ".downloads/v2_Questions_Val_mscoco.zip").read_bytes() == body


def test_sha256_mismatch_deletes_the_file_and_names_it(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files.update(vqav2_archives())
    target = with_known("vqav2", sha256="0" * 64)
    with pytest.raises(DataError) as caught:
        _download(target, tmp_path)
    message = str(caught.value)
    actual = hashlib.sha256(host.files[VQA_PATH + "v2_Questions_Train_mscoco.zip"]).hexdigest()
    assert "v2_Questions_Train_mscoco.zip" in message and "0" * 64 in message and actual in message
    downloads = tmp_path / ".downloads"
    assert not (downloads / "v2_Questions_Train_mscoco.zip").exists()
    assert not (downloads / "v2_Questions_Train_mscoco.zip.part").exists()
    assert not (tmp_path / "vqav2").exists()


def test_size_mismatch_is_an_error(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files.update(vqav2_archives())
    target = with_known("vqav2", size=10**9)
    # the server sends its whole (tiny) file; only the known size says it is the wrong one
    with pytest.raises(DataError, match="size mismatch: expected 1000000000 bytes"):
        _download(target, tmp_path)


def test_skips_when_done_and_force_redoes(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files.update(okvqa_archives())
    assert run_cli("okvqa", "--root", str(tmp_path)).exit_code == 0
    first = len(host.requests)
    assert first == 4

    result = run_cli("okvqa", "--root", str(tmp_path))
    assert result.exit_code == 0 and len(host.requests) == first
    assert "0 archive(s) downloaded and extracted, 4 already done" in result.output

    # a deleted output invalidates its marker; only that archive is extracted again (from the kept zip)
    (tmp_path / "okvqa/mscoco_val2014_annotations.json").unlink()
    assert run_cli("okvqa", "--root", str(tmp_path)).exit_code == 0
    assert len(host.requests) == first and (tmp_path / "okvqa/mscoco_val2014_annotations.json").is_file()

    assert run_cli("okvqa", "--root", str(tmp_path), "--force").exit_code == 0
    assert len(host.requests) == first + 4


def test_delete_archives_keeps_marker_and_outputs(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files.update(okvqa_archives())
    assert run_cli("okvqa", "--root", str(tmp_path), "--delete-archives").exit_code == 0
    assert not list((tmp_path / ".downloads").glob("*.zip"))
    assert len(list((tmp_path / ".downloads").glob("*.done"))) == 4
    assert run_cli("okvqa", "--root", str(tmp_path)).exit_code == 0
    assert len(host.requests) == 4


def test_path_traversal_member_is_rejected(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for bad in ("../evil.json", "/etc/evil.json", "v2/../../evil.json"):
        host.files[VQA_PATH + "v2_Questions_Val_mscoco.zip"] = make_zip(
            {"v2_OpenEnded_mscoco_val2014_questions.json": b"{}", bad: b"owned"})
        target = replace(dl.TARGETS["vqav2"], files=(dl.TARGETS["vqav2"].files[1],))
        with pytest.raises(UnsafeArchiveError) as caught:
            _download(target, root, force=True)
        assert repr(bad) in str(caught.value)
        assert not (root / "vqav2").exists()
        assert not (tmp_path / "evil.json").exists()


def test_symlink_member_is_rejected(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files[VQA_PATH + "v2_Questions_Val_mscoco.zip"] = make_zip(
        {}, symlinks={"v2_OpenEnded_mscoco_val2014_questions.json": "/etc/passwd"})
    target = replace(dl.TARGETS["vqav2"], files=(dl.TARGETS["vqav2"].files[1],))
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        _download(target, tmp_path)
    assert not (tmp_path / "vqav2").exists()


def test_failed_extraction_leaves_no_final_files(tmp_path: Path) -> None:
    """A member failing its CRC check after another was already staged: nothing reaches the root."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.json", b'{"first": true}')
        zf.writestr("b.json", b'{"second": "CORRUPTME"}')
    archive = tmp_path / "broken.zip"
    archive.write_bytes(buffer.getvalue().replace(b"CORRUPTME", b"corrupted"))
    rule = MemberFiles((("a.json", "out/a.json"), ("b.json", "out/b.json")))
    with pytest.raises(DataError, match="broken.zip"):
        extract(archive, rule, tmp_path, tmp_path / ".scratch")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".scratch").exists()


def test_missing_member_names_what_the_archive_has(tmp_path: Path) -> None:
    archive = tmp_path / "renamed.zip"
    archive.write_bytes(make_zip({"v3_questions.json": b"{}"}))
    rule = MemberFiles((("v2_OpenEnded_mscoco_val2014_questions.json", "vqav2/q.json"),))
    with pytest.raises(DataError, match="no member named .*v3_questions.json"):
        extract(archive, rule, tmp_path, tmp_path / ".scratch")


def test_retries_a_503_then_succeeds(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files.update(vqav2_archives())
    path = VQA_PATH + "v2_Questions_Val_mscoco.zip"
    host.failures[path] = ["503", "503"]
    target = replace(dl.TARGETS["vqav2"], files=(dl.TARGETS["vqav2"].files[1],))
    reports = _download(target, tmp_path)
    assert host.ranges_for(path) == [None, None, None]
    assert reports[0].sha256 == hashlib.sha256(host.files[path]).hexdigest()


def test_gives_up_after_bounded_retries(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    host.files.update(vqav2_archives())
    path = VQA_PATH + "v2_Questions_Val_mscoco.zip"
    host.failures[path] = ["503"] * 10
    target = replace(dl.TARGETS["vqav2"], files=(dl.TARGETS["vqav2"].files[1],))
    with pytest.raises(UserError, match="gave up after 3 attempts"):
        _download(target, tmp_path)
    assert len(host.ranges_for(path)) == FAST.attempts


def test_404_is_a_user_error_naming_the_url(host: FakeHost, mirror: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="v2_Questions_Train_mscoco.zip answered HTTP 404"):
        dl.download_target("vqav2", tmp_path, retry=FAST)


def test_mirror_replaces_scheme_and_host_keeping_the_path() -> None:
    url = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip"
    assert dl.resolve_url(url, "http://mirror.local:8080/base/") == (
        "http://mirror.local:8080/base/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip")
    assert dl.resolve_url(url, None) == url
    with pytest.raises(UserError):
        dl.resolve_mirror("ftp://nope")


def _download(target: dl.Target, root: Path, force: bool = False) -> list[dl.FileReport]:
    return dl.download_target(target, root, retry=FAST, force=force)
