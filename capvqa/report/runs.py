"""Reading run folders (``capvqa run`` output) for the report, tolerant of missing or partial files.

A report is built at the end of every run and over old run folders, so nothing here may fail on a
missing ``metrics.json`` (unannotated split), a missing ``timings.json`` or a truncated
``records.jsonl``: each problem is noted in :attr:`RunFolder.problems` and shown in the report.

``records.jsonl`` can be large (a PNP-VQA line carries 100 captions, 100 passages and a 576-value
relevance map). The summary needs only the light per-question fields, so the first pass parses only the
part of each line before its ``"stages"`` key and remembers the line's byte offset; the gallery later
re-reads just the few lines it shows (:meth:`RunFolder.full_records`).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capvqa.engine.run_folder import COMPLETE, STATUS_FILE, read_status
from capvqa.report.published import method_family, method_of

RUN_FILES = ("config.yaml", "records.jsonl", "metrics.json", "timings.json", "predictions.json", STATUS_FILE)
_STAGES_MARKER = ', "stages": '
OFFSET_KEY = "_offset"


def qid_key(question_id: Any) -> str:
    """Question ids are ints (VQAv2) or strings (HF OK-VQA) and metrics.json keys are strings: the
    report keys everything by ``str(question_id)``."""
    return str(question_id)


@dataclass
class RunFolder:
    """One run folder: its config, metrics, timings and light per-question records."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    timings: dict[str, Any] | None
    records: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    status: str = "complete"  # or running / failed / interrupted (status.json); older folders: complete

    @property
    def run_settings(self) -> dict[str, Any]:
        return self.config.get("run") or {}

    @property
    def is_tiny(self) -> bool:
        """Runs on the offline random-weight zoo: their accuracy means nothing."""
        return self.config.get("models_preset") == "tiny"

    @property
    def method(self) -> str | None:
        """The config's ``method`` (or one guessed from the pipeline name), e.g. ``pnp-vqa``, ``blip2``."""
        return method_of(self.config)

    @property
    def family(self) -> str | None:
        """"end-to-end" or "caption pipeline" (None: unknown), to label comparisons between methods."""
        return method_family(self.config)

    def by_qid(self) -> dict[str, dict[str, Any]]:
        return {qid_key(r.get("question_id")): r for r in self.records}

    def full_records(self, question_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The complete records.jsonl lines (with ``stages``) of ``question_ids``, read by byte offset."""
        wanted = set(question_ids)
        offsets = sorted(
            (r[OFFSET_KEY], qid_key(r.get("question_id")))
            for r in self.records
            if qid_key(r.get("question_id")) in wanted and r.get(OFFSET_KEY) is not None
        )
        out: dict[str, dict[str, Any]] = {}
        path = self.path / "records.jsonl"
        if not offsets or not path.is_file():
            return out
        with path.open("rb") as handle:
            for offset, key in offsets:
                handle.seek(offset)
                try:
                    record = json.loads(handle.readline().decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict):
                    out[key] = record
        return out


def load_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[RunFolder]:
    """Load several run folders, with labels that tell them apart (folder names, made unique)."""
    resolved = [Path(p) for p in paths]
    names = list(labels) if labels else unique_labels(resolved)
    if len(names) != len(resolved):
        raise ValueError(f"{len(names)} labels for {len(resolved)} run folders")
    return [load_run(path, label) for path, label in zip(resolved, names)]


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names; where two collide, prefix the parent folder, then number them."""
    labels = [p.resolve().name or str(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}:{label}" for i, label in enumerate(labels)]
    return labels


def load_run(path: str | Path, label: str | None = None) -> RunFolder:
    """Read one run folder. Raises only when ``path`` is not a run folder at all."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a run folder written by `capvqa run`)")
    if not any((path / name).is_file() for name in RUN_FILES):
        raise FileNotFoundError(f"{path} holds none of {', '.join(RUN_FILES)}: not a run folder")
    problems: list[str] = []
    config = _read_yaml(path / "config.yaml", problems) or {}
    status = read_status(path) or {"status": COMPLETE}
    if status.get("status") != COMPLETE:
        # an unfinished run's files are partial: show why instead of numbers
        error = f": {status['error']}" if status.get("error") else ""
        problems.append(f"this run is {status.get('status')}{error} (status.json, {status.get('time', '?')}); "
                        "no results are shown. Rerun it into the same folder with: capvqa run " + shlex.quote(str(path))
                        + " --out " + shlex.quote(str(path)))
        return RunFolder(path=path, label=label or path.resolve().name,
                         config=config if isinstance(config, dict) else {}, metrics=None, timings=None,
                         records=[], problems=problems, status=str(status.get("status")))
    metrics = _read_json(path / "metrics.json", problems, required=False)
    timings = _read_json(path / "timings.json", problems, required=False)
    records = read_light_records(path / "records.jsonl", problems)
    if not records:
        records = _records_from_predictions(path / "predictions.json", metrics, problems)
    return RunFolder(
        path=path,
        label=label or path.resolve().name,
        config=config if isinstance(config, dict) else {},
        metrics=metrics if isinstance(metrics, dict) else None,
        timings=timings if isinstance(timings, dict) else None,
        records=records,
        problems=problems,
    )


def light_record(line: str) -> dict[str, Any] | None:
    """Parse a records.jsonl line without its (large) ``stages`` value when possible.

    ``stages`` is the last key the pipeline writes; inside JSON strings every quote is escaped, so the
    first ``, "stages": `` is the top-level key. Falls back to a full parse for any other layout.
    """
    cut = line.find(_STAGES_MARKER)
    if cut > 0:
        try:
            value = json.loads(line[:cut] + "}")
            if isinstance(value, dict):
                return value
        except ValueError:
            pass
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    value.pop("stages", None)
    return value


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """Coerce the fields the report computes with, so a hand-edited or foreign line cannot break it:
    ``accuracy`` a finite float or None, ``answer`` a string, ``gt_answers`` a list of strings."""
    try:
        accuracy = float(record["accuracy"]) if record.get("accuracy") is not None else None
    except (TypeError, ValueError):
        accuracy = None
    record["accuracy"] = accuracy if accuracy is None or math.isfinite(accuracy) else None
    answer = record.get("answer")
    record["answer"] = "" if answer is None else str(answer)
    answers = record.get("gt_answers")
    record["gt_answers"] = [str(a) for a in answers] if isinstance(answers, list) else []
    for key in ("answer_type", "question_type"):
        if record.get(key) is not None and not isinstance(record[key], str):
            record[key] = str(record[key])
    return record


def read_light_records(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Light records with their byte offsets; unreadable lines are skipped and counted as a problem."""
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return []
    records: list[dict[str, Any]] = []
    bad = 0
    offset = 0
    with path.open("rb") as handle:
        for raw in handle:
            start = offset
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                record = light_record(raw.decode("utf-8"))
            except UnicodeDecodeError:
                record = None
            if record is None or "question_id" not in record:
                bad += 1
                continue
            record[OFFSET_KEY] = start
            records.append(clean_record(record))
    if bad:
        problems.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return records


def _records_from_predictions(
    path: Path, metrics: dict[str, Any] | None, problems: list[str]
) -> list[dict[str, Any]]:
    """Without records.jsonl, predictions (+ per-question metrics) still give a summary."""
    predictions = _read_json(path, problems, required=False)
    if not isinstance(predictions, list):
        return []
    per_question = (metrics or {}).get("per_question") or {}
    out = []
    for row in predictions:
        if isinstance(row, dict) and "question_id" in row:
            acc = per_question.get(qid_key(row["question_id"]))
            out.append(clean_record({"question_id": row["question_id"], "answer": row.get("answer", ""),
                                     "accuracy": acc}))
    return out


def _read_json(path: Path, problems: list[str], *, required: bool) -> Any:
    if not path.is_file():
        if required:
            problems.append(f"{path.name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        problems.append(f"{path.name} could not be read: {error}")
        return None


def _read_yaml(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError) as error:
        problems.append(f"{path.name} could not be read: {error}")
        return None
