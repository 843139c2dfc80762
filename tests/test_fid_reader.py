"""Fusion-in-Decoder reading on the tiny T5."""

import pytest
import torch

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.stages.patch_captioning import Captions


@pytest.fixture(scope="module")
def reader(tiny_zoo, cpu_runtime):
    from capvqa.stages.fid_reader import FiDReader

    stage = FiDReader(model=str(tiny_zoo["reader"]), min_new_tokens=3, max_new_tokens=6)
    stage.setup(cpu_runtime)
    return stage


PASSAGES = [
    ["what is on the table? \\n a cup of coffee on a wooden table."],
    ["is it raining? \\n a man with an umbrella.", "is it raining? \\n wet street at night with lights and cars."],
    ["how many dogs? \\n two dogs.", "how many dogs? \\n a dog.", "how many dogs? \\n three small brown dogs play."],
]


def test_one_passage_equals_plain_t5_generation(reader):
    passage = PASSAGES[0][0]
    fid = reader.answer([[passage]])[0]
    tokens = reader.tokenizer([passage], return_tensors="pt")
    with torch.inference_mode():
        plain = reader._model.generate(**tokens, do_sample=False, num_beams=1, max_new_tokens=6, min_new_tokens=3)
    assert fid == reader.tokenizer.batch_decode(plain, skip_special_tokens=True)[0].strip()


def test_batched_equals_unbatched(reader):
    together = reader.answer(PASSAGES)
    alone = [reader.answer([p])[0] for p in PASSAGES]
    assert together == alone


def test_fused_equals_manual_concatenation(reader):
    """FiD = encode each passage alone, concatenate along the sequence, decode once."""
    from transformers.modeling_outputs import BaseModelOutput

    passages = PASSAGES[2]
    encoder = reader._model.get_encoder()
    with torch.inference_mode():
        hidden = [encoder(**reader.tokenizer([p], return_tensors="pt")).last_hidden_state for p in passages]
        fused = torch.cat(hidden, dim=1)
        out = reader._model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=fused),
                                     attention_mask=torch.ones(fused.shape[:2], dtype=torch.long),
                                     do_sample=False, max_new_tokens=6, min_new_tokens=3)
    assert reader.answer([passages])[0] == reader.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_stage_builds_unifiedqa_passages(reader):
    item = VQAItem(question_id=1, image_id=1, question="What Is It?", image=ImageRef(data=b"x"))
    entry = StageInput(item=item, item_key="k", image_hash="h",
                       upstream={"captions": Captions(captions=["A Dog", "a cat"], rounds=1, draws=2,
                                                      patches_per_caption=20)})
    result = reader.run([entry])[0]
    assert result.passages == ["what is it? \\n a dog.", "what is it? \\n a cat."]
    assert isinstance(result.answer, str)
