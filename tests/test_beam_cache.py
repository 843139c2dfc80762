"""Beam search that leaves the cross-attention cache in place gives the beams, scores and captions of the
default cache: question generation (T5) and whole-image captioning (BLIP) use it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from capvqa.models.beam_cache import BeamSharedCrossAttentionCache, beam_search_cache


class ReorderSpy:
    """Records each beam reorder of the cache class, so a test can see the beams really moved."""

    def __init__(self, monkeypatch) -> None:
        self.moves: list[torch.Tensor] = []
        original = BeamSharedCrossAttentionCache.reorder_cache

        def spy(cache, beam_idx):
            self.moves.append(beam_idx.clone())
            crossed = [layer.keys.clone() for layer in cache.cross_attention_cache.layers]
            original(cache, beam_idx)
            assert all(torch.equal(a, layer.keys) for a, layer in zip(crossed, cache.cross_attention_cache.layers))

        monkeypatch.setattr(BeamSharedCrossAttentionCache, "reorder_cache", spy)

    def beams_moved(self) -> bool:
        return any(not torch.equal(move, torch.arange(len(move))) for move in self.moves)


def _generate(model, **kwargs):
    with torch.inference_mode():
        return model.generate(**kwargs, do_sample=False, output_scores=True, return_dict_in_generate=True)


def test_question_generation_beams_equal_the_default_cache(tiny_zoo, cpu_runtime, monkeypatch):
    from capvqa.stages.question_generation import QuestionGeneration

    stage = QuestionGeneration(model=str(tiny_zoo["qg"]))
    stage.setup(cpu_runtime)
    model, tokenizer = stage._model, stage.tokenizer
    texts = ["answer: horse.  context: a man riding a horse on the beach.", "answer: yes.  context: .",
             "answer: frisbee.  context: two dogs playing in the snow with a red frisbee near some trees.",
             "answer: two.  context: two dogs.", "answer: red.  context: a red bus on a street in a city."]
    tokens = tokenizer(texts, padding="longest", return_tensors="pt")
    spy = ReorderSpy(monkeypatch)
    for beams in (2, 3):
        default = _generate(model, **tokens, num_beams=beams, max_length=12)
        shared = _generate(model, **tokens, num_beams=beams, max_length=12, cache=beam_search_cache(model))
        assert torch.equal(default.sequences, shared.sequences)
        assert torch.equal(default.sequences_scores, shared.sequences_scores)
    assert spy.beams_moved()


@pytest.mark.slow
def test_whole_image_captions_equal_the_default_cache(tiny_zoo, cpu_runtime, monkeypatch):
    from capvqa.stages.image_captioning import ImageCaptioning

    stage = ImageCaptioning(model=str(tiny_zoo["captioner"]), num_beams=3, max_length=12, min_length=5)
    stage.setup(cpu_runtime)
    images = [Image.new("RGB", (40, 30), colour) for colour in [(200, 30, 30), (20, 160, 40), (10, 10, 220)]]
    spy = ReorderSpy(monkeypatch)
    captions = stage.caption_images(images)
    assert spy.beams_moved()
    captioner = stage._captioner
    image_embeds = captioner.encode_images(images)
    input_ids = captioner.prompt_batch(len(images))
    default = _generate(
        captioner.model.text_decoder, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        num_beams=3, max_new_tokens=12 - len(captioner.prompt_ids), min_new_tokens=5 - len(captioner.prompt_ids),
        repetition_penalty=1.0, eos_token_id=captioner.eos_id, pad_token_id=captioner.pad_id)
    assert captions == captioner.texts(default.sequences)
