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
RUNNING, COMPLETE, FAILED, INTERRUPTED = "running", "complete", "failed", "interrupted"


def start_run_folder(out: Path) -> None:
    """Make ``out`` writable and empty of any earlier run's files, then mark it ``running``.

    Fails before any computation when the folder cannot be written, or when it holds files with a run
    file's name (a project's own ``config.yaml``, say) but is not a run folder: those are never deleted.
    """
    taken = [name for name in RUN_FILES if (out / name).exists()]
    if taken and not is_run_folder(out):
        raise UserError(
            f"{out} is not a capvqa run folder but holds {', '.join(taken)}, which a run would replace; "
            "choose another --out (a new or empty folder, or an earlier run's folder)"
        )
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


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by ``capvqa run``: it has a status file, or (folders from before
    status files) a config.yaml with the ``stages`` and ``run`` sections a run saves."""
    if (folder / STATUS_FILE).is_file():
        return True
    try:
        import yaml

        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and isinstance(config.get("stages"), dict) and isinstance(config.get("run"), dict)


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
