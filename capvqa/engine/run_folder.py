"""A run folder holds exactly one run's files, and says whether that run finished.

A rerun into the same ``--out`` first removes every file a run writes (and only those: anything else a
user put there stays), so an unannotated rerun can never leave an older ``metrics.json`` beside new
predictions. ``status.json`` is written before any work (``running``), and rewritten as ``complete`` or
``failed`` (with the error) at the end; a run killed outright leaves ``running``. ``capvqa report`` shows
the status instead of numbers for any run that is not complete. Finished stage results live in the cache,
not here, so clearing a folder never loses computed work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from capvqa.atomic import atomic_write_text
from capvqa.errors import UserError

STATUS_FILE = "status.json"
#: Every file a run (and its report) writes into its folder.
RUN_FILES = ("config.yaml", "predictions.json", "records.jsonl", "metrics.json", "timings.json", "skipped.json",
             "report.html", "report.md", STATUS_FILE)
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"


def start_run_folder(out: Path) -> None:
    """Make ``out`` writable and empty of any earlier run's files, then mark it ``running``.

    Fails before any computation when the folder cannot be written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".capvqa-write-test"
        probe.write_text("ok")
        probe.unlink()
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise UserError(f"cannot write the run folder {out}: {error}. Choose another --out.") from error
    write_status(out, RUNNING)


def write_status(out: Path, status: str, **details: Any) -> None:
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
    atomic_write_text(out / STATUS_FILE, json.dumps(record, indent=2, ensure_ascii=False))


def read_status(folder: Path) -> dict[str, Any] | None:
    """The folder's status record; None for folders written before status files existed (or unreadable)."""
    try:
        record = json.loads((folder / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
