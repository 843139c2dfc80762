"""Img2LLM and PICa end to end on the bundled sample with the tiny models."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from capvqa.data.datasets import open_dataset
from capvqa.engine.pipeline import Pipeline

PNP = ["captioning.num_captions=8", "captioning.num_patches=6"]
# Img2LLM samples its captions with PNP-VQA's settings inside its caption_filter stage (in-loop ITM filter)
IMG2LLM = ["caption_filter.num_captions=8", "caption_filter.num_patches=6"]


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_img2llm_shares_matching_with_pnp_vqa_and_filters_captions_in_the_loop(tmp_path, tiny_zoo):
    data = open_dataset("sample", limit=3)
    cache = tmp_path / "cache"
    Pipeline.from_yaml("pnp-vqa", PNP, models="tiny").run(data, cache_dir=cache, out_dir=tmp_path / "pnp")
    pnp_captions = {r["question_id"]: r["stages"]["captioning"]["captions"] for r in records(tmp_path / "pnp")}

    # threshold 0 keeps every distinct candidate: exactly PNP-VQA's captions (same patch and token streams;
    # 80 draws = PNP-VQA's 10 rounds of 8)
    everything = [*IMG2LLM, "caption_filter.threshold=0.0", "caption_filter.max_draws=80"]
    result = Pipeline.from_yaml("img2llm", everything, models="tiny").run(
        data, cache_dir=cache, out_dir=tmp_path / "img2llm")
    stats = {s.name: s for s in result.stage_stats}
    assert stats["matching"].computed == 0 and stats["matching"].cached == 3
    assert stats["matching"].setup_seconds == 0.0  # the model was never even loaded
    assert all(stats[name].computed == 3 for name in ("caption_filter", "answer_extraction",
                                                       "question_generation", "prompt", "llm"))
    scores = {}
    for record in records(tmp_path / "img2llm"):
        captions = record["stages"]["caption_filter"]
        assert captions["captions"] == pnp_captions[record["question_id"]]
        assert captions["kept"] == len(captions["scores"]) == 8 and captions["passed"] == captions["draws"]
        scores.update(zip(captions["captions"], captions["scores"]))
    first = records(tmp_path / "img2llm")[0]["stages"]
    assert "yes" in first["answer_extraction"]["answers"]  # always added (docs/methods.md#answer-extraction)
    assert first["answer_extraction"]["extractor"] in ("rule",) or first["answer_extraction"]["extractor"].startswith("spacy")
    qa = first["question_generation"]
    assert len(qa["questions"]) == len(qa["answers"]) == len(first["answer_extraction"]["answers"])
    prompt = first["prompt"]["prompts"][0]
    assert prompt.startswith("Please reason the answer of the questions according to the given contexts.\nContexts:")
    assert prompt.endswith("what color is the suit?\nAnswer:")
    assert first["llm"]["postprocess"].startswith("img2llm")
    config = (tmp_path / "img2llm" / "config.yaml").read_text()
    assert "task: vqav2" in config and "checkpoint: null" in config

    # the tiny ITM is random (its P(match) barely varies): at the median score about half the candidates
    # pass, so the loop refills; what it keeps passed the filter, and matching is still not recomputed
    median = sorted(scores.values())[len(scores) // 2]
    result = Pipeline.from_yaml("img2llm", [*IMG2LLM, f"caption_filter.threshold={median!r}",
                                            "caption_filter.max_draws=40"], models="tiny").run(
        data, cache_dir=cache, out_dir=tmp_path / "filtered")
    assert {s.name: s.computed for s in result.stage_stats}["matching"] == 0
    filtered = [r["stages"]["caption_filter"] for r in records(tmp_path / "filtered")]
    for captions in filtered:
        assert all(score >= median for score in captions["scores"])
        assert captions["kept"] == len(captions["captions"]) <= captions["passed"] <= captions["draws"] <= 40
        assert captions["kept"] == 8 or captions["draws"] == 40
        for caption, score in zip(captions["captions"], captions["scores"]):
            if caption in scores:  # drawn in the first rounds of both runs: the same score
                assert score == pytest.approx(scores[caption], abs=1e-6)
    assert any(captions["draws"] > 8 for captions in filtered)
    assert any(captions["passed"] < captions["draws"] for captions in filtered)

    # the whole-image filter stays selectable: PNP-VQA's matching and captions, all from the cache
    result = Pipeline.from_yaml("img2llm-whole-image-filter", [*PNP, "caption_filter.threshold=0.0"],
                                models="tiny").run(data, cache_dir=cache, out_dir=tmp_path / "whole")
    stats = {s.name: s for s in result.stage_stats}
    assert stats["matching"].computed == stats["captioning"].computed == 0
    assert all(stats[name].computed == 3 for name in ("caption_filter", "answer_extraction",
                                                       "question_generation", "prompt", "llm"))
    for record in records(tmp_path / "whole"):
        captions = record["stages"]["caption_filter"]
        assert captions["captions"] == pnp_captions[record["question_id"]] and len(captions["all_scores"]) == 8


def test_img2llm_prompt_keeps_exemplars_when_they_fit(tmp_path, tiny_zoo):
    small = [*IMG2LLM, "caption_filter.threshold=0.0", "answer_extraction.num_answers=2",
             "question_generation.max_length=6", "prompt.num_context_captions=2", "prompt.variant=paper"]
    Pipeline.from_yaml("img2llm", small, models="tiny").run(open_dataset("sample", limit=1),
                                                             cache_dir=tmp_path / "c", out_dir=tmp_path / "o")
    prompt_record = records(tmp_path / "o")[0]["stages"]["prompt"]
    prompt = prompt_record["prompts"][0]
    assert prompt_record["dropped_exemplars"] == 0
    assert "Question: Is this a toilet?\nAnswer: no\n" in prompt  # VQAv2-format sample: task resolves to vqav2
    assert prompt.count("\nQuestion: ") == prompt_record["num_exemplars"] + 1


@pytest.mark.slow
def test_img2llm_cli_on_sample(tmp_path, tiny_zoo):
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", "img2llm", "--dataset", "sample", "--models", "tiny", "--limit", "3",
         "--quiet", "--set", "caption_filter.num_captions=4", "--set", "caption_filter.max_draws=8",
         "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 3
    for record in records(tmp_path / "run"):  # the default threshold 0.5: kept captions all pass it
        captions = record["stages"]["caption_filter"]
        assert all(score >= 0.5 for score in captions["scores"])
        assert captions["kept"] == 4 or captions["draws"] == 8
    assert (tmp_path / "run" / "report.html").is_file()


def _pool_representatives(items):
    """Question ids whose (image, question) the pool captioner runs: the first pool question per image."""
    first = {}
    for item in items:
        first.setdefault(item.image_id, item.question_id)
    return set(first.values())


@pytest.mark.slow
def test_pica_on_sample_uses_its_own_items_as_the_pool(tmp_path, tiny_zoo):
    """pool_dataset: auto on the sample pools the sample; the prompt slices by the selection's settings;
    pool captions are the caption stage's own cache entries even with non-default caption settings."""
    from capvqa.engine.store import CacheStore

    # tiny CLIP's tags are near-uniform: threshold 0 keeps top_k of them, so the wired tags show in the text
    overrides = ["examples.n_shot=3", "caption.num_beams=2", "tags.threshold=0.0"]
    result = Pipeline.from_yaml("pica-full", overrides, models="tiny").run(
        open_dataset("sample", limit=5), cache_dir=tmp_path / "c", out_dir=tmp_path / "pica")
    assert len(result.predictions) == 5
    for record in records(tmp_path / "pica"):
        stages = record["stages"]
        examples = stages["examples"]["examples"]
        assert len(examples) == 3 * 5  # n_shot x n_ensemble
        assert (stages["examples"]["n_shot"], stages["examples"]["n_ensemble"]) == (3, 5)
        assert record["question_id"] not in {e["question_id"] for e in examples}
        prompts = stages["prompt"]["prompts"]
        assert len(prompts) == 5 and all(p.count("\nQ: ") == 3 + 1 for p in prompts)
        assert prompts[0].startswith("Please answer the question according to the above context.\n===\n")
        assert prompts[0].endswith(f"Q: {record['question']}\nA:")
        assert stages["tags"]["tags"]
        assert f". {', '.join(stages['tags']['tags'])}\n===\nQ: {record['question']}" in prompts[0]  # tags wired
        assert f"Q: {examples[3]['question']}\nA: {examples[3]['answer']}\n" in prompts[1]  # ranks 3..5
        assert len(stages["llm"]["candidates"]) == 5
        best = max(c["logprob"] for c in stages["llm"]["candidates"])
        assert stages["llm"]["logprob"] == best
    saved = yaml.safe_load((tmp_path / "pica" / "config.yaml").read_text())["stages"]
    assert (saved["examples"]["pool_dataset"], saved["examples"]["pool_split"]) == ("sample", "val2014")
    assert saved["examples"]["pool_captioner"] == "caption" and set(saved["prompt"]) == {"type", "inputs"}
    # one entry per pool image (its first question) plus the queries that are not such a first question:
    # the queries that are share their entry with the pool captioner (same config, same dtype)
    queries = [item.question_id for item in open_dataset("sample", limit=5)]
    representatives = _pool_representatives(open_dataset("sample"))
    expected = len(representatives) + len([q for q in queries if q not in representatives])
    assert {u.stage: u.entries for u in CacheStore(tmp_path / "c").usage()}["image_captioning"] == expected


@pytest.mark.slow
def test_pica_cli_on_sample_sets_shots_once(tmp_path, tiny_zoo):
    """`capvqa run pica --dataset sample --models tiny --limit 4 --set examples.n_shot=3` needs nothing
    else: the sample is its own pool, every prompt holds 3 examples, and the saved config reruns as is."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["--quiet", "--no-report", "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", "pica", "--dataset", "sample", "--models", "tiny", "--limit", "4",
         "--set", "examples.n_shot=3", *common, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    lines = records(tmp_path / "run")
    assert len(lines) == 4
    for record in lines:
        (prompt,) = record["stages"]["prompt"]["prompts"]
        assert prompt.count("\nQ: ") == 3 + 1 and record["stages"]["prompt"]["num_examples"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["stages"]["examples"]
    assert (saved["pool_dataset"], saved["n_shot"]) == ("sample", 3)

    again = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", str(tmp_path / "run" / "config.yaml"), *common,
         "--out", str(tmp_path / "again")],
        capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    timings = json.loads((tmp_path / "again" / "timings.json").read_text())["stages"]
    assert all(stage["computed"] == 0 for stage in timings.values()), timings
    assert records(tmp_path / "again") == lines
