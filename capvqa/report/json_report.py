"""The report's numbers as JSON, for scripts: runs, accuracy rows and per-question agreement.

One shape, written two ways: ``capvqa report --json PATH`` writes it to a file, and the HTML report
embeds it as its ``report-meta`` script element, so a script reading either gets the same keys. Lists
follow the run order of ``runs`` (labels need not be unique when given by hand).
"""

from __future__ import annotations

import json
from typing import Any

from capvqa import __version__
from capvqa.report.agreement import KINDS, RULE, SAME_ANSWER_RULE, Agreement, PairAgreement
from capvqa.report.gallery import GalleryItem
from capvqa.report.model import ReportData


def report_json(data: ReportData) -> dict[str, Any]:
    """Plain JSON-ready data: the report's runs, accuracy table and agreement (None with one run)."""
    return {
        "title": data.title,
        "generated": data.generated,
        "capvqa_version": __version__,
        "runs": [{"label": v.label, "path": str(v.run.path), "status": v.run.status, "method": v.run.method,
                  "family": v.run.family, "overall": v.scores.overall,
                  "num_questions": v.scores.num_questions or len(v.run.records)} for v in data.runs],
        "accuracy": [{"group": r.kind, "name": r.name, "values": list(r.values), "counts": list(r.counts)}
                     for r in data.rows],
        "gallery_items": len(data.gallery),
        "questions": data.gallery_total,
        "agreement": agreement_json(data.agreement, data.labels, data.agreement_items)
        if data.agreement is not None else None,
    }


def agreement_json(agreement: Agreement, labels: list[str], items: dict[str, GalleryItem]) -> dict[str, Any]:
    return {
        "same_answer": SAME_ANSWER_RULE,
        "right_where_other_wrong": RULE,
        "question_counts": list(agreement.question_counts),
        "shared_by_all": agreement.shared_by_all,
        "matrix": agreement.matrix(),
        "pairs": [_pair_json(pair, labels, items) for pair in agreement.pairs],
    }


def _pair_json(pair: PairAgreement, labels: list[str], items: dict[str, GalleryItem]) -> dict[str, Any]:
    return {
        "a": labels[pair.a],
        "b": labels[pair.b],
        "shared": pair.shared,
        "same_answer": pair.same,
        "agreement": pair.agreement,
        "scored": pair.scored,
        "a_better": pair.a_better,
        "b_better": pair.b_better,
        "different_tie": pair.different_tie,
        "different_question": pair.different_question,
        "examples": {kind: [_example_json(items[key], pair) for key in pair.examples.get(kind, ()) if key in items]
                     for kind in KINDS},
    }


def _example_json(item: GalleryItem, pair: PairAgreement) -> dict[str, Any]:
    first, second = item.answers[pair.a], item.answers[pair.b]
    return {
        "question_id": item.question_id,
        "image_id": item.image_id,
        "question": item.question,
        "gt_answers": list(item.gt_answers),
        "a": {"answer": first.answer, "accuracy": first.accuracy},
        "b": {"answer": second.answer, "accuracy": second.accuracy},
    }


def render_json(data: ReportData) -> str:
    return json.dumps(report_json(data), indent=2, default=str) + "\n"
