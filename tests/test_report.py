"""capvqa report: summary tables, deltas, config differences, published numbers, escaping, SVG, CLI.

Run folders are synthesised from the bundled sample (real questions, human answers and images, made-up
answers and stage records), so the tests are fast and the numbers are known.
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from capvqa.report.build import build_report, collect_report, write_run_reports
from capvqa.report.gallery import select_gallery
from capvqa.report.htmlkit import Markup, escape, script_json, tag
from capvqa.report.markdown_report import md_cell
from capvqa.report.published import dataset_key, lookup_published
from capvqa.report.runs import light_record, load_run, load_runs
from capvqa.report.summary import (
    ABSENT,
    accuracy_rows,
    answers_disagree,
    differing_config_keys,
    score_run,
    stage_timings,
    sweep_key,
)
from capvqa.report.svg import grouped_hbar_chart, line_chart, nice_ticks, stacked_hbar_chart
from capvqa.report.thumbnails import heatmap_png, relevance_grid

EVIL_QUESTION = "What is <script>alert(1)</script> this </script> & that?"


# ----------------------------------------------------------------------------------------------------
# synthetic run folders


def _base_config(num_captions: int, *, tiny: bool = False, dataset: str = "sample") -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "pnp-vqa",
        "method": "pnp-vqa",
        "description": "PNP-VQA base",
        "seed": 42,
        "models": {"itm": "Salesforce/blip-itm-large-coco", "captioner": "Salesforce/blip-image-captioning-large",
                   "reader": "allenai/unifiedqa-v2-t5-base-1363200"},
        "stages": {
            "matching": {"type": "capvqa.stages.gradcam_matching.GradCamMatching", "model": "itm", "block_num": 7},
            "captioning": {"type": "capvqa.stages.patch_captioning.PatchCaptioning", "model": "captioner",
                           "inputs": {"relevance": "matching"}, "num_captions": num_captions, "num_patches": 20},
            "llm": {"type": "tests.FakeLLM", "model": "reader", "inputs": {"captions": "captioning"}},
        },
        "answer": "llm",
        "run": {"dataset": dataset, "lemmatize": "none", "device": "cpu", "dtype": "float32"},
    }
    if tiny:
        config["models_preset"] = "tiny"
    return config


def _relevance(question_id: int, rows: int = 24, cols: int = 24) -> list[float]:
    cy, cx = (question_id * 7) % rows, (question_id * 11) % cols
    return [float(f"{1e-8 * math.exp(-((r - cy) ** 2 + (c - cx) ** 2) / 18.0):.6g}")
            for r in range(rows) for c in range(cols)]


def make_run(
    path: Path,
    *,
    num_captions: int = 10,
    wrong_every: int = 3,
    tiny: bool = False,
    evil: bool = False,
    dataset: str = "sample",
    question_ids: list[int] | None = None,
) -> Path:
    """A run folder like `capvqa run` writes, over the bundled sample, with made-up answers: every
    ``wrong_every``-th question gets a wrong answer, the others the most common human answer."""
    from capvqa.data.datasets import open_dataset
    from capvqa.eval.accuracy import score_predictions
    from capvqa.eval.normalize import question_accuracy

    items = list(open_dataset("sample", question_ids=question_ids))
    path.mkdir(parents=True, exist_ok=True)
    config = _base_config(num_captions, tiny=tiny, dataset=dataset)
    predictions: dict[Any, str] = {}
    lines = []
    for index, item in enumerate(items):
        top = max(set(item.answers), key=list(item.answers).count)
        answer = "purple elephant" if index % wrong_every == 0 else top
        question = EVIL_QUESTION if evil and index == 1 else item.question
        predictions[item.question_id] = answer
        captions = [f"a picture of thing {k} <b>bold</b> for {item.question_id}" for k in range(num_captions)]
        prompt = ("Please reason the answer of the questions according to the given contexts.\n"
                  f"Contexts: {captions[0]}.\nQuestion: is it a toilet?\nAnswer: no\n"
                  f"Question: {question}\nAnswer:")
        lines.append({
            "question_id": item.question_id,
            "image_id": item.image_id,
            "question": question,
            "answer": answer,
            "gt_answers": list(item.answers),
            "answer_type": item.answer_type,
            "question_type": item.question_type,
            "accuracy": round(100 * question_accuracy(answer, item.answers), 2),
            "stages": {
                "matching": {"relevance": _relevance(int(item.question_id)), "grid": [24, 24],
                             "matching_text": question.lower(), "match_logit": 1.5},
                "captioning": {"captions": captions, "rounds": 1, "draws": num_captions, "patches_per_caption": 20},
                "llm": {"answer": answer, "prompts": [prompt], "questions": ["what is it?", "what color?"],
                        "answers": ["a thing", "red"], "examples": [{"question": "q </script>", "answer": "a"}],
                        "mystery": {"nested": list(range(40))}},
            },
        })
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with (path / "records.jsonl").open("w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    (path / "predictions.json").write_text(json.dumps([{"question_id": k, "answer": v} for k, v in predictions.items()]))
    metrics = score_predictions(items, predictions).to_json()
    (path / "metrics.json").write_text(json.dumps(metrics))
    stages = {name: {"computed": len(items), "cached": 0, "compute_seconds": seconds * len(items),
                     "wall_seconds": seconds * len(items) + 0.5, "setup_seconds": 0.5,
                     "seconds_per_computed_item": seconds}
              for name, seconds in (("matching", 0.01), ("captioning", 0.002 * num_captions), ("llm", 0.05))}
    (path / "timings.json").write_text(json.dumps({"pipeline": "pnp-vqa", "device": "cpu", "dtype": "float32",
                                                   "num_questions": len(items), "total_seconds": 3.2,
                                                   "stages": stages}))
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report-runs")
    return (make_run(root / "captions10", num_captions=10, wrong_every=3, evil=True),
            make_run(root / "captions5", num_captions=5, wrong_every=4, evil=True))


# ----------------------------------------------------------------------------------------------------
# published numbers


def _config(**changes: Any) -> dict[str, Any]:
    config = _base_config(100)
    for dotted, value in changes.items():
        node = config
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config


@pytest.mark.parametrize(
    ("reader", "dataset", "split", "expected"),
    [
        ("allenai/unifiedqa-v2-t5-base-1363200", "vqav2", "val2014", 54.3),
        ("allenai/unifiedqa-v2-t5-base-1363200", "vqav2", None, 54.3),
        ("allenai/unifiedqa-v2-t5-base-1363200", "hf:lmms-lab/VQAv2", "testdev", 55.2),
        ("allenai/unifiedqa-v2-t5-large-1363200", "okvqa", "val2014", 27.1),
        ("allenai/unifiedqa-v2-t5-large-1363200", "hf:lmms-lab/OK-VQA", "val2014", 27.1),
        ("allenai/unifiedqa-v2-t5-3b-1363200", "hf:lmms-lab/GQA", "testdev_balanced", 42.3),
        ("/models/unifiedqa-v2-t5-3b-1363200", "vqav2", "val2014", 62.1),
    ],
)
def test_published_pnp_vqa(reader: str, dataset: str, split: str | None, expected: float) -> None:
    config = _config(models__reader=reader, run__dataset=dataset)
    config["run"]["split"] = split
    found = lookup_published(config)
    assert found.applies and found.result is not None
    assert found.result.accuracy == expected
    assert found.caveats == ()


def test_published_does_not_apply_to_tiny_models() -> None:
    config = _config(run__dataset="vqav2", run__split="val2014", models_preset="tiny")
    found = lookup_published(config)
    assert not found.applies
    assert "tiny" in found.reason and "do not apply" in found.reason


def test_published_reasons_and_caveats() -> None:
    assert "sample" in lookup_published(_config()).reason  # no paper reports the sample
    unknown_reader = lookup_published(_config(models__reader="t5-small", run__dataset="vqav2"))
    assert not unknown_reader.applies and "t5-small" in unknown_reader.reason
    subset = lookup_published(_config(run__dataset="vqav2", run__limit=100), num_questions=100)
    assert subset.applies and any("100 questions" in c for c in subset.caveats)
    other_itm = lookup_published(_config(run__dataset="vqav2", models__itm="Salesforce/blip-itm-base-coco"))
    assert other_itm.applies and any("blip-itm-base-coco" in c for c in other_itm.caveats)


def test_published_img2llm_and_pica() -> None:
    img2llm = {"method": "img2llm", "models": {"llm": "facebook/opt-66b"}, "run": {"dataset": "okvqa"}}
    assert lookup_published(img2llm).result.accuracy == 43.2
    img2llm["models"]["llm"] = "facebook/opt-13b"
    img2llm["run"] = {"dataset": "vqav2", "split": "test-dev2015"}
    assert lookup_published(img2llm).result.accuracy == 57.3
    img2llm["models"]["llm"] = "facebook/opt-6.7b"
    assert not lookup_published(img2llm).applies  # the paper gives no 6.7B number
    pica = {"method": "pica", "models": {"llm": "gpt-3-davinci"}, "run": {"dataset": "okvqa"},
            "stages": {"llm": {"n_shot": 16, "n_ensemble": 5, "use_tags": True}}}
    assert lookup_published(pica).result.accuracy == 48.0
    pica["stages"]["llm"]["use_tags"] = False
    assert lookup_published(pica).result.accuracy == 46.9


def test_shipped_pica_configs_map_to_their_published_settings() -> None:
    """Tags are used exactly when a stage reads a tags input (pica-full), as the prompt stage decides."""
    from capvqa.engine.config import load_spec
    from capvqa.report.published import model_size

    full = load_spec("pica-full").to_dict()
    assert model_size("pica", full["models"], full) == ("full+tags", "")
    plain = load_spec("pica", ["examples.n_ensemble=5"]).to_dict()
    assert model_size("pica", plain["models"], plain) == ("full", "")


def test_dataset_key_mapping() -> None:
    assert dataset_key({"dataset": "okvqa"}) == "okvqa-test"
    assert dataset_key({"dataset": "vqav2", "split": "train2014"}) is None
    assert dataset_key({"dataset": "sample"}) is None


# ----------------------------------------------------------------------------------------------------
# summary, deltas, config differences


def test_score_run_without_metrics_uses_record_means() -> None:
    records = [
        {"question_id": 1, "accuracy": 100.0, "answer_type": "yes/no", "question_type": "is the"},
        {"question_id": 2, "accuracy": 0.0, "answer_type": "yes/no", "question_type": "is the"},
        {"question_id": 3, "accuracy": 60.0, "answer_type": "other", "question_type": "what"},
    ]
    scores = score_run("a", records, None)
    assert scores.overall == pytest.approx(53.33)
    assert scores.per_answer_type == {"yes/no": 50.0, "other": 60.0}
    assert scores.question_type_counts == {"is the": 2, "what": 1}


def test_accuracy_rows_deltas_against_first_run() -> None:
    a = score_run("a", [], {"overall": 50.0, "per_answer_type": {"other": 40.0}, "per_question_type": {}})
    b = score_run("b", [], {"overall": 55.5, "per_answer_type": {"other": 38.25, "number": 10.0},
                            "per_question_type": {}})
    rows = {r.name: r for r in accuracy_rows([a, b])}
    assert rows["overall"].deltas == (0.0, 5.5)
    assert rows["other"].deltas == (0.0, -1.75)
    assert rows["number"].values == (None, 10.0) and rows["number"].deltas == (None, None)


def test_differing_config_keys() -> None:
    first = {"name": "x", "stages": {"captioning": {"num_captions": 10, "top_k": 50}}, "run": {"dataset": "sample"}}
    second = {"name": "x", "stages": {"captioning": {"num_captions": 5, "top_k": 50}}, "run": {"dataset": "sample",
                                                                                             "limit": 8}}
    assert differing_config_keys([first, second]) == [
        ("stages.captioning.num_captions", (10, 5)),
        ("run.limit", (ABSENT, 8)),
    ]
    assert differing_config_keys([first, first]) == []


def test_sweep_key_prefers_known_numeric_stage_params() -> None:
    differences = [("seed", (1, 2)), ("stages.reader.batch_size", (4, 8)), ("stages.x.temperature", (0.1, 0.2)),
                   ("stages.llm.n_shot", (4, 16))]
    assert sweep_key(differences) == "stages.llm.n_shot"
    assert sweep_key([("seed", (1, 2))]) is None
    assert sweep_key([("stages.x.flag", (True, False))]) is None


def test_stage_timings_marks_fully_cached_stages() -> None:
    rows = stage_timings({"stages": {"a": {"computed": 0, "cached": 5, "seconds_per_computed_item": 0.0},
                                     "b": {"computed": 4, "cached": 0, "compute_seconds": 2.0}}})
    assert rows[0].seconds_per_item is None and rows[0].cached == 5
    assert rows[1].seconds_per_item == 0.5


def test_answers_disagree() -> None:
    assert not answers_disagree(["Red ", "red"])
    assert answers_disagree(["red", "blue"])
    assert not answers_disagree(["red", None])


def test_gallery_selection_is_capped_and_balanced() -> None:
    first = {str(i): {"answer": "x", "accuracy": 0.0 if i % 2 else 100.0} for i in range(100)}
    second = {str(i): {"answer": "y" if i % 10 == 0 else "x", "accuracy": 0.0} for i in range(100)}
    keys = select_gallery([first, second], 12)
    assert len(keys) == 12
    assert keys == sorted(keys, key=int)  # record order kept
    assert sum(1 for k in keys if int(k) % 10 == 0) >= 3  # disagreements get their share
    assert select_gallery([first], 1000) == list(first)


# ----------------------------------------------------------------------------------------------------
# loading


def test_light_record_skips_stages_and_falls_back() -> None:
    line = json.dumps({"question_id": 1, "question": 'a ", "stages": x', "answer": "b", "stages": {"s": [1] * 5}})
    assert light_record(line) == {"question_id": 1, "question": 'a ", "stages": x', "answer": "b"}
    compact = json.dumps({"stages": {}, "question_id": 2}, separators=(",", ":"))
    assert light_record(compact) == {"question_id": 2}
    assert light_record("{broken") is None


def test_load_run_reads_light_records_and_full_records_by_offset(two_runs: tuple[Path, Path]) -> None:
    run = load_run(two_runs[0])
    assert run.problems == []
    assert "stages" not in run.records[0]
    keys = [str(run.records[5]["question_id"]), str(run.records[0]["question_id"])]
    full = run.full_records(keys)
    assert set(full) == set(keys)
    assert full[keys[0]]["stages"]["captioning"]["captions"]


def test_load_run_tolerates_missing_and_broken_files(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "partial", question_ids=[1000, 1001, 1002])
    (run_dir / "timings.json").unlink()
    (run_dir / "metrics.json").write_text("{not json")
    with (run_dir / "records.jsonl").open("a") as handle:
        handle.write('{"question_id": 5, "trunc')
    run = load_run(run_dir)
    assert len(run.records) == 3
    assert any("unreadable" in p for p in run.problems) and any("metrics.json" in p for p in run.problems)
    data = collect_report([run], thumbnails=False)
    assert data.runs[0].scores.overall is not None  # from the records' accuracies
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------
# rendering: escaping, structure, SVG


class _TagBalance(HTMLParser):
    """Checks that every non-void element is closed in order (a cheap well-formedness check)."""

    VOID = frozenset({"meta", "img", "input", "br", "hr", "link", "source", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag_name: str, attrs: list) -> None:
        if tag_name not in self.VOID:
            self.stack.append(tag_name)

    def handle_startendtag(self, tag_name: str, attrs: list) -> None:
        pass

    def handle_endtag(self, tag_name: str) -> None:
        if not self.stack or self.stack[-1] != tag_name:
            self.errors.append(f"unexpected </{tag_name}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_html_report_escapes_everything_and_is_well_formed(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    html_path, md_path = tmp_path / "r.html", tmp_path / "r.md"
    build_report(list(two_runs), html_path=html_path, markdown_path=md_path,
                 labels=["ten</script><b>x", "five"], thumbnails=False)
    text = html_path.read_text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    # exactly two script elements (metadata JSON and the filter code); data never closes one early
    assert text.count("<script") == 2 and text.lower().count("</script") == 2
    meta = re.search(r'<script type="application/json" id="report-meta">(.*?)</script>', text, re.DOTALL)
    assert meta is not None and json.loads(meta.group(1))["runs"][0]["label"] == "ten</script><b>x"
    checker = _TagBalance()
    checker.feed(text)
    assert checker.errors == [] and checker.stack == []
    for svg in re.findall(r"<svg.*?</svg>", text, re.DOTALL):
        ET.fromstring(svg)  # every inline chart is well-formed XML
    assert 'id="chart-sweep"' in text  # the runs differ in num_captions
    assert "stages.captioning.num_captions" in text
    assert "LLM prompt" in text and "synthetic question" in text and "in-context examples" in text
    markdown = md_path.read_text()
    assert "<script>" not in markdown and "Δ vs ten" in markdown
    assert "| stages.captioning.num_captions | 10 | 5 |" in markdown


def test_report_numbers_match_metrics(two_runs: tuple[Path, Path]) -> None:
    data = collect_report(load_runs(list(two_runs)), thumbnails=False)
    metrics = [json.loads((p / "metrics.json").read_text()) for p in two_runs]
    overall = data.rows[0]
    assert overall.values == (metrics[0]["overall"], metrics[1]["overall"])
    assert overall.deltas[1] == round(metrics[1]["overall"] - metrics[0]["overall"], 2)
    assert data.sweep == "stages.captioning.num_captions"
    assert any(item.disagree for item in data.gallery)
    assert all(not v.published.applies for v in data.runs)  # the sample has no published number


def test_tiny_runs_say_published_numbers_do_not_apply(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "tiny", tiny=True, question_ids=[1000, 1001])
    data = build_report([run_dir], html_path=tmp_path / "t.html", markdown_path=tmp_path / "t.md",
                        thumbnails=False)
    assert data.runs[0].published_delta is None
    assert "published numbers do not apply" in (tmp_path / "t.html").read_text()
    assert "published numbers do not apply" in (tmp_path / "t.md").read_text()


def test_thumbnails_and_heatmaps_are_embedded(two_runs: tuple[Path, Path]) -> None:
    data = collect_report(load_runs([two_runs[0]]), gallery_limit=5)
    assert len(data.gallery) == 5
    assert set(data.thumbnails) == {item.qid for item in data.gallery}
    assert set(data.heatmaps) == {item.qid for item in data.gallery}


def test_missing_dataset_means_no_thumbnails_not_failure(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "elsewhere", dataset="vqav2", question_ids=[1000, 1001])
    html_path, md_path = write_run_reports(run_dir)
    text = html_path.read_text()
    assert 'class="photo"' not in text and "images not available" in text
    assert md_path.is_file()


def test_write_run_reports_is_fast_on_thousands_of_records(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "big", question_ids=[1000, 1001])
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    base = json.loads(lines[0])
    base["stages"]["captioning"]["captions"] = [f"a long caption number {k} about things" for k in range(100)]
    with (run_dir / "records.jsonl").open("w") as handle:
        for i in range(3000):
            base["question_id"] = 100000 + i
            base["accuracy"] = float((i % 4) * 30)
            base["answer_type"] = ("yes/no", "number", "other")[i % 3]
            handle.write(json.dumps(base) + "\n")
    (run_dir / "metrics.json").unlink()
    started = time.perf_counter()
    html_path, _ = write_run_reports(run_dir, gallery_limit=100)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, elapsed
    assert html_path.stat().st_size < 8_000_000
    assert html_path.read_text().count('<article class="item') == 100


def test_svg_charts_are_valid_xml() -> None:
    bars = grouped_hbar_chart(["yes/no", "a <b> & c"], [("run <1>", [50.0, None]), ("run 2", [60.0, 10.0])],
                              title="t & <t>", x_max=100)
    stacked = stacked_hbar_chart(["r1", "r2"], ["matching", "captioning"], [[0.1, 0.2], [None, 0.3]], title="s")
    lines = line_chart([("overall", [(5.0, 40.0), (10.0, 45.0)])], title="l", x_label="num_captions", y_max=100)
    for svg in (bars, stacked, lines):
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "a &lt;b&gt; &amp; c" in bars
    assert nice_ticks(100) == [0, 20, 40, 60, 80, 100]


def test_heatmap_png_checks_the_grid() -> None:
    assert heatmap_png([0.1] * 10, [3, 3]) is None
    scaled = relevance_grid([1.0, 2.0, 3.0, 5.0], [2, 2])
    assert scaled is not None and scaled.min() == 0.0 and scaled.max() == 1.0
    png = heatmap_png(_relevance(3), [24, 24])
    assert png is not None and png.startswith(b"\x89PNG")


def test_htmlkit_escapes_by_construction() -> None:
    assert tag("p", {"title": '"><x>'}, "<i>", Markup("<b>ok</b>")) == \
        '<p title="&quot;&gt;&lt;x&gt;">&lt;i&gt;<b>ok</b></p>'
    assert escape(None) == ""
    assert tag("input", {"checked": True, "disabled": False}) == "<input checked>"
    with pytest.raises(ValueError):
        tag("p", {'onclick="x"': 1})
    encoded = script_json({"q": "</script><!-- & \u2028"})
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert json.loads(encoded) == {"q": "</script><!-- & \u2028"}


def test_md_cell_escapes_table_breakers() -> None:
    assert md_cell("a|b\nc <x>") == "a\\|b c &lt;x&gt;"


# every character a question may carry that HTML forbids (C0 but tab/newline/CR, DEL, C1) or UTF-8 cannot encode
CONTROL_QUESTION = "what\x00is\x01this\x08\x0b\x0c\x1b[31m\x7f\x85\x9f\ud800 thing?\tok"
INVALID_IN_DOCUMENTS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def test_clean_text_shows_controls_as_visible_stand_ins() -> None:
    from capvqa.report.htmlkit import clean_text

    assert clean_text("a\x00b\x1bc\x7fd\x85e\ud800f\tg\nh\ri") == "a\u2400b\u241bc\u2421d\ufffde\ufffdf\tg\nh\ri"
    assert clean_text("plain") == "plain"
    assert escape("<\x00>") == "&lt;\u2400&gt;" and tag("p", {"title": "\x01"}) == '<p title="\u2401"></p>'
    assert json.loads(script_json({"q": "\x00\x85"})) == {"q": "\x00\ufffd"}  # JSON escapes C0 itself
    assert md_cell("a\x00b\x1fc") == "a\u2400b\u241fc"  # \x1f is whitespace to str.split: kept visible


def test_report_with_control_characters_in_questions_is_valid_html_and_text(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "controls", question_ids=[1000, 1001])
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in records:
        record["question"] = record["stages"]["matching"]["matching_text"] = CONTROL_QUESTION
        record["answer"] = "no\x00pe"
    # ensure_ascii keeps the lone surrogate writable; json.loads gives it back as it would from any JSON file
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html_path, md_path = tmp_path / "c.html", tmp_path / "c.md"
    build_report([run_dir], html_path=html_path, markdown_path=md_path, labels=["label\x00\x1b"],
                 thumbnails=False)
    text = html_path.read_bytes().decode("utf-8")  # strict: a lone surrogate could not have been written
    assert not INVALID_IN_DOCUMENTS.search(text)
    assert "what\u2400is\u2401this" in text and "no\u2400pe" in text and "label\u2400\u241b" in text
    checker = _TagBalance()
    checker.feed(text)
    assert checker.errors == [] and checker.stack == []
    markdown = md_path.read_bytes().decode("utf-8")
    assert not INVALID_IN_DOCUMENTS.search(markdown) and "label\u2400\u241b" in markdown


# ----------------------------------------------------------------------------------------------------
# CLI


def test_report_command_on_a_local_typer_app(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from capvqa.cli.report import report

    app = typer.Typer()
    app.command("report")(report)
    app.command("noop")(lambda: None)  # two commands, so "report" is addressed by name as in capvqa
    out, md = tmp_path / "cli.html", tmp_path / "cli.md"
    result = CliRunner().invoke(app, ["report", str(two_runs[0]), str(two_runs[1]), "--out", str(out),
                                      "--markdown", str(md), "--gallery", "6", "--no-thumbnails"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and md.is_file()
    assert out.read_text().count('<article class="item') == 6
    assert "report written to" in result.output
    bad = CliRunner().invoke(app, ["report", str(two_runs[0]), "--label", "a", "--label", "b"])
    assert bad.exit_code != 0


def test_thumbnails_skip_ids_the_dataset_does_not_have(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "edited", question_ids=[1000, 2000])
    with (run_dir / "records.jsonl").open("a") as handle:
        handle.write(json.dumps({"question_id": 999999, "image_id": 5, "question": "?", "answer": "x",
                                 "stages": {}}) + "\n")
    data = collect_report(load_runs([run_dir]))
    assert set(data.thumbnails) == {"1000", "2000"}


def test_unannotated_and_odd_records_still_make_a_report(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "testdev", question_ids=[1000, 1001, 2000])
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("gt_answers", "answer_type", "question_type", "accuracy"):
            record.pop(key)
    records[0]["answer"] = None
    records[1]["accuracy"] = "n/a"
    records[2]["stages"] = ["not", "a", "dict"]
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "metrics.json").unlink()
    html_path, md_path = write_run_reports(run_dir)
    text = html_path.read_text()
    assert "No accuracy" in text and 'id="f-wrong"' not in text
    assert text.count('<article class="item') == 3
    assert "No accuracy" in md_path.read_text()


def test_stage_views_for_img2llm_and_pica_records() -> None:
    from capvqa.report.stage_views import render_stage

    extraction = render_stage("answer_extraction", {"answers": ["dog", "yes"], "counts": [3, 0], "extractor": "rule",
                                                    "answer_captions": {"dog": [0, 2], "yes": []}})
    assert "×3" in extraction and "rule" in extraction and "answer_captions" in extraction
    tags = render_stage("tags", {"tags": ["cat <x>"], "scores": [0.4123]})
    assert "cat &lt;x&gt;" in tags and "0.41" in tags
    llm = render_stage("llm", {"answer": "red", "candidates": [{"raw": "Red.", "logprob": -0.5}]})
    assert "<th>raw</th>" in llm and "Red." in llm
    filtered = render_stage("filter", {"captions": ["b", "a"], "scores": [0.6, 0.9], "all_scores": [0.6, 0.9, 0.1],
                                       "threshold": 0.5})
    assert filtered.index(">a ") < filtered.index(">b ") and "2 of 3 kept" in filtered
    pica = {"method": "pica", "models": {"llm": "gpt-3-davinci"}, "run": {"dataset": "okvqa"},
            "stages": {"examples": {"mode": "random", "n_shot": 16}, "prompt": {"n_ensemble": 1, "use_tags": True}}}
    assert lookup_published(pica).result.size == "base"
