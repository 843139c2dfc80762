"""Img2LLM and PICa end to end on the bundled sample with the tiny models."""

import json
import os
import subprocess
import sys

from capvqa.data.datasets import open_dataset
from capvqa.engine.pipeline import Pipeline

SHARED = ["captioning.num_captions=8", "captioning.num_patches=6"]


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


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
    assert "yes" in first["answer_extraction"]["answers"]  # always added (SPEC §2)
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


def test_img2llm_cli_on_sample(tmp_path, tiny_zoo):
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "run", "img2llm", "--dataset", "sample", "--models", "tiny", "--limit", "3",
         "--quiet", "--set", "captioning.num_captions=4", "--cache-dir", str(tmp_path / "c"), "--out",
         str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 3
    assert (tmp_path / "run" / "report.html").is_file()


def test_pica_on_sample_uses_its_own_items_as_the_pool(tmp_path, tiny_zoo):
    overrides = ["examples.pool_dataset=sample", "examples.n_shot=3", "prompt.n_shot=3"]
    result = Pipeline.from_yaml("pica-full", overrides, models="tiny").run(
        open_dataset("sample", limit=5), cache_dir=tmp_path / "c", out_dir=tmp_path / "pica")
    assert len(result.predictions) == 5
    for record in records(tmp_path / "pica"):
        stages = record["stages"]
        examples = stages["examples"]["examples"]
        assert len(examples) == 3 * 5  # n_shot x n_ensemble
        assert record["question_id"] not in {e["question_id"] for e in examples}
        prompts = stages["prompt"]["prompts"]
        assert len(prompts) == 5
        assert prompts[0].startswith("Please answer the question according to the above context.\n===\n")
        assert prompts[0].endswith(f"Q: {record['question']}\nA:")
        assert f"Q: {examples[3]['question']}\nA: {examples[3]['answer']}\n" in prompts[1]  # ranks 3..5
        assert len(stages["llm"]["candidates"]) == 5
        best = max(c["logprob"] for c in stages["llm"]["candidates"])
        assert stages["llm"]["logprob"] == best


def test_pica_rejects_prompt_and_selection_settings_that_disagree(tmp_path, tiny_zoo):
    import pytest

    from capvqa.errors import ConfigError

    overrides = ["examples.pool_dataset=sample", "examples.n_shot=3", "prompt.n_shot=3", "prompt.n_ensemble=2"]
    with pytest.raises(ConfigError, match="n_ensemble"):
        Pipeline.from_yaml("pica", overrides, models="tiny").run(open_dataset("sample", limit=2),
                                                                 cache_dir=tmp_path / "c")
