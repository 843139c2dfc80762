"""Atomic file writes: a temporary file beside the target, renamed into place when complete.

A reader (or a resumed run) sees either the previous file or the whole new one, never a truncated file;
on any error, or an interrupt, the temporary file is removed. Files are made world-readable (0644)
because run folders, results and reports are meant to be shared.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """Open a temporary file for writing (text ``"w"`` or binary ``"wb"``) that replaces ``path`` when
    the ``with`` block ends without an error."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, 0o644)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


@contextmanager
def building_directory(target: str | os.PathLike[str], done_marker: str) -> Iterator[Path]:
    """A staging folder beside ``target``, renamed into place when the ``with`` block ends without error.

    Readers never see a half-built folder. ``done_marker`` names a file the block writes into the
    folder: when the rename fails because ``target`` already holds one, another process finished the
    same build first and its copy is kept. The staging folder is always removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; these are plain readable cache folders
    try:
        yield staging
        try:
            os.replace(staging, target)  # atomic; fails when a non-empty target is already there
        except OSError:
            if not (target / done_marker).is_file():
                raise  # not a lost race: something else is in the way
            log.info("%s was built by another process meanwhile; using that copy", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
