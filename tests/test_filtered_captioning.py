"""Img2LLM's in-loop ITM caption filter (LAVIS Img2Prompt ``forward_cap``) on the tiny BLIP models.

The tiny ITM is random: its P(match) barely varies between captions and need not straddle 0.5, so these
tests set thresholds relative to the scores they observe.
"""

import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from caption_inputs import relevance_inputs
from PIL import Image

from capvqa.engine.config import load_raw_config, load_spec
from capvqa.errors import ConfigError
from capvqa.models.blip_itm import itm_inputs_from_decoder_ids
from capvqa.stages import filtered_patch_captioning as fpc
from capvqa.stages.filtered_patch_captioning import FilteredPatchCaptioning, admit_caption
from capvqa.stages.patch_captioning import PatchCaptioning

# --------------------------------------------------------------------------------------------------
# The keep rule and the ITM text, on hand-made values


def test_admit_caption_threshold_is_inclusive():
    assert admit_caption("a dog", 0.5, [], 0.5, 100)
    assert not admit_caption("a dog", 0.4999, [], 0.5, 100)
    assert admit_caption("a dog", 0.0, [], 0.0, 100)


def test_admit_caption_rejects_substrings_of_kept_captions_only():
    kept = ["a dog on a couch"]
    assert not admit_caption("a dog", 0.9, kept, 0.5, 100)  # a substring of a kept caption
    assert not admit_caption("a dog on a couch", 0.9, kept, 0.5, 100)  # the same caption
    # LAVIS checks only `caption in kept_caption`: a longer caption containing a kept one is new
    assert admit_caption("a dog on a couch with a cat", 0.9, kept, 0.5, 100)
    assert admit_caption("a cat", 0.9, kept, 0.5, 100)
    assert not admit_caption("", 0.9, [], 0.5, 100)  # empty captions are never kept


def test_admit_caption_stops_at_the_limit():
    assert admit_caption("c", 0.9, ["a", "b"], 0.5, 3)
    assert not admit_caption("c", 0.9, ["a", "b", "d"], 0.5, 3)


def test_the_rule_over_a_stream_of_candidates():
    stream = [("a red bus", 0.7), ("red bus", 0.9), ("two cats", 0.3), ("a red bus on a road", 0.5),
              ("two cats", 0.8), ("a dog", 0.95), ("a kite", 0.99)]
    kept: list[str] = []
    for caption, p in stream:
        if admit_caption(caption, p, kept, 0.5, 4):
            kept.append(caption)
    assert kept == ["a red bus", "a red bus on a road", "two cats", "a dog"]


def test_itm_ids_start_at_the_prompts_last_word_overwritten_by_enc():
    dec, enc, sep, pad = 30522, 30523, 102, 0
    a, picture, of = 1037, 3861, 1997
    output = torch.tensor([
        [dec, a, picture, of, 3899, 2006, sep, pad, pad],
        [dec, a, picture, of, 2417, 3902, 2006, 1037, sep],
    ])
    before = output.clone()
    ids, mask = itm_inputs_from_decoder_ids(output, prompt_length=4, enc_token_id=enc, pad_token_id=pad)
    assert ids.tolist() == [[enc, 3899, 2006, sep, pad, pad], [enc, 2417, 3902, 2006, 1037, sep]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]  # [SEP] attended, padding not
    assert torch.equal(output, before)  # the decoder output is not modified in place
    with pytest.raises(ValueError, match="prompt_length"):
        itm_inputs_from_decoder_ids(output, prompt_length=0, enc_token_id=enc, pad_token_id=pad)


# --------------------------------------------------------------------------------------------------
# The stage on the tiny zoo


@pytest.fixture(scope="module")
def stage(tiny_zoo, cpu_runtime):
    stage = FilteredPatchCaptioning(model=str(tiny_zoo["captioner"]), itm_model=str(tiny_zoo["itm"]),
                                    num_captions=6, num_patches=5, threshold=0.0, max_draws=60)
    stage.setup(cpu_runtime)
    return stage


def configured(stage, **changes):
    """The same loaded models under another config (no reload)."""
    other = FilteredPatchCaptioning(replace(stage.config, **changes))
    other._captioner, other._itm, other.runtime = stage._captioner, stage._itm, stage.runtime
    return other


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, stage):
    return relevance_inputs(tmp_path_factory.mktemp("filtered"), stage._captioner.num_image_patches)


@pytest.fixture(scope="module")
def middle_threshold(stage, inputs):
    """A threshold about half of the first round's candidates reach."""
    scores = [s for result in stage.run(inputs) for s in result.scores]
    return float(np.median(scores))


def test_the_decoder_prompt_is_four_tokens_so_the_itm_text_starts_at_position_3(stage):
    tokenizer = stage._captioner.processor.tokenizer
    prompt = stage._captioner.prompt_ids
    assert len(prompt) == 4 and prompt[0] == stage._captioner.model.config.text_config.bos_token_id
    assert tokenizer.convert_ids_to_tokens(prompt[1:]) == ["a", "picture", "of"]


def test_with_threshold_zero_the_captions_are_pnp_vqas(stage, inputs):
    """Every candidate passes at threshold 0: the filter reduces to PatchCaptioning's distinct-caption
    filling, on the very same patch and token streams."""
    pnp = PatchCaptioning(model=stage.config.model, num_captions=6, num_patches=5, max_rounds=10)
    pnp._captioner, pnp.runtime = stage._captioner, stage.runtime
    ours = configured(stage, threshold=0.0, max_draws=60).run(inputs)
    theirs = pnp.run(inputs)
    assert [r.captions for r in ours] == [r.captions for r in theirs]
    assert [r.draws for r in ours] == [r.draws for r in theirs]
    assert [r.rounds for r in ours] == [r.rounds for r in theirs]


def _record_candidates(monkeypatch, stage):
    """Spy on the stage: the rows each round draws and the P(match) of every decoded row, in order."""
    rounds, chunks = [], []
    real_draw = fpc.draw_patch_rows

    def draw(*args, **kwargs):
        rows = real_draw(*args, **kwargs)
        rounds.append(rows)
        return rows

    real_match = stage.match_probabilities

    def match(chunk):
        probabilities = real_match(chunk)
        chunks.append((chunk, probabilities))
        return probabilities

    monkeypatch.setattr(fpc, "draw_patch_rows", draw)
    monkeypatch.setattr(stage, "match_probabilities", match)
    return rounds, chunks


def test_kept_captions_are_the_rule_applied_to_the_candidate_stream(monkeypatch, stage, inputs, middle_threshold):
    # 10-row chunks: a round's rows span several generate calls and items straddle chunk borders
    filtered = configured(stage, threshold=middle_threshold, max_draws=30, max_rows_per_generate=10)
    rounds, chunks = _record_candidates(monkeypatch, filtered)
    results = filtered.run(inputs)

    items = [i for rows in rounds for i in rows.item]
    candidates = [(text, p) for chunk, probabilities in chunks for text, p in zip(chunk.texts, probabilities)]
    assert len(items) == len(candidates) == sum(r.draws for r in results)
    for index, result in enumerate(results):
        stream = [c for i, c in zip(items, candidates) if i == index]
        expected, expected_scores = [], []
        for caption, p in stream:  # LAVIS: p >= threshold, not a substring of a kept caption, until full
            if len(expected) < 6 and p >= middle_threshold and caption and not any(caption in k for k in expected):
                expected.append(caption)
                expected_scores.append(p)
        assert result.captions == expected and result.scores == expected_scores
        assert result.passed == sum(p >= middle_threshold for _, p in stream)
        assert result.draws == len(stream) and result.kept == len(result.captions)
        assert result.kept == 6 or result.draws == 30
    assert any(r.rounds > 1 for r in results)  # the median threshold needs refills
    assert any(p < middle_threshold for _, p in candidates)  # and some candidates were filtered out


def test_score_is_the_itm_head_on_the_captioner_patches_the_caption_came_from(monkeypatch, stage, inputs):
    """P(match) is the ITM text encoder + head over the decoder ids (from position 3, [ENC] first),
    cross-attending to the *captioner's* ViT embeddings of the sampled patches (no CLS)."""
    rounds, chunks = _record_candidates(monkeypatch, stage)
    stage.run(inputs[:1])
    rows, (chunk, probabilities) = rounds[0], chunks[0]
    captioner, itm = stage._captioner, stage._itm
    image = Image.open(inputs[0].item.image.path).convert("RGB")
    pixels = captioner.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        vit = captioner.model.vision_model(pixel_values=pixels)[0][0]  # (1+P, D), CLS first
    enc = itm.processor.tokenizer.convert_tokens_to_ids("[ENC]")
    pad = itm.processor.tokenizer.pad_token_id
    for r in range(len(rows)):
        memory = vit[torch.as_tensor(rows.patches[r]) + 1][None]  # the row's patches, CLS skipped
        ids = chunk.output_ids[r].tolist()
        text = [enc, *ids[4:]]
        mask = [1] + [int(t != pad) for t in ids[4:]]
        with torch.inference_mode():
            hidden = itm.model.text_encoder(input_ids=torch.tensor([text]), attention_mask=torch.tensor([mask]),
                                            encoder_hidden_states=memory)[0]
            expected = torch.softmax(itm.model.itm_head(hidden[:, 0]), -1)[0, 1].item()
        assert probabilities[r] == pytest.approx(expected, abs=1e-5)


def test_results_do_not_depend_on_the_batch(stage, inputs, middle_threshold):
    filtered = configured(stage, threshold=middle_threshold, max_draws=18)
    together = filtered.run(inputs[:3])
    alone = [filtered.run([entry])[0] for entry in inputs[:3]]
    reordered = filtered.run(inputs[2::-1])[::-1]
    for a, b, c in zip(together, alone, reordered):
        assert a.captions == b.captions == c.captions
        assert (a.rounds, a.draws, a.passed, a.kept) == (b.rounds, b.draws, b.passed, b.kept) == (
            c.rounds, c.draws, c.passed, c.kept)
        assert a.scores == pytest.approx(b.scores, abs=1e-6) and a.scores == pytest.approx(c.scores, abs=1e-6)
    assert any(r.rounds > 1 for r in together)


def test_the_draw_cap_ends_the_loop_and_the_counts_say_so(stage, inputs):
    # no probability reaches 1.01: nothing is ever kept, so only the cap stops the loop
    result = configured(stage, num_captions=4, threshold=1.01, max_draws=10).run(inputs[:2])
    for r in result:
        assert (r.captions, r.scores, r.kept, r.passed) == ([], [], 0, 0)
        assert r.draws == 10 and r.rounds == 3  # 4 + 4 + 2 candidates
        assert r.patches_per_caption == 5


def test_a_full_item_stops_drawing(stage, inputs):
    result = configured(stage, num_captions=3, threshold=0.0, max_draws=1000).run(inputs[:1])[0]
    assert result.kept == 3 and result.rounds == math.ceil(result.draws / 3) and result.draws < 1000


def test_config_checks():
    for bad in ({"max_draws": 0}, {"num_captions": 0}, {"min_length": 30}, {"threshold": float("nan")}):
        with pytest.raises(ValueError):
            fpc.FilteredPatchCaptioningConfig(**bad)


def test_an_itm_of_another_vit_width_is_a_clear_error(tmp_path, tiny_zoo, cpu_runtime):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from capvqa.synthetic.tiny_zoo import save_random_model, tiny_blip_config

    folder = tmp_path / "itm-wide"
    shutil.copytree(tiny_zoo["itm"], folder)  # the zoo's processor, a ViT of width 48 instead of 32
    tokenizer = BlipProcessor.from_pretrained(tiny_zoo["itm"]).tokenizer
    config = tiny_blip_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                              vision_hidden=48)
    save_random_model(BlipForImageTextRetrieval, config, folder, seed=7)
    stage = FilteredPatchCaptioning(model=str(tiny_zoo["captioner"]), itm_model=str(folder))
    with pytest.raises(ConfigError, match=r"48-wide image features.*32-wide ViT.*same ViT size"):
        stage.setup(cpu_runtime)


# --------------------------------------------------------------------------------------------------
# Pipelines


def test_img2llm_default_filters_in_the_loop_and_shares_only_matching_with_pnp_vqa():
    img2llm, pnp = load_spec("img2llm"), load_spec("pnp-vqa")
    stage = img2llm.stage("caption_filter")
    assert stage.type.endswith("FilteredPatchCaptioning")
    assert stage.model_roles == {"model": "captioner", "itm_model": "itm"}
    assert stage.inputs == {"relevance": "matching"}
    assert "captioning" not in {s.name for s in img2llm.stages}
    assert img2llm.stage("matching") == pnp.stage("matching")
    # the sampling settings are PNP-VQA's (the same patch and caption streams)
    shared = {k: v for k, v in stage.params.items() if k not in ("threshold", "max_draws")}
    assert shared == pnp.stage("captioning").params
    for reader in ("answer_extraction", "question_generation", "prompt"):
        assert img2llm.stage(reader).inputs["captions"] == "caption_filter"


def test_whole_image_pipeline_differs_from_the_default_only_in_its_captions():
    default, whole = load_raw_config("img2llm-opt-6.7b"), load_raw_config("img2llm-whole-image-filter")
    pnp = load_raw_config("pnp-vqa-base")
    assert whole["stages"]["captioning"] == pnp["stages"]["captioning"]  # PNP-VQA's cache entries
    assert whole["stages"]["caption_filter"]["type"].endswith("CaptionFilter")
    assert whole["stages"]["caption_filter"]["inputs"] == {"captions": "captioning"}
    for key in ("method", "seed", "task", "models", "answer"):
        assert whole.get(key) == default.get(key), key
    for name in set(default["stages"]) - {"caption_filter"}:
        assert whole["stages"][name] == default["stages"][name], (
            f"stage {name!r} of pipelines/img2llm-whole-image-filter.yaml must match img2llm-opt-6.7b.yaml's")
    assert list(whole["stages"]) == ["matching", "captioning", *[n for n in default["stages"] if n != "matching"]]
