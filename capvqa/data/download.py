"""Download the official VQAv2 / OK-VQA / COCO archives and unpack them into the loader layout.

The layout under a data root is a contract with the dataset loaders::

    {root}/vqav2/v2_OpenEnded_mscoco_{split}_questions.json
    {root}/vqav2/v2_mscoco_{split}_annotations.json
    {root}/okvqa/OpenEnded_mscoco_{split}_questions.json
    {root}/okvqa/mscoco_{split}_annotations.json
    {root}/coco/{split}/COCO_{split}_{image_id:012d}.jpg

Archives are several gigabytes and hosts drop connections, so a download streams into
``{root}/.downloads/NAME.part`` and resumes with an HTTP ``Range`` request; the file is renamed to
``NAME`` only after its size and sha256 were checked against :data:`TARGETS` (where known). A finished
file gets a ``NAME.done`` JSON marker holding the computed sha256, so a rerun skips it. Only the
standard library talks to the network; ``rich`` draws the progress bars.

``CAPVQA_DOWNLOAD_MIRROR`` (or ``mirror=``) replaces scheme and host of every source URL and keeps the
path, for mirrors and for tests that serve the archives from a local HTTP server.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from capvqa.data.archives import ExtractRule, MemberFiles, MemberTree, extract
from capvqa.errors import DataError, UserError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

MIRROR_ENV = "CAPVQA_DOWNLOAD_MIRROR"
DOWNLOADS_DIR = ".downloads"
MARKER_VERSION = 1
_CHUNK = 1 << 20
_USER_AGENT = "capvqa-downloader/1 (+python-urllib)"


@dataclass(frozen=True)
class SourceFile:
    """One official archive: where it lives, what it must hash to, and where its members go.

    ``size`` and ``sha256`` are ``None`` where no trustworthy published value is known; the computed
    sha256 is then only printed and recorded in the ``.done`` marker, never invented.
    """

    url: str
    rule: ExtractRule
    size: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The archive's file name, also its name under ``{root}/.downloads``."""
        return PurePosixPath(urlsplit(self.url).path).name


@dataclass(frozen=True)
class Target:
    """A named set of archives that ``capvqa data download NAME`` fetches together."""

    name: str
    description: str
    files: tuple[SourceFile, ...]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on a URL.

    ``attempts`` counts consecutive failed attempts that brought no new bytes; an attempt that made
    progress resets the count, so a long download over a flaky link is not cut short, while a dead
    host fails after ``attempts`` tries with exponential backoff between them.
    """

    attempts: int = 5
    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0
    timeout_s: float = 60.0


@dataclass(frozen=True)
class FileReport:
    """What happened to one archive: its sha256, whether it matched a known value, what was written."""

    name: str
    sha256: str
    size: int
    verified: bool
    skipped: bool
    outputs: int
    archive: Path | None


# --------------------------------------------------------------------------------------------------
# Sources. The COCO sizes are the Content-Length images.cocodataset.org serves, as many independent
# public wget logs record it (not re-checked from here: no network). No sizes are recorded for the small
# VQAv2/OK-VQA zips, and no sha256 is published for any of them, so those stay None rather than guessed;
# the computed sha256 is printed and kept in each .done marker, ready to be pinned here.
# --------------------------------------------------------------------------------------------------

_VQA_BASE = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/"  # where visualqa.org links point
_OKVQA_BASE = "https://okvqa.allenai.org/static/data/"
_COCO_BASE = "http://images.cocodataset.org/zips/"


def _json_files(folder: str, *members: str) -> MemberFiles:
    """Members keep their file name and go into ``{root}/{folder}/``."""
    return MemberFiles(tuple((member, f"{folder}/{member}") for member in members))


def _coco(split: str, size: int | None) -> Target:
    return Target(
        name=f"coco-{split}",
        description=f"COCO {split} images -> coco/{split}/",
        files=(SourceFile(_COCO_BASE + f"{split}.zip", MemberTree(split, f"coco/{split}"), size=size),),
    )


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            name="vqav2",
            description="VQAv2 questions (train/val/test/test-dev) and annotations (train/val) -> vqav2/",
            files=(
                SourceFile(
                    _VQA_BASE + "v2_Questions_Train_mscoco.zip",
                    _json_files("vqav2", "v2_OpenEnded_mscoco_train2014_questions.json"),
                ),
                SourceFile(
                    _VQA_BASE + "v2_Questions_Val_mscoco.zip",
                    _json_files("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"),
                ),
                SourceFile(
                    _VQA_BASE + "v2_Questions_Test_mscoco.zip",
                    _json_files(
                        "vqav2",
                        "v2_OpenEnded_mscoco_test2015_questions.json",
                        "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                    ),
                ),
                SourceFile(
                    _VQA_BASE + "v2_Annotations_Train_mscoco.zip",
                    _json_files("vqav2", "v2_mscoco_train2014_annotations.json"),
                ),
                SourceFile(
                    _VQA_BASE + "v2_Annotations_Val_mscoco.zip",
                    _json_files("vqav2", "v2_mscoco_val2014_annotations.json"),
                ),
            ),
        ),
        Target(
            name="okvqa",
            description="OK-VQA questions and annotations (train2014/val2014) -> okvqa/",
            files=(
                SourceFile(
                    _OKVQA_BASE + "OpenEnded_mscoco_train2014_questions.json.zip",
                    _json_files("okvqa", "OpenEnded_mscoco_train2014_questions.json"),
                ),
                SourceFile(
                    _OKVQA_BASE + "OpenEnded_mscoco_val2014_questions.json.zip",
                    _json_files("okvqa", "OpenEnded_mscoco_val2014_questions.json"),
                ),
                SourceFile(
                    _OKVQA_BASE + "mscoco_train2014_annotations.json.zip",
                    _json_files("okvqa", "mscoco_train2014_annotations.json"),
                ),
                SourceFile(
                    _OKVQA_BASE + "mscoco_val2014_annotations.json.zip",
                    _json_files("okvqa", "mscoco_val2014_annotations.json"),
                ),
            ),
        ),
        _coco("val2014", size=6_645_013_297),
        _coco("train2014", size=13_510_573_713),
        _coco("test2015", size=None),
    )
}


def get_target(name: str) -> Target:
    """Look a target up by name; an unknown name lists the valid ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown download target {name!r}; valid targets: {', '.join(TARGETS)}") from None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def download_target(
    name: str | Target,
    root: Path | str,
    *,
    force: bool = False,
    mirror: str | None = None,
    delete_archives: bool = False,
    retry: RetryPolicy = RetryPolicy(),
    console: Console | None = None,
) -> list[FileReport]:
    """Download, verify and extract every archive of target ``name`` under ``root``.

    ``name`` is a key of :data:`TARGETS` or a :class:`Target` (e.g. one with checksums recorded locally).

    Archives already extracted and recorded in a ``.done`` marker are skipped unless ``force``.
    ``mirror`` (default: ``$CAPVQA_DOWNLOAD_MIRROR``) replaces scheme and host of the source URLs.
    Progress and one line per archive (with its sha256) go to ``console`` (default: stderr).
    """
    target = name if isinstance(name, Target) else get_target(name)
    base = resolve_mirror(mirror)
    root = Path(root)
    downloads = root / DOWNLOADS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    with _make_progress(console) as progress:
        return [
            _download_file(target, source, root, downloads, base, force, delete_archives, retry, progress)
            for source in target.files
        ]


def resolve_mirror(mirror: str | None) -> str | None:
    """The mirror base URL to use: the argument, else the environment, else none; validated."""
    chosen = mirror or os.environ.get(MIRROR_ENV) or None
    if chosen is None:
        return None
    parts = urlsplit(chosen)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"mirror {chosen!r} is not an http(s) base URL such as https://mirror.example.org")
    return chosen


def resolve_url(url: str, mirror: str | None) -> str:
    """Replace scheme and host of ``url`` by the mirror's, keeping the source path under the mirror's."""
    if not mirror:
        return url
    source, base = urlsplit(url), urlsplit(mirror)
    return urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + source.path, source.query, ""))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# One archive: skip, fetch, verify, extract, mark done
# --------------------------------------------------------------------------------------------------


def _download_file(
    target: Target,
    source: SourceFile,
    root: Path,
    downloads: Path,
    mirror: str | None,
    force: bool,
    delete_archives: bool,
    retry: RetryPolicy,
    progress: Progress,
) -> FileReport:
    say = progress.console.print
    archive = downloads / source.name
    part = downloads / f"{source.name}.part"
    marker = downloads / f"{source.name}.done"
    if force:
        for stale in (marker, archive, part):
            stale.unlink(missing_ok=True)
    else:
        done = _read_marker(marker)
        if done is not None and _marker_still_valid(done, source, root):
            say(f"[dim]skip[/] {source.name}: already extracted (sha256 {done['sha256']})")
            return FileReport(
                name=source.name,
                sha256=done["sha256"],
                size=done["size"],
                verified=bool(done.get("verified")),
                skipped=True,
                outputs=done["outputs"],
                archive=archive if archive.exists() else None,
            )

    url = resolve_url(source.url, mirror)
    digest: str | None = None
    if archive.exists():  # complete from an earlier run that stopped before extracting
        digest = sha256_file(archive)
        try:
            _verify(archive, source, digest)
        except DataError as error:  # _verify deleted it; a fresh copy may be fine
            say(f"[yellow]warning[/] kept archive rejected ({error}); downloading it again")
            digest = None
    if digest is None:
        digest = _fetch(url, part, source.size, retry, progress, source.name)
        _verify(part, source, digest)
        part.replace(archive)
    size = archive.stat().st_size
    verified = source.sha256 is not None
    checks = [
        "size as expected" if source.size is not None else "size not known in advance",
        "sha256 as expected" if verified else "no known sha256 to compare",
    ]
    say(f"[green]ok[/] {source.name}: {size} bytes, sha256 {digest} ({', '.join(checks)})")

    outputs = extract(archive, source.rule, root, downloads / f"{source.name}.extracting")
    _write_marker(
        marker,
        {
            "version": MARKER_VERSION,
            "target": target.name,
            "file": source.name,
            "url": url,
            "size": size,
            "sha256": digest,
            "verified": verified,
            "outputs": len(outputs),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    say(f"[green]extracted[/] {source.name}: {len(outputs)} file(s) -> {source.rule.describe()}")
    if delete_archives:
        archive.unlink()
    return FileReport(
        name=source.name,
        sha256=digest,
        size=size,
        verified=verified,
        skipped=False,
        outputs=len(outputs),
        archive=None if delete_archives else archive,
    )


def _verify(path: Path, source: SourceFile, digest: str) -> None:
    """Compare size and sha256 with the known values; on mismatch delete the file and say so."""
    actual_size = path.stat().st_size
    problem = None
    if source.size is not None and actual_size != source.size:
        problem = f"size mismatch: expected {source.size} bytes, got {actual_size}"
    elif source.sha256 is not None and digest != source.sha256.lower():
        problem = f"sha256 mismatch: expected {source.sha256.lower()}, got {digest}"
    if problem is not None:
        path.unlink(missing_ok=True)
        raise DataError(
            f"{source.name}: {problem}; the file was deleted, run the command again "
            f"(a mirror serving a different file also causes this)"
        )


def _marker_still_valid(done: dict[str, Any], source: SourceFile, root: Path) -> bool:
    """A marker counts only if it agrees with the known checksums and the extracted files are there."""
    try:
        if source.sha256 is not None and done["sha256"] != source.sha256.lower():
            return False
        if source.size is not None and done["size"] != source.size:
            return False
        return source.rule.outputs_present(root, int(done["outputs"]))
    except (KeyError, TypeError, ValueError):
        return False


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == MARKER_VERSION else None


def _write_marker(marker: Path, data: dict[str, Any]) -> None:
    """Write-then-rename so a crash never leaves a marker that parses but lies."""
    staged = marker.with_name(marker.name + ".tmp")
    staged.write_text(json.dumps(data, indent=2) + "\n")
    staged.replace(marker)


# --------------------------------------------------------------------------------------------------
# HTTP: resumable streaming with retries
# --------------------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying: a dropped connection, a short body, a 5xx or 429."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Anything raised while talking to the server; OSError covers resets, timeouts and TLS errors.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class _PartFile:
    """The ``.part`` file plus a running sha256 of its bytes, kept in step.

    Hashing while writing means a finished multi-gigabyte archive need not be read again; only when
    resuming a ``.part`` left by an earlier run are its bytes hashed once from disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def sync(self) -> int:
        """Make the hash cover exactly the bytes on disk; return their count."""
        size = self.size()
        if size != self.hashed:
            self.hasher, self.hashed = hashlib.sha256(), 0
            with open(self.path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    self.hasher.update(chunk)
                    self.hashed += len(chunk)
        return size

    def append(self, chunk: bytes, sink: Any) -> None:
        sink.write(chunk)
        self.hasher.update(chunk)
        self.hashed += len(chunk)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher, self.hashed = hashlib.sha256(), 0

    def digest(self) -> str:
        return self.hasher.hexdigest()


def _fetch(
    url: str, path: Path, expected_size: int | None, retry: RetryPolicy, progress: Progress, label: str
) -> str:
    """Stream ``url`` into ``path`` (the ``.part``), resuming what is there; return the file's sha256.

    Retries transient failures with exponential backoff; ``retry.attempts`` consecutive failures that
    brought no new bytes give up with a :class:`UserError` (the ``.part`` stays for the next run).
    """
    part = _PartFile(path)
    task = progress.add_task(label, total=expected_size)
    failures = 0
    while True:
        offset = part.sync()
        if expected_size is not None and offset > expected_size:
            part.reset()  # longer than the real file: cannot be a prefix of it
            offset = 0
        if expected_size is not None and offset == expected_size and offset > 0:
            progress.update(task, completed=offset)
            return part.digest()
        try:
            return _fetch_once(url, part, offset, retry, progress, task)
        except _Transient as error:
            failures = 0 if part.size() > offset else failures + 1
            if failures >= retry.attempts:
                raise UserError(
                    f"could not download {url}: {error} (gave up after {failures} attempts without "
                    f"progress); run the same command again to resume from {path}"
                ) from None
            delay = min(retry.max_delay_s, retry.initial_delay_s * 2 ** max(failures - 1, 0))
            if error.retry_after_s is not None:
                delay = min(retry.max_delay_s, max(delay, error.retry_after_s))
            progress.console.print(f"[yellow]retry[/] {label}: {error}; again in {delay:.2f}s")
            time.sleep(delay)


def _fetch_once(
    url: str, part: _PartFile, offset: int, retry: RetryPolicy, progress: Progress, task: TaskID
) -> str:
    """One HTTP request: append on 206, restart on 200; raise :class:`_Transient` on a retryable failure."""
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=retry.timeout_s)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            if _range_total(error.headers.get("Content-Range")) == offset:
                return part.digest()  # the .part already holds the whole file
            part.reset()
            raise _Transient(f"server refused to resume at byte {offset}; restarting") from None
        if error.code >= 500 or error.code == 429:
            raise _Transient(f"HTTP {error.code} {error.reason}", _retry_after(error.headers)) from None
        raise UserError(
            f"{url} answered HTTP {error.code} {error.reason}; check the URL, or the mirror "
            f"(--mirror / ${MIRROR_ENV})"
        ) from None
    except _NETWORK_ERRORS as error:
        raise _Transient(f"{type(error).__name__}: {error}") from None

    with response:
        if offset and response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.reset()
                raise _Transient(f"server resumed at byte {start}, not {offset}; restarting")
        elif response.status == 200:
            if offset:  # the server ignored Range: start over rather than append a second copy
                part.reset()
                offset = 0
        else:
            raise UserError(f"{url} answered unexpected HTTP {response.status}")
        length_header = response.headers.get("Content-Length", "")
        length = int(length_header) if length_header.isdigit() else None
        if length is not None and not _task_total_known(progress, task):
            progress.update(task, total=offset + length)
        progress.update(task, completed=offset)
        received = 0
        with open(part.path, "ab" if offset else "wb") as sink:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except _NETWORK_ERRORS as error:
                    raise _Transient(f"connection lost after {offset + received} bytes ({error})") from None
                if not chunk:
                    break
                part.append(chunk, sink)
                received += len(chunk)
                progress.advance(task, len(chunk))
        if length is not None and received < length:
            raise _Transient(f"connection closed after {offset + received} of {offset + length} bytes")
    return part.digest()


def _task_total_known(progress: Progress, task: TaskID) -> bool:
    return any(candidate.id == task and candidate.total is not None for candidate in progress.tasks)


def _range_start(content_range: str | None) -> int | None:
    """``bytes 100-199/200`` -> 100."""
    try:
        return int(content_range.split()[1].split("-")[0]) if content_range else None
    except (IndexError, ValueError):
        return None


def _range_total(content_range: str | None) -> int | None:
    """``bytes */200`` or ``bytes 100-199/200`` -> 200."""
    try:
        return int(content_range.rsplit("/", 1)[1]) if content_range else None
    except (IndexError, ValueError):
        return None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    return float(value) if value and value.isdigit() else None


def _make_progress(console: Console | None) -> Progress:
    """Bytes, speed and ETA per archive; rich is imported here so importing this module stays cheap."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
