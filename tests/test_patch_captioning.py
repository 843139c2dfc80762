"""Question-guided captioning on the tiny BLIP captioner."""

import numpy as np
import pytest
from caption_inputs import relevance_inputs

from capvqa.stages.gradcam_matching import PatchRelevance


@pytest.fixture(scope="module")
def captioner(tiny_zoo, cpu_runtime):
    from capvqa.stages.patch_captioning import PatchCaptioning

    stage = PatchCaptioning(model=str(tiny_zoo["captioner"]), num_captions=6, num_patches=5)
    stage.setup(cpu_runtime)
    return stage


@pytest.fixture()
def inputs(tmp_path, captioner):
    return relevance_inputs(tmp_path, captioner._captioner.num_image_patches)


def test_fills_distinct_captions(captioner, inputs):
    out = captioner.run(inputs)
    for result in out:
        assert len(result.captions) == 6
        assert result.patches_per_caption == 5
        for i, caption in enumerate(result.captions):
            assert caption and not any(caption in other for other in result.captions[:i])
        assert result.draws >= 6 and result.rounds >= 1


def test_results_do_not_depend_on_the_batch(captioner, inputs):
    together = captioner.run(inputs)
    alone = [captioner.run([entry])[0] for entry in inputs]
    reordered = captioner.run(inputs[::-1])[::-1]
    assert [r.captions for r in together] == [r.captions for r in alone] == [r.captions for r in reordered]


def test_seed_changes_captions(captioner, inputs):
    from dataclasses import replace

    from capvqa.stages.patch_captioning import PatchCaptioning

    other = PatchCaptioning(replace(captioner.config, seed=7))
    other._captioner, other.runtime = captioner._captioner, captioner.runtime  # same weights, other seed
    assert other.run(inputs[:1])[0].captions != captioner.run(inputs[:1])[0].captions


def test_caption_lengths_respect_min_and_max(captioner, inputs):
    tokenizer = captioner._captioner.processor.tokenizer
    for caption in captioner.run(inputs[:2])[0].captions:
        n = len(tokenizer(caption, add_special_tokens=False)["input_ids"])
        assert n <= 16  # max_length 20 minus the 4 prompt tokens; WordPiece re-tokenisation may merge


def test_retry_cap_records_shortfall(tiny_zoo, cpu_runtime, inputs):
    from capvqa.stages.patch_captioning import PatchCaptioning

    # top_k=1 makes every draw of an item identical: only one distinct caption can ever be found
    stage = PatchCaptioning(model=str(tiny_zoo["captioner"]), num_captions=4, num_patches=16, top_k=1,
                            max_rounds=3)
    stage.setup(cpu_runtime)
    result = stage.run(inputs[:1])[0]
    assert len(result.captions) == 1
    assert result.rounds == 3 and result.draws == 12


def test_mismatched_patch_grid_is_a_clear_error(captioner, inputs):
    from dataclasses import replace

    bad = replace(inputs[0], upstream={"relevance": PatchRelevance(relevance=np.ones(7, np.float32), grid=[1, 7],
                                                                   matching_text="q", match_logit=0.0)})
    with pytest.raises(ValueError, match="patches"):
        captioner.run([bad])
