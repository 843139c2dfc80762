"""Img2LLM caption filtering on the tiny BLIP ITM."""

import numpy as np
import pytest
import torch
from PIL import Image

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.stages.caption_filter import CaptionFilter, clean_caption
from capvqa.stages.patch_captioning import Captions


def test_clean_caption_follows_blip_caption_processor():
    assert clean_caption("A Dog!  Running (fast).") == "a dog running fast"
    assert len(clean_caption("w " * 80).split()) == 50


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    folder = tmp_path_factory.mktemp("filter")
    rng = np.random.default_rng(3)
    out = []
    for i, captions in enumerate([["a dog on a couch", "a red bus", "two cats"], [], ["a man with a kite"]]):
        path = folder / f"{i}.png"
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(path)
        item = VQAItem(question_id=i, image_id=i, question="what?", image=ImageRef(path=path))
        out.append(StageInput(item=item, item_key=f"k{i}", image_hash=f"h{i}",
                              upstream={"captions": Captions(captions=captions, rounds=1, draws=3,
                                                             patches_per_caption=4)}))
    return out


def test_scores_every_caption_and_keeps_by_threshold(tiny_zoo, cpu_runtime, entries):
    stage = CaptionFilter(model=str(tiny_zoo["itm"]), threshold=0.0)
    stage.setup(cpu_runtime)
    everything = stage.run(entries)
    assert [len(r.all_scores) for r in everything] == [3, 0, 1]
    assert everything[0].captions == ["a dog on a couch", "a red bus", "two cats"]
    assert all(0.0 <= s <= 1.0 for r in everything for s in r.all_scores)

    median = float(np.median(everything[0].all_scores))
    strict = CaptionFilter(model=str(tiny_zoo["itm"]), threshold=median)
    strict.setup(cpu_runtime)
    result = strict.run(entries[:1])[0]
    assert result.captions == [c for c, s in zip(entries[0].upstream["captions"].captions,
                                                 everything[0].all_scores) if s >= median]
    assert result.scores == [s for s in everything[0].all_scores if s >= median]


def test_probability_is_softmax_of_itm_head_with_enc_token(tiny_zoo, cpu_runtime, entries):
    stage = CaptionFilter(model=str(tiny_zoo["itm"]))
    stage.setup(cpu_runtime)
    ours = stage.run(entries[2:])[0].all_scores[0]
    model, processor = stage.itm.model, stage.itm.processor
    image = Image.open(entries[2].item.image.path).convert("RGB")
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(["a man with a kite"], return_tensors="pt")
    tokens["input_ids"][:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.inference_mode():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels, use_itm_head=True).itm_score
    assert ours == pytest.approx(torch.softmax(logits, -1)[0, 1].item(), abs=1e-5)
