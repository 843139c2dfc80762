"""BLIP-2 as PICa's captioner (docs/methods.md#query-context-caption-and-tags): the caption stage runs a
BLIP-2 checkpoint as LAVIS's BLIP-2 captioning evaluation does, BLIP's captions and cache keys stay as
they were, the pool's captions come from the same stage, and ``pica-blip2`` runs from the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capvqa.data.datasets import open_dataset
from capvqa.engine.config import build_stage_config, load_spec
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, semantic_config
from capvqa.models.blip2_captioner import BLIP2_MODEL_TYPE, checkpoint_model_type
from capvqa.models.loading import ModelRef
from capvqa.stages.example_selection import ExampleSelection
from capvqa.stages.image_captioning import ImageCaptioning, ImageCaptioningConfig

#: LAVIS projects/blip2/eval/caption_coco_*_eval.yaml (beams, max_len, min_len) and the caption models' prompt
LAVIS_BLIP2_CAPTIONING = {"prompt": "a photo of", "num_beams": 5, "max_length": 30, "min_length": 8}


@pytest.fixture(scope="module")
def sample_inputs():
    """Six sample questions; the first three show three different images."""
    items, seen = [], set()
    for item in open_dataset("sample"):
        if item.image_id not in seen:
            seen.add(item.image_id)
            items.append(item)
        if len(items) == 3:
            break
    items += [item for item in list(open_dataset("sample"))[:6] if item not in items][:3]
    return [StageInput(item=item, item_key=f"k{item.question_id}", image_hash=f"h{item.image_id}") for item in items]


def _recording(stage, monkeypatch) -> list[dict]:
    """The keyword arguments of every ``generate`` call of the stage's BLIP-2 model."""
    calls: list[dict] = []
    model = stage._blip2.model
    real = model.generate

    def recording_generate(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    return calls


def test_the_checkpoint_says_which_captioner_runs(tiny_zoo):
    assert checkpoint_model_type(ModelRef(str(tiny_zoo["blip2"]))) == BLIP2_MODEL_TYPE
    assert checkpoint_model_type(ModelRef(str(tiny_zoo["captioner"]))) == "blip"


@pytest.mark.parametrize("role", ["blip2", "blip2_opt"])
def test_blip2_captions_as_lavis_captioning_eval(role, tiny_zoo, cpu_runtime, sample_inputs, monkeypatch):
    stage = ImageCaptioning(model=str(tiny_zoo[role]), **LAVIS_BLIP2_CAPTIONING)
    stage.setup(cpu_runtime)
    try:
        assert stage._captioner is None and stage._blip2 is not None
        calls = _recording(stage, monkeypatch)
        batched = stage.run(sample_inputs[:3])
        alone = [stage.run([entry])[0] for entry in sample_inputs[:3]]
        blip2 = stage._blip2
    finally:
        stage.cleanup()
    assert batched == alone  # beam search: deterministic, batch-independent
    call = calls[0]
    assert call["num_beams"] == 5 and call["do_sample"] is False and call["max_new_tokens"] == 30
    query_tokens = blip2.model.config.num_query_tokens
    prompt_ids = blip2.tokenizer("a photo of")["input_ids"]
    assert call["input_ids"][0].tolist()[query_tokens:] == prompt_ids  # query placeholders, then the prompt
    if role == "blip2_opt":  # Blip2OPT: 8 new tokens at least, the line break ends a caption
        assert call["min_new_tokens"] == 8 and call["eos_token_id"] == blip2.newline_id()
        captions = [out.caption for out in batched]
        assert all(captions) and not any(c.startswith("a photo of") or c != c.strip() for c in captions)
    else:  # Blip2T5: min_length counts the decoder's start token, T5's own end of sequence
        assert call["min_length"] == 8 and "eos_token_id" not in call and "min_new_tokens" not in call


def test_the_prompt_less_caption_is_an_empty_prompt(tiny_zoo, cpu_runtime, sample_inputs, monkeypatch):
    stage = ImageCaptioning(model=str(tiny_zoo["blip2_opt"]), **dict(LAVIS_BLIP2_CAPTIONING, prompt=""))
    stage.setup(cpu_runtime)
    calls = _recording(stage, monkeypatch)
    stage.run(sample_inputs[:2])
    bos = stage._blip2.tokenizer.bos_token_id
    stage.cleanup()
    query_tokens = calls[0]["input_ids"].shape[1] - 1
    assert calls[0]["input_ids"][0].tolist()[query_tokens:] == [bos]


def test_blip_captions_and_their_cache_keys_are_unchanged(tiny_zoo, cpu_runtime, sample_inputs):
    # the config's semantic fields (the key) and the stage version are those BLIP captions were cached under
    assert semantic_config(ImageCaptioningConfig()) == {
        "model": "Salesforce/blip-image-captioning-large", "revision": None, "prompt": "a picture of ",
        "num_beams": 3, "max_length": 20, "min_length": 5,
    }
    assert ImageCaptioning.VERSION == "2"
    stage = ImageCaptioning(model=str(tiny_zoo["captioner"]))
    stage.setup(cpu_runtime)
    assert stage._blip2 is None and stage._captioner is not None
    via_stage = [out.caption for out in stage.run(sample_inputs[:2])]
    from capvqa.data.images import load_image

    direct = stage.caption_images([load_image(entry.item.image) for entry in sample_inputs[:2]])
    stage.cleanup()
    assert via_stage == direct


def test_pica_blip2_swaps_the_captioner_for_query_and_pool(tiny_zoo):
    spec = load_spec("pica-blip2", models_preset="tiny")
    assert spec.models["blip2"] == str(tiny_zoo["blip2"]) and "captioner" not in spec.models
    caption = build_stage_config(spec, spec.stage("caption"))
    assert caption.model == str(tiny_zoo["blip2"])
    assert {k: getattr(caption, k) for k in LAVIS_BLIP2_CAPTIONING} == LAVIS_BLIP2_CAPTIONING
    assert build_stage_config(spec, spec.stage("examples")).pool_captioner == caption  # the same stage
    hub = load_spec("pica-blip2")
    assert hub.models["blip2"] == "Salesforce/blip2-flan-t5-xl-coco"
    # everything but the captioner is PICa's default config
    pica = load_spec("pica")
    for name in ("examples", "prompt", "llm"):
        assert {k: v for k, v in hub.stage(name).params.items()} == pica.stage(name).params, name


def test_pool_captions_come_from_the_blip2_caption_stage(tiny_zoo, cpu_runtime, tmp_path, sample_inputs):
    captioner = ImageCaptioningConfig(model=str(tiny_zoo["blip2_opt"]), **LAVIS_BLIP2_CAPTIONING)
    runtime = Runtime(device=cpu_runtime.device, dtype=cpu_runtime.dtype, cache_dir=Path(tmp_path))
    selection = ExampleSelection(clip_model=str(tiny_zoo["clip"]), pool_dataset="sample", pool_captioner=captioner,
                                 mode="random", n_shot=2)
    selection.setup(runtime)
    assert selection.report.captions_generated == selection.report.items
    stage = ImageCaptioning(captioner)
    stage.setup(cpu_runtime)
    by_id = {entry.question_id: caption for entry, caption in zip(selection.entries, selection.captions)}
    for entry, out in zip(sample_inputs, stage.run(sample_inputs)):
        assert by_id[entry.item.question_id] == out.caption
    stage.cleanup()
    selection.cleanup()


@pytest.mark.slow
def test_pica_blip2_writes_a_complete_run(tmp_path, tiny_zoo):
    out = tmp_path / "pica-blip2"
    result = subprocess.run([sys.executable, "-m", "capvqa", "run", "pica-blip2", "--dataset", "sample", "--models",
                             "tiny", "--limit", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert len(json.loads((out / "predictions.json").read_text())) == 4
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    captions = {r["question_id"]: r["stages"]["caption"]["caption"] for r in records}
    for record in records:  # an example that is also a query of the run carries the query's caption
        for example in record["stages"]["examples"]["examples"]:
            if example["question_id"] in captions:
                assert example["caption"] == captions[example["question_id"]]
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
