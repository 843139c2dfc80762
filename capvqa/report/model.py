"""The report's content, computed once and rendered twice (HTML and Markdown)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from capvqa.report.agreement import Agreement
from capvqa.report.gallery import GalleryItem
from capvqa.report.published import METHOD_NAMES, PublishedLookup
from capvqa.report.runs import RunFolder
from capvqa.report.summary import AccuracyRow, RunScores, StageTiming, delta


@dataclass
class RunView:
    """One run with everything derived from it."""

    run: RunFolder
    scores: RunScores
    published: PublishedLookup
    timings: list[StageTiming]

    @property
    def label(self) -> str:
        return self.run.label

    @property
    def method_label(self) -> str:
        """Method and family, to say what is compared with what: "BLIP-2, end-to-end"; "" if unknown."""
        method = self.run.method
        parts = [METHOD_NAMES.get(method, method) if method else None, self.run.family]
        return ", ".join(p for p in parts if p)

    @property
    def published_delta(self) -> float | None:
        """Run overall minus the paper's number; None when no number applies (tiny models, ...)."""
        if self.published.result is None:
            return None
        return delta(self.scores.overall, self.published.result.accuracy)


@dataclass
class ReportData:
    title: str
    generated: str
    runs: list[RunView]
    rows: list[AccuracyRow]
    differences: list[tuple[str, tuple[Any, ...]]]
    sweep: str | None
    gallery: list[GalleryItem]
    gallery_total: int
    thumbnails: dict[str, bytes] = field(default_factory=dict)
    heatmaps: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # per-question agreement between runs (None with one run) and the examples it shows, by question key
    agreement: Agreement | None = None
    agreement_items: dict[str, GalleryItem] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1

    @property
    def tiny_labels(self) -> list[str]:
        return [r.label for r in self.runs if r.run.is_tiny]
