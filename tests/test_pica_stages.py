"""PICa stages around example selection: prompt text, whole-image captions, CLIP tags, COCO captions."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.errors import ConfigError, DataError
from capvqa.stages.example_selection import InContextExamples
from capvqa.stages.pica_prompt import (
    PICA_HEADER,
    PicaPrompt,
    ensemble_slices,
    pica_prompt,
    query_context,
)

EXAMPLES = [
    {
        "question_id": 10 + i,
        "question": f"q{i}?",
        "answer": f"a{i}",
        "caption": f"cap {i}",
        "score": 1.0 - i / 10,
    }
    for i in range(4)
]


# ------------------------------------------------------------------------------------ prompt text


def test_prompt_text_is_exactly_picas():
    prompt = pica_prompt("a dog on a couch", "What breed is it?", EXAMPLES[:2])
    assert prompt == (
        "Please answer the question according to the above context.\n===\n"
        "Context: cap 0\n===\nQ: q0?\nA: a0\n\n===\n"
        "Context: cap 1\n===\nQ: q1?\nA: a1\n\n===\n"
        "Context: a dog on a couch\n===\nQ: What breed is it?\nA:"
    )
    assert pica_prompt("c", "q?", []) == PICA_HEADER + "Context: c\n===\nQ: q?\nA:"


def test_query_context_with_and_without_tags():
    assert query_context("a dog on a couch") == "a dog on a couch"
    assert query_context("a dog on a couch", []) == "a dog on a couch"
    assert (
        query_context("a dog on a couch", ["dog", "couch", "pillow"])
        == "a dog on a couch. dog, couch, pillow"
    )


def test_ensemble_slices_take_consecutive_ranks():
    assert ensemble_slices(list(range(7)), 3, 2) == [[0, 1, 2], [3, 4, 5]]
    assert ensemble_slices(list(range(4)), 3, 2) == [[0, 1, 2], [3]]  # short pool: shorter last prompt


def _prompt_input(tags=None, question="What is it?"):
    from capvqa.stages.clip_tags import ImageTags
    from capvqa.stages.image_captioning import ImageCaption

    upstream = {
        "caption": ImageCaption(caption="a cat on a mat"),
        "examples": InContextExamples(examples=EXAMPLES),
    }
    if tags is not None:
        upstream["tags"] = ImageTags(tags=tags, scores=[0.5] * len(tags))
    item = VQAItem(question_id=1, image_id=1, question=question, image=ImageRef(data=b"x"))
    return StageInput(item=item, item_key="k", image_hash="h", upstream=upstream)


def test_stage_builds_ensemble_prompts_from_rank_slices():
    out = PicaPrompt(n_shot=2, n_ensemble=2).run([_prompt_input()])[0]
    assert out.num_examples == 4
    assert out.prompts == [
        PICA_HEADER
        + "Context: cap 0\n===\nQ: q0?\nA: a0\n\n===\nContext: cap 1\n===\nQ: q1?\nA: a1\n\n===\n"
        + "Context: a cat on a mat\n===\nQ: What is it?\nA:",
        PICA_HEADER
        + "Context: cap 2\n===\nQ: q2?\nA: a2\n\n===\nContext: cap 3\n===\nQ: q3?\nA: a3\n\n===\n"
        + "Context: a cat on a mat\n===\nQ: What is it?\nA:",
    ]


def test_stage_with_tags_puts_them_on_the_query_only():
    with_tags = PicaPrompt(n_shot=1, use_tags=True).run([_prompt_input(tags=["cat", "mat"])])[0]
    assert with_tags.prompts == [
        PICA_HEADER + "Context: cap 0\n===\nQ: q0?\nA: a0\n\n===\n"
        "Context: a cat on a mat. cat, mat\n===\nQ: What is it?\nA:"
    ]
    ignored = PicaPrompt(n_shot=1, use_tags=False).run([_prompt_input(tags=["cat"])])[0]
    assert "Context: a cat on a mat\n" in ignored.prompts[0]
    no_tags_passed = PicaPrompt(n_shot=1, use_tags=True).run([_prompt_input(tags=[])])[0]
    assert "Context: a cat on a mat\n" in no_tags_passed.prompts[0]
    with pytest.raises(ConfigError, match="tags"):
        PicaPrompt(use_tags=True).run([_prompt_input()])


# ----------------------------------------------------------------------------------- COCO captions


def test_coco_captions_first_caption_by_annotation_order(tmp_path):
    from capvqa.data.coco_captions import first_caption, load_coco_captions

    path = tmp_path / "captions.json"
    path.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": 7, "id": 3, "caption": "A dog  runs.\n"},
                    {"image_id": 8, "id": 1, "caption": "A cat."},
                    {"image_id": 7, "id": 2, "caption": "Second caption."},
                ]
            }
        )
    )
    captions = load_coco_captions(path)
    assert captions == {7: ["A dog runs.", "Second caption."], 8: ["A cat."]}
    assert first_caption(captions, "7") == "A dog runs."
    assert first_caption(captions, 9) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"images": []}, "annotations"),
        ({"annotations": {}}, "must be a list"),
        ({"annotations": [{"caption": "x"}]}, r"annotations\[0\].*image_id"),
        ({"annotations": [{"image_id": 1}]}, "caption"),
        ({"annotations": [{"image_id": 1, "caption": 5}]}, "must be a string"),
        ({"annotations": []}, "no non-empty captions"),
    ],
)
def test_coco_captions_errors_name_the_problem(tmp_path, document, message):
    from capvqa.data.coco_captions import load_coco_captions

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=message):
        load_coco_captions(path)
    with pytest.raises(DataError, match="not found"):
        load_coco_captions(tmp_path / "missing.json")


# ------------------------------------------------------------------------------- image captioning


@pytest.fixture(scope="module")
def image_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(4):
        path = folder / f"img{i % 2}.png"
        if not path.exists():
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(path)
        item = VQAItem(question_id=i, image_id=i % 2, question=f"question {i}?", image=ImageRef(path=path))
        entries.append(StageInput(item=item, item_key=f"item-{i}", image_hash=f"img{i % 2}"))
    return entries


def test_image_captioning_one_caption_per_image(tiny_zoo, cpu_runtime, image_inputs):
    from capvqa.stages.image_captioning import ImageCaptioning

    stage = ImageCaptioning(model=str(tiny_zoo["captioner"]))
    stage.setup(cpu_runtime)
    out = stage.run(image_inputs)
    assert [type(o).__name__ for o in out] == ["ImageCaption"] * 4
    assert out[0].caption == out[2].caption and out[1].caption == out[3].caption  # same image, same caption
    assert all(isinstance(o.caption, str) and not o.caption.startswith("a picture of") for o in out)
    alone = [stage.run([entry])[0].caption for entry in image_inputs[:2]]
    assert alone == [o.caption for o in out[:2]]  # beam search: deterministic, batch-independent
    tokens = stage._captioner.processor.tokenizer(out[0].caption, add_special_tokens=False)["input_ids"]
    assert len(tokens) <= 16  # max_length 20 minus the 4 prompt tokens


def test_image_captioning_config_checks():
    from capvqa.stages.image_captioning import ImageCaptioningConfig

    with pytest.raises(ConfigError):
        ImageCaptioningConfig(min_length=30)
    assert ImageCaptioningConfig().num_beams == 3


# -------------------------------------------------------------------------------------- CLIP tags


def test_vocabulary_ships_with_the_package():
    from capvqa.stages.clip_tags import load_tag_vocabulary

    vocabulary = load_tag_vocabulary()
    assert vocabulary[:3] == ["person", "bicycle", "car"] and "toothbrush" in vocabulary
    assert len(vocabulary) == len(set(vocabulary)) > 300


def test_select_tags_top_k_and_threshold():
    from capvqa.stages.clip_tags import select_tags

    vocab = ["a", "b", "c", "d"]
    probs = np.array([0.1, 0.6, 0.04, 0.26])
    assert select_tags(probs, vocab, 2, 0.05) == (["b", "d"], [0.6, 0.26])
    assert select_tags(probs, vocab, 4, 0.05)[0] == ["b", "d", "a"]
    assert select_tags(probs, vocab, 4, 0.0)[0] == ["b", "d", "a", "c"]
    assert select_tags(np.full(4, 0.25), vocab, 2, 0.0)[0] == ["a", "b"]  # ties: vocabulary order


def test_clip_tags_stage_returns_vocabulary_words(tiny_zoo, cpu_runtime, image_inputs, tmp_path):
    from capvqa.stages.clip_tags import ClipTags

    stage = ClipTags(model=str(tiny_zoo["clip"]), top_k=3, threshold=0.0)
    stage.setup(cpu_runtime)
    out = stage.run(image_inputs)
    for result in out:
        assert len(result.tags) == 3 and set(result.tags) <= set(stage.vocabulary)
        assert result.scores == sorted(result.scores, reverse=True)
    assert out[0] == out[2]
    strict = ClipTags(replace(stage.config, threshold=0.5, top_k=5))
    strict.setup(cpu_runtime)
    assert all(len(r.tags) <= 5 and all(s >= 0.5 for s in r.scores) for r in strict.run(image_inputs))

    custom = tmp_path / "vocab.txt"
    custom.write_text("# mine\ndog\ncat\n\ndog\n")
    small = ClipTags(model=str(tiny_zoo["clip"]), vocabulary=str(custom), top_k=5, threshold=0.0)
    small.setup(cpu_runtime)
    assert small.vocabulary == ["dog", "cat"]
    assert sorted(small.run(image_inputs[:1])[0].tags) == ["cat", "dog"]
