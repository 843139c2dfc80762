"""Per-question agreement in `capvqa report`: the pure maths on hand-made records, method families from
configs, and the agreement in the HTML, Markdown and JSON outputs of a report over two runs.

The end-to-end report test uses the synthetic run folders of tests/test_report.py (fast); the slow test
runs an end-to-end model and a caption pipeline on the tiny zoo through the CLI and compares them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from capvqa.engine.config import load_spec
from capvqa.eval.normalize import normalize_prediction
from capvqa.report.agreement import (
    A_BETTER,
    B_BETTER,
    DIFFERENT_TIE,
    KINDS,
    compare_pair,
    compare_runs,
    example_keys,
    same_answer,
    scores_higher,
    shared_keys,
)
from capvqa.report.build import build_report, collect_report
from capvqa.report.published import CAPTION_PIPELINE, END_TO_END, method_family
from capvqa.report.runs import load_runs

try:  # the synthetic run folders of the report tests (tests/ is on sys.path in pytest's default mode)
    from test_report import make_run
except ImportError:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import make_run


def _records(rows: list[tuple[Any, str, float | None]]) -> dict[str, dict[str, Any]]:
    """question key -> light record, from (question id, answer, accuracy) rows, in row order."""
    return {str(qid): {"question_id": qid, "question": f"q{qid}?", "answer": answer, "accuracy": accuracy}
            for qid, answer, accuracy in rows}


# ----------------------------------------------------------------------------------------------------
# the rules


@pytest.mark.parametrize(("first", "second", "expected"), [
    ("Two", "2", True),  # number words become digits
    ("the dog", "dog.", True),  # articles and periods go
    ("T-Shirt", "t shirt", True),  # a hyphen becomes a space
    ("dont", "don't", True),  # contractions get their apostrophe
    ("  red\n", "red", True),
    ("red", "blue", False),
    ("", "no", False),
    (None, "", True),  # a missing answer is an empty one
])
def test_same_answer_is_the_metric_normalisation(first: Any, second: Any, expected: bool) -> None:
    assert same_answer(first, second) is expected


def test_right_where_the_other_is_wrong_is_a_strictly_higher_accuracy() -> None:
    assert scores_higher(100.0, 0.0) and scores_higher(60.0, 30.0)
    assert not scores_higher(30.0, 60.0) and not scores_higher(100.0, 100.0) and not scores_higher(0.0, 0.0)
    assert not scores_higher(100.0, None) and not scores_higher(None, 0.0)


# ----------------------------------------------------------------------------------------------------
# one pair, hand-made records


def test_compare_pair_counts_on_the_shared_questions_only() -> None:
    first = _records([
        (1, "red", 100.0),      # same answer, same score
        (2, "Two", 100.0),      # same after normalisation ("2")
        (3, "cat", 100.0),      # A right, B wrong (gap 100)
        (4, "blue", 60.0),      # A higher (gap 30)
        (5, "no", 0.0),         # B right
        (6, "car", 0.0),        # different answers, both 0: neither higher
        (7, "tree", 100.0),     # only A has it
        ("x8", "left", None),   # different answers, unscored (a split without answers): neither higher
    ])
    second = _records([
        (9, "sky", 100.0),      # only B has it
        (1, "red", 100.0),
        (2, "2", 100.0),
        (3, "dog", 0.0),
        (4, "green", 30.0),
        (5, "yes", 100.0),
        (6, "bus", 0.0),
        ("x8", "right", None),
    ])
    pair = compare_pair(first, second, examples_per_kind=5)
    assert shared_keys(first, second) == ["1", "2", "3", "4", "5", "6", "x8"]  # in the first run's order
    assert (pair.shared, pair.same, pair.scored) == (7, 2, 6)
    assert (pair.a_better, pair.b_better, pair.different_tie) == (2, 1, 2)
    assert pair.agreement == round(100 * 2 / 7, 2)
    # every disagreement falls in exactly one kind
    assert pair.a_better + pair.b_better + pair.different_tie == pair.shared - pair.same
    # largest accuracy gap first, then record order
    assert pair.examples == {A_BETTER: ("3", "4"), B_BETTER: ("5",), DIFFERENT_TIE: ("6", "x8")}
    assert pair.different_question == 0
    assert [pair.count(kind) for kind in KINDS] == [2, 1, 2]


def test_compare_pair_examples_are_capped_and_deterministic() -> None:
    first = _records([(i, "a", 100.0 if i % 2 else 60.0) for i in range(10)])
    second = _records([(i, "b", 0.0) for i in range(10)])
    pair = compare_pair(first, second, examples_per_kind=3)
    assert pair.a_better == 10
    assert pair.examples[A_BETTER] == ("1", "3", "5")  # the 100-vs-0 questions before the 60-vs-0 ones
    assert compare_pair(first, second, examples_per_kind=3) == pair
    assert compare_pair(first, second, examples_per_kind=0).examples[A_BETTER] == ()


def test_compare_pair_with_nothing_shared_and_with_different_questions() -> None:
    empty = compare_pair(_records([(1, "a", 0.0)]), _records([(2, "a", 0.0)]))
    assert empty.shared == 0 and empty.agreement is None and empty.examples == {k: () for k in KINDS}
    first = _records([(1, "a", 0.0), (2, "b", 0.0)])
    second = _records([(1, "a", 0.0), (2, "b", 0.0)])
    second["2"]["question"] = "another question?"
    assert compare_pair(first, second).different_question == 1


# ----------------------------------------------------------------------------------------------------
# several runs


def test_compare_runs_gives_every_pair_a_symmetric_matrix_and_the_shared_counts() -> None:
    first = _records([(1, "red", 100.0), (2, "cat", 100.0), (3, "one", 100.0), (4, "up", 0.0)])
    second = _records([(1, "red", 100.0), (2, "dog", 0.0), (3, "1", 100.0)])
    third = _records([(1, "blue", 0.0), (3, "2", 0.0)])
    agreement = compare_runs([first, second, third], examples_per_kind=1)
    assert [(p.a, p.b) for p in agreement.pairs] == [(0, 1), (0, 2), (1, 2)]
    assert agreement.question_counts == (4, 3, 2)
    assert agreement.shared_by_all == 2  # questions 1 and 3
    assert [p.shared for p in agreement.pairs] == [3, 2, 2]
    matrix = agreement.matrix()
    assert matrix[0][1] == matrix[1][0] == round(100 * 2 / 3, 2)
    assert matrix[0][2] == matrix[2][0] == 0.0
    assert matrix[1][2] == 0.0
    assert [matrix[i][i] for i in range(3)] == [100.0, 100.0, 100.0]
    assert agreement.pair(0, 2).a_better == 2 and agreement.pair(1, 2).a_better == 2
    assert example_keys(agreement) == ["2", "1"]  # each pair's examples, first seen first, no repeats
    assert compare_runs([first, {}]).matrix() == [[100.0, None], [None, None]]


# ----------------------------------------------------------------------------------------------------
# method families


def test_method_family_from_method_and_answer_stage() -> None:
    assert method_family({"method": "blip2"}) == END_TO_END
    assert method_family({"method": "pnp-vqa"}) == CAPTION_PIPELINE
    assert method_family({"name": "img2llm-opt-13b"}) == CAPTION_PIPELINE  # guessed from the name
    # a new VLM method: the answer stage reads the image
    vlm = {"method": "idefics-fewshot", "answer": "vlm",
           "stages": {"vlm": {"type": "capvqa.stages.vlm_answer.VLMAnswerer"}}}
    assert method_family(vlm) == END_TO_END
    fewshot = {"method": "idefics", "answer": "vlm",
               "stages": {"vlm": {"type": "capvqa.stages.vlm_fewshot_answer.VLMFewShotAnswerer"}}}
    assert method_family(fewshot) == END_TO_END
    assert method_family({"name": "my-pipeline", "answer": "x", "stages": {"x": {"type": "a.B"}}}) is None
    assert method_family({}) is None


@pytest.mark.parametrize(("name", "family"), [
    ("blip2", END_TO_END), ("instructblip", END_TO_END), ("llava", END_TO_END), ("qwen2-vl-7b", END_TO_END),
    ("pnp-vqa", CAPTION_PIPELINE), ("img2llm", CAPTION_PIPELINE), ("pica", CAPTION_PIPELINE),
])
def test_shipped_pipelines_have_a_family(name: str, family: str) -> None:
    assert method_family(load_spec(name).to_dict()) == family


# ----------------------------------------------------------------------------------------------------
# a report over two runs of different methods (synthetic run folders)


def _as_method(run_dir: Path, name: str, method: str) -> Path:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["name"], config["method"] = name, method
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir


@pytest.fixture(scope="module")
def e2e_vs_captions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A caption pipeline over the whole sample and an end-to-end model over part of it."""
    root = tmp_path_factory.mktemp("agreement-runs")
    captions = make_run(root / "pnp", wrong_every=3)
    subset = [1000, 1001, 1002, 1003, 2000, 2001, 2002, 3000, 3001, 5000]
    vlm = _as_method(make_run(root / "vlm", wrong_every=4, question_ids=subset), "blip2", "blip2")
    return captions, vlm


def _expected_pair(first: Path, second: Path) -> tuple[int, int, int, int]:
    """(shared, same answer, first higher, second higher) straight from the two records.jsonl files."""
    def read(path: Path) -> dict[str, dict[str, Any]]:
        return {str(r["question_id"]): r for r in map(json.loads, (path / "records.jsonl").read_text().splitlines())}
    a, b = read(first), read(second)
    shared = [k for k in a if k in b]
    same = sum(normalize_prediction(a[k]["answer"]) == normalize_prediction(b[k]["answer"]) for k in shared)
    higher = sum(a[k]["accuracy"] > b[k]["accuracy"] for k in shared)
    lower = sum(a[k]["accuracy"] < b[k]["accuracy"] for k in shared)
    return len(shared), same, higher, lower


def test_report_over_two_methods_shows_agreement_in_every_output(e2e_vs_captions: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    captions, vlm = e2e_vs_captions
    html_path, md_path, json_path = tmp_path / "r.html", tmp_path / "r.md", tmp_path / "r.json"
    data = build_report([captions, vlm], html_path=html_path, markdown_path=md_path, json_path=json_path,
                        gallery_limit=6, agreement_examples=2)
    shared, same, higher, lower = _expected_pair(captions, vlm)
    assert shared == 10 and 0 < higher and 0 < lower  # the fixture has disagreements of both kinds
    pair = data.agreement.pairs[0]
    assert (pair.shared, pair.same, pair.a_better, pair.b_better) == (shared, same, higher, lower)
    assert data.agreement.question_counts == (37, 10) and data.agreement.shared_by_all == 10
    assert any("different questions" in note and "10 are shared" in note for note in data.notes)

    report = json.loads(json_path.read_text())
    assert [(r["label"], r["method"], r["family"]) for r in report["runs"]] == [
        ("pnp", "pnp-vqa", CAPTION_PIPELINE), ("vlm", "blip2", END_TO_END)]
    agreement = report["agreement"]
    assert agreement["shared_by_all"] == 10 and agreement["question_counts"] == [37, 10]
    assert agreement["matrix"][0][1] == agreement["matrix"][1][0] == round(100 * same / shared, 2)
    (pair_json,) = agreement["pairs"]
    assert (pair_json["a"], pair_json["b"], pair_json["a_better"], pair_json["b_better"]) == \
        ("pnp", "vlm", higher, lower)
    for kind, sign, count in ((A_BETTER, 1, higher), (B_BETTER, -1, lower)):
        examples = pair_json["examples"][kind]
        assert len(examples) == min(2, count)
        for example in examples:
            assert sign * (example["a"]["accuracy"] - example["b"]["accuracy"]) > 0
            assert example["gt_answers"] and example["question"]
    # the HTML embeds the same JSON
    meta = re.search(r'<script type="application/json" id="report-meta">(.*?)</script>', html_path.read_text(),
                     re.DOTALL)
    assert meta is not None and json.loads(meta.group(1))["agreement"]["pairs"][0]["a_better"] == higher

    html = html_path.read_text()
    assert 'id="agreement"' in html and "PNP-VQA, caption pipeline" in html and "BLIP-2, end-to-end" in html
    assert "pnp right, vlm wrong" in html and "vlm right, pnp wrong" in html
    # examples have their images (from the existing thumbnail code) but are not gallery items
    shown = example_keys(data.agreement)
    assert html.count('class="thumb"') == len(shown) == min(2, higher) + min(2, lower) + min(2, pair.different_tie)
    assert html.count('<article class="item') == 6
    assert set(shown) <= set(data.thumbnails)
    in_gallery = {item.qid for item in data.gallery} & set(shown)
    assert html.count(">in the gallery</a>") == len(in_gallery)

    markdown = md_path.read_text()
    assert "| pnp (PNP-VQA, caption pipeline) | — |" in markdown
    assert f"| pnp | vlm | {shared} | {same} | {pair.agreement:.2f} | {shared} | {higher} | {lower} |" in markdown
    assert "Examples, pnp vs vlm:" in markdown
    assert markdown.count("| pnp right, vlm wrong") == min(2, higher)
    assert markdown.count("| vlm right, pnp wrong") == min(2, lower)


def test_a_single_run_has_no_agreement(e2e_vs_captions: tuple[Path, Path], tmp_path: Path) -> None:
    data = build_report([e2e_vs_captions[1]], json_path=tmp_path / "one.json", markdown_path=tmp_path / "one.md",
                        thumbnails=False)
    assert data.agreement is None
    assert json.loads((tmp_path / "one.json").read_text())["agreement"] is None
    assert "agreement" not in (tmp_path / "one.md").read_text()


def test_an_unfinished_run_is_compared_on_nothing(e2e_vs_captions: tuple[Path, Path], tmp_path: Path) -> None:
    unfinished = make_run(tmp_path / "unfinished", question_ids=[1000, 1001])
    (unfinished / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    data = collect_report(load_runs([e2e_vs_captions[0], unfinished]), thumbnails=False)
    assert data.agreement.pairs[0].shared == 0 and data.agreement.matrix()[0][1] is None


def test_report_command_writes_json_and_prints_the_agreement(e2e_vs_captions: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from capvqa.cli.report import report

    app = typer.Typer()
    app.command("report")(report)
    app.command("noop")(lambda: None)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["report", *map(str, e2e_vs_captions), "--out", str(tmp_path / "r.html"),
                                      "--json", str(out), "--no-thumbnails"])
    assert result.exit_code == 0, result.output
    shared, same, higher, lower = _expected_pair(*e2e_vs_captions)
    assert f"pnp vs vlm: same answer on {100 * same / shared:.2f}% of {shared} shared questions" in result.output
    assert f"pnp right where vlm is wrong on {higher}, the reverse on {lower}" in result.output.replace("\n", " ")
    assert json.loads(out.read_text())["agreement"]["pairs"][0]["shared"] == shared
    folder = CliRunner().invoke(app, ["report", str(e2e_vs_captions[0]), "--json", str(tmp_path)])
    assert folder.exit_code != 0 and "is a folder" in str(folder.exception)  # capvqa's app prints it


# ----------------------------------------------------------------------------------------------------
# the real thing on the tiny zoo


def _capvqa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capvqa", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_report_compares_an_end_to_end_model_with_a_caption_pipeline(tmp_path: Path, tiny_zoo: Any) -> None:
    runs = {"blip2": ["--set", "vlm.max_new_tokens=3"],
            "pnp-vqa": ["--set", "captioning.num_captions=4", "--set", "captioning.num_patches=4"]}
    for name, options in runs.items():
        result = _capvqa("run", name, "--dataset", "sample", "--models", "tiny", "--limit", "4",
                         "--out", str(tmp_path / name), "--no-report", *options)
        assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "report.json"
    result = _capvqa("report", str(tmp_path / "blip2"), str(tmp_path / "pnp-vqa"), "--out", str(tmp_path / "r.html"),
                     "--markdown", str(tmp_path / "r.md"), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["family"] for r in report["runs"]] == [END_TO_END, CAPTION_PIPELINE]
    (pair,) = report["agreement"]["pairs"]
    shared, same, higher, lower = _expected_pair(tmp_path / "blip2", tmp_path / "pnp-vqa")
    assert (pair["shared"], pair["same_answer"], pair["a_better"], pair["b_better"]) == (4, same, higher, lower)
    assert "blip2 vs pnp-vqa: same answer on" in result.stdout
    assert "BLIP-2, end-to-end" in (tmp_path / "r.md").read_text()
