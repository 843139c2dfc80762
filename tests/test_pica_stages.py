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
    assert query_context("a dog on a couch", None) == "a dog on a couch"
    # tags wired but none for this image: the reference's caption + '. ' + ''
    assert query_context("a dog on a couch", []) == "a dog on a couch. "
    assert (
        query_context("a dog on a couch", ["dog", "couch", "pillow"])
        == "a dog on a couch. dog, couch, pillow"
    )


def test_ensemble_slices_take_consecutive_ranks():
    assert ensemble_slices(list(range(7)), 3, 2) == [[0, 1, 2], [3, 4, 5]]
    assert ensemble_slices(list(range(4)), 3, 2) == [[0, 1, 2], [3]]  # short pool: shorter last prompt


def _prompt_input(tags=None, question="What is it?", n_shot=1, n_ensemble=1, extra=None):
    from capvqa.stages.clip_tags import ImageTags
    from capvqa.stages.image_captioning import ImageCaption

    upstream = {
        "caption": ImageCaption(caption="a cat on a mat"),
        "examples": InContextExamples(examples=EXAMPLES, n_shot=n_shot, n_ensemble=n_ensemble),
    }
    if tags is not None:
        upstream["tags"] = ImageTags(tags=tags, scores=[0.5] * len(tags))
    upstream.update(extra or {})
    item = VQAItem(question_id=1, image_id=1, question=question, image=ImageRef(data=b"x"))
    return StageInput(item=item, item_key="k", image_hash="h", upstream=upstream)


def test_stage_builds_ensemble_prompts_from_rank_slices():
    out = PicaPrompt().run([_prompt_input(n_shot=2, n_ensemble=2)])[0]
    assert out.num_examples == 4
    assert out.prompts == [
        PICA_HEADER
        + "Context: cap 0\n===\nQ: q0?\nA: a0\n\n===\nContext: cap 1\n===\nQ: q1?\nA: a1\n\n===\n"
        + "Context: a cat on a mat\n===\nQ: What is it?\nA:",
        PICA_HEADER
        + "Context: cap 2\n===\nQ: q2?\nA: a2\n\n===\nContext: cap 3\n===\nQ: q3?\nA: a3\n\n===\n"
        + "Context: a cat on a mat\n===\nQ: What is it?\nA:",
    ]


def test_stage_slices_by_the_selection_record_alone():
    """Shots and ensemble are the selection's (stated once): the same stage slices any record as it says."""
    from capvqa.engine.stage import semantic_config
    from capvqa.stages.pica_prompt import PicaPromptConfig

    stage = PicaPrompt()
    three_of_one = stage.run([_prompt_input(n_shot=1, n_ensemble=3)])[0]
    assert [p.count("\nQ: q") for p in three_of_one.prompts] == [1, 1, 1]
    assert ["Q: q0?" in three_of_one.prompts[0], "Q: q2?" in three_of_one.prompts[2]] == [True, True]
    one_of_three = stage.run([_prompt_input(n_shot=3, n_ensemble=1)])[0]
    assert len(one_of_three.prompts) == 1 and one_of_three.num_examples == 3
    assert semantic_config(PicaPromptConfig()) == {}  # nothing of its own could disagree with the selection
    with pytest.raises(TypeError):
        PicaPrompt(n_shot=3)  # the setting no longer exists on the prompt stage


def test_tags_are_used_exactly_when_a_tags_input_is_wired():
    with_tags = PicaPrompt().run([_prompt_input(tags=["cat", "mat"])])[0]
    assert with_tags.prompts == [
        PICA_HEADER + "Context: cap 0\n===\nQ: q0?\nA: a0\n\n===\n"
        "Context: a cat on a mat. cat, mat\n===\nQ: What is it?\nA:"
    ]
    not_wired = PicaPrompt().run([_prompt_input()])[0]
    assert "Context: a cat on a mat\n" in not_wired.prompts[0]
    no_tags_found = PicaPrompt().run([_prompt_input(tags=[])])[0]  # wired, none kept: the reference's ". "
    assert "Context: a cat on a mat. \n" in no_tags_found.prompts[0]


def test_an_input_the_prompt_does_not_read_is_an_error():
    from capvqa.stages.clip_tags import ImageTags

    with pytest.raises(ConfigError, match=r"optionally \['tags'\].*\['tag'\]"):
        PicaPrompt().run([_prompt_input(extra={"tag": ImageTags(tags=["cat"], scores=[0.5])})])


def test_a_misspelt_input_is_rejected_when_the_config_loads(tmp_path):
    """`tag: tags` instead of `tags: tags` would silently drop the tags; it fails at load, before any model."""
    from capvqa.engine.config import load_spec

    def misspell(stages):
        stages["prompt"]["inputs"] = {"caption": "caption", "examples": "examples", "tag": "tags"}

    with pytest.raises(ConfigError, match=r"reads no input \['tag'\]"):
        load_spec(_saved_config(tmp_path, misspell))


def _saved_config(tmp_path, edit):
    import yaml

    from capvqa.engine.config import load_spec

    data = load_spec("pica-full").to_dict()
    edit(data["stages"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_shots_are_set_once_on_the_selection(tmp_path):
    """The prompt stage has no n_shot/n_ensemble/use_tags: an override or a run config saved before this
    change that states them is rejected when it loads (before anything runs), naming the keys."""
    from capvqa.engine.config import load_spec

    with pytest.raises(ConfigError, match=r"unknown key 'prompt\.n_shot'"):
        load_spec("pica", ["prompt.n_shot=3"])
    old_run = _saved_config(tmp_path, lambda stages: stages["prompt"].update(n_shot=16, n_ensemble=5, use_tags=True))
    with pytest.raises(ConfigError, match=r"stage 'prompt' has unknown parameters \['n_ensemble', 'n_shot', 'use_tags'\]"):
        load_spec(old_run)
    spec = load_spec("pica-full", ["examples.n_shot=3"])
    assert spec.stage("examples").params["n_shot"] == 3 and "n_shot" not in spec.stage("prompt").params


def test_prompt_inputs_are_checked_when_the_config_loads(tmp_path):
    from capvqa.engine.config import load_spec

    wrong_tags = _saved_config(tmp_path, lambda stages: stages["prompt"]["inputs"].update(tags="caption"))
    with pytest.raises(ConfigError, match=r"stage 'prompt'.*input 'tags'.*'caption'.*tags"):
        load_spec(wrong_tags)
    wrong_examples = _saved_config(tmp_path, lambda stages: stages["prompt"]["inputs"].update(examples="tags"))
    with pytest.raises(ConfigError, match=r"stage 'prompt'.*input 'examples'.*'tags'.*n_shot"):
        load_spec(wrong_examples)


def test_the_pool_captioner_is_the_pipelines_caption_stage():
    """Config building gives examples.pool_captioner the caption stage's own config, overrides included."""
    from capvqa.engine.config import build_stage_config, load_spec
    from capvqa.engine.runner import BoundStage
    from capvqa.stages.example_selection import ExampleSelection
    from capvqa.stages.image_captioning import ImageCaptioning

    spec = load_spec("pica", ["caption.num_beams=2", "caption.max_length=12", "models.captioner=some/captioner"])
    caption = build_stage_config(spec, spec.stage("caption"))
    pooled = build_stage_config(spec, spec.stage("examples")).pool_captioner
    assert pooled == caption and (pooled.num_beams, pooled.max_length, pooled.model) == (2, 12, "some/captioner")
    assert spec.to_dict()["stages"]["examples"]["pool_captioner"] == "caption"  # saved as the stage's name
    # the selection's key holds the caption stage's fingerprint (its settings), not a copy of a default
    selection = ExampleSelection(build_stage_config(spec, spec.stage("examples")))
    assert selection._pool_captioner_config() == caption
    assert BoundStage.create("x", ImageCaptioning(caption), {}).fingerprint != BoundStage.create(
        "x", ImageCaptioning(replace(caption, num_beams=3)), {}).fingerprint
    with pytest.raises(ConfigError, match=r"pool_captioner names stage 'nope'.*stages: \['caption'"):
        load_spec("pica", ["examples.pool_captioner=nope"])
    with pytest.raises(ConfigError, match=r"pool_captioner names stage 'examples'"):
        load_spec("pica", ["examples.pool_captioner=examples"])


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
                    {"image_id": 9, "id": 4, "caption": " \n "},  # blank: skipped
                ]
            }
        )
    )
    captions = load_coco_captions(path)
    # verbatim, as PICa's reference puts them into the prompt; only blank captions are skipped
    assert captions == {7: ["A dog  runs.\n", "Second caption."], 8: ["A cat."]}
    assert first_caption(captions, "7") == "A dog  runs.\n"
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
