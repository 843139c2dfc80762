"""`capvqa bench` on the tiny zoo: the JSON contract and forced generation lengths."""

import json
import os
import subprocess
import sys

import pytest

from capvqa.bench.memory import PeakMemory, current_rss_bytes


@pytest.mark.slow
def test_bench_json_contract(tmp_path, tiny_zoo):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "bench", "pnp-vqa", "--models", "tiny", "--questions", "3", "--batch-size",
         "2", "--num-captions", "5", "--caption-tokens", "7", "--answer-tokens", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert result["settings"]["questions"] == 3 and result["settings"]["caption_new_tokens"] == 7
    assert set(result["stages"]) == {"matching", "captioning", "reader"}
    for stage in result["stages"].values():
        assert stage["seconds_per_question"] > 0 and stage["peak_memory_bytes"] > 0
    # forced lengths: every caption draw is exactly 7 new tokens, every answer exactly 4
    captioning = result["stages"]["captioning"]
    assert captioning["generated_tokens"] % 7 == 0 and captioning["generated_tokens"] >= 3 * 5 * 7
    assert result["stages"]["reader"]["generated_tokens"] == 3 * 4
    assert result["stages"]["reader"]["mean_passage_tokens"] > 5  # question + caption tokens
    assert result["settings"]["host_allocator"]
    assert abs(result["total_seconds_per_question"]
               - sum(s["seconds_per_question"] for s in result["stages"].values())) < 1e-3
    assert result["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in result["stages"].values())
    assert "random weights" in result["note"]


def test_bench_needs_an_explicit_weight_choice():
    done = subprocess.run([sys.executable, "-m", "capvqa", "bench", "pnp-vqa"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--random-weights" in done.stderr


def test_peak_memory_sees_a_temporary_allocation():
    import numpy as np

    with PeakMemory("cpu", interval=0.005) as peak:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        block.sum()
        before_free = current_rss_bytes()
        del block
    assert peak.bytes >= before_free - 8 * 2**20


# ------------------------------------------------------------------------------ Img2LLM and PICa


@pytest.mark.slow
def test_img2llm_bench_forces_lengths_and_the_filter_pass_share(tiny_zoo):
    from capvqa.bench.run import run_benchmark

    result = run_benchmark("img2llm", models="tiny", questions=3, questions_per_image=2, batch_size=2,
                           num_captions=6, num_patches=4, caption_tokens=5, question_tokens=4, answer_tokens=3,
                           filter_pass_share=0.25, device="cpu", roofline=True, peak_tflops=1.0,
                           peak_bandwidth_gbs=10.0)
    stages = result["stages"]
    assert list(stages) == ["matching", "caption_filter", "answer_extraction", "question_generation", "prompt", "llm"]
    assert result["settings"]["method"] == "img2llm" and result["settings"]["filter_pass_share"] == 0.25
    # a quarter of the candidates pass: 24 scored and 6 kept per question, every caption 5 new tokens
    captions = stages["caption_filter"]
    assert captions["candidates_per_question"] == 24 and captions["kept_per_question"] == 6
    assert captions["pass_share"] == 0.25 and captions["generated_tokens"] == 3 * 24 * 5
    assert captions["images_encoded_per_question"] == pytest.approx(2 / 3, abs=1e-3)  # two images, two batches
    qg = stages["question_generation"]
    assert qg["generated_tokens"] % 4 == 0  # every synthetic question exactly 4 tokens
    assert qg["generated_tokens"] / 4 == pytest.approx(3 * qg["questions_generated_per_question"], abs=0.02)
    assert qg["mean_input_tokens"] > 6 * 5  # the context holds every caption
    assert stages["llm"]["generated_tokens"] == 3 * 3 and stages["llm"]["mean_prompt_tokens"] > 0
    # the counting pass made the same decisions and drew the same captions
    assert result["counted_same_captions"] is True
    assert all(stages[name]["flops_per_question"] > 0 for name in ("caption_filter", "question_generation", "llm"))


def test_forced_generation_runs_every_row_to_its_maximum_length():
    """QG and LLM rows run to their full length: end-of-sequence never stops one early."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from capvqa.bench.forcing import force_generation_lengths

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=8, d_model=8, d_ff=8, d_kv=4, num_layers=1, num_heads=2,
                                                eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[1] = 1.0  # end-of-sequence wins every step, unless it is forbidden

    class Stage:
        def setup(self, runtime):
            self.model = model

    stage = Stage()
    force_generation_lengths(stage, lambda s: s.model)
    stage.setup(None)
    ids = torch.tensor([[3, 4, 5]])
    assert stage.model.generate(input_ids=ids, max_length=6, num_beams=3).shape[1] == 6
    assert stage.model.generate(input_ids=ids, max_new_tokens=4).shape[1] == 5  # the start token and 4


@pytest.mark.slow
def test_pica_full_bench_through_the_cli(tmp_path, tiny_zoo):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "bench", "pica-full", "--models", "tiny", "--questions", "3", "--batch-size",
         "2", "--caption-tokens", "6", "--answer-tokens", "4", "--pool-size", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["pipeline"] == "pica-full" and result["settings"]["pool_size"] == 10
    assert list(result["stages"]) == ["caption", "examples", "tags", "prompt", "llm"]
    assert result["stages"]["caption"]["generated_tokens"] == 3 * 6  # one forced caption per image
    llm = result["stages"]["llm"]
    assert llm["prompts_per_question"] == 5 and llm["generated_tokens"] == 3 * 5 * 4  # the 5-prompt ensemble
    assert llm["mean_prompt_tokens"] > 50  # 16 examples with their captions
    assert "pica-full (tiny zoo)" in " ".join(done.stdout.split())


@pytest.mark.parametrize(("pipeline", "size", "expected"), [
    ("img2llm", None, ("img2llm", "1.3b")),
    ("img2llm", "125m", ("img2llm", "125m")),
    ("img2llm-opt-13b", None, ("img2llm-opt-13b", "13b")),
    ("pica", None, ("pica", "1.3b")),
    ("pica-full", "2.7b", ("pica-full", "2.7b")),
    ("pnp-vqa", None, ("pnp-vqa-base", "base")),
])
def test_bench_sizes_of_every_method(pipeline, size, expected):
    from capvqa.bench.run import resolve_bench_config

    assert resolve_bench_config(pipeline, size) == expected


@pytest.mark.parametrize(("pipeline", "settings", "message"), [
    ("img2llm", {"size": "base"}, "unknown --size 'base'; valid: 125m, 350m, 1.3b"),
    ("img2llm-opt-13b", {"size": "1.3b"}, "img2llm-opt-13b is the 13b size but --size 1.3b was given; drop --size, or bench img2llm --size 1.3b"),
    ("pica", {"num_captions": 10}, "--num-captions does not apply to pica"),
    ("pnp-vqa", {"pool_size": 10, "question_tokens": 3}, "--pool-size, --question-tokens do not apply to pnp-vqa"),
    ("img2llm", {"filter_pass_share": 0.0}, "--filter-pass-share must be in (0, 1], got 0.0"),
    ("img2llm", {"question_tokens": 0}, "--question-tokens must be at least 1, got 0"),
    ("pica", {"pool_size": 0}, "--pool-size must be at least 1, got 0"),
    ("blip2", {}, "cannot measure 'blip2'"),
])
def test_bench_settings_are_checked_per_method(monkeypatch, pipeline, settings, message):
    import capvqa.bench.run as bench_run
    from capvqa.errors import ConfigError

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr(bench_run, "build_models", forbidden)
    with pytest.raises(ConfigError) as refused:
        bench_run.run_benchmark(pipeline, models="random", **settings)
    assert message in str(refused.value)


def test_the_cli_checks_method_settings_before_the_run():
    done = subprocess.run([sys.executable, "-m", "capvqa", "bench", "pica", "--models", "tiny", "--filter-pass-share",
                           "0.5"], capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "--filter-pass-share does not apply to pica" in " ".join(done.stderr.split())
    assert "caption" not in done.stdout


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, 0.3, 0.07])
def test_a_fixed_pass_share_passes_that_share_evenly(share):
    from capvqa.bench.forcing import passes

    decisions = [passes(j, share) for j in range(1000)]
    assert sum(decisions) == round(1000 * share)
    assert sum(decisions[:100]) == round(100 * share)  # spread evenly, not bunched at either end


def test_bench_opt_tokenizer_has_the_real_size_and_whole_words():
    from capvqa.synthetic.bench_models import OPT_MODEL_VOCAB, bench_opt_tokenizer, pseudo_words

    tokenizer = bench_opt_tokenizer()
    assert len(tokenizer) == 50265 < OPT_MODEL_VOCAB
    caption = " " + " ".join(pseudo_words(20000)[-6:] + pseudo_words(3000)[-6:])  # as random captions hold
    assert len(tokenizer.tokenize(caption)) == 12
    prompt = "Please reason the answer of the questions according to the given contexts.\nQuestion: what color is the umbrella of the woman?\nAnswer:"
    assert len(tokenizer.tokenize(prompt)) == 28  # one piece per word and punctuation mark, as GPT-2's
