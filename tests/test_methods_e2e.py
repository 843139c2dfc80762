"""Img2LLM and PICa end to end on the bundled sample with the tiny models."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from capvqa.data.datasets import open_dataset
from capvqa.engine.pipeline import Pipeline

SHARED = ["captioning.num_captions=8", "captioning.num_patches=6"]


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_img2llm_reuses_pnp_vqa_matching_and_captioning(tmp_path, tiny_zoo):
    data = open_dataset("sample", limit=4)
    Pipeline.from_yaml("pnp-vqa", SHARED, models="tiny").run(data, cache_dir=tmp_path / "cache")
    # the tiny ITM scores every caption just under 0.5: lower the threshold so every stage has input
    result = Pipeline.from_yaml("img2llm", [*SHARED, "caption_filter.threshold=0.0"], models="tiny").run(
        data, cache_dir=tmp_path / "cache", out_dir=tmp_path / "img2llm")
    stats = {s.name: s for s in result.stage_stats}
    for shared in ("matching", "captioning"):
        assert stats[shared].computed == 0 and stats[shared].cached == 4
        assert stats[shared].setup_seconds == 0.0  # the model was never even loaded
    assert all(stats[name].computed == 4 for name in ("caption_filter", "answer_extraction",
                                                       "question_generation", "prompt", "llm"))
    first = records(tmp_path / "img2llm")[0]["stages"]
    assert len(first["caption_filter"]["captions"]) == 8 and len(first["caption_filter"]["scores"]) == 8
    assert "yes" in first["answer_extraction"]["answers"]  # always added (docs/methods.md#answer-extraction)
    assert first["answer_extraction"]["extractor"] in ("rule",) or first["answer_extraction"]["extractor"].startswith("spacy")
    qa = first["question_generation"]
    assert len(qa["questions"]) == len(qa["answers"]) == len(first["answer_extraction"]["answers"])
    prompt = first["prompt"]["prompts"][0]
    assert prompt.startswith("Please reason the answer of the questions according to the given contexts.\nContexts: ")
    assert prompt.endswith("Question: what color is the suit?\nAnswer:")
    # 8 captions x 30 answers overflow the tiny OPT's 512 positions: exemplars go first, and it is recorded
    assert first["prompt"]["dropped_exemplars"] > 0 and first["prompt"]["num_tokens"] <= 512
    assert first["llm"]["postprocess"].startswith("img2llm")
    config = (tmp_path / "img2llm" / "config.yaml").read_text()
    assert "task: vqav2" in config and "checkpoint: null" in config


def test_img2llm_prompt_keeps_exemplars_when_they_fit(tmp_path, tiny_zoo):
    small = [*SHARED, "caption_filter.threshold=0.0", "answer_extraction.num_answers=2",
             "question_generation.max_length=6", "prompt.num_context_captions=2"]
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
         "--quiet", "--set", "captioning.num_captions=4", "--cache-dir", str(tmp_path / "c"), "--out",
         str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 3
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
