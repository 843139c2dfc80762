"""Few-shot IDEFICS (docs/methods.md#few-shot-idefics): the interleaved prompt, the stage on the tiny
Idefics3 with examples from the bundled sample's pool, the config's cross-stage checks, and the pipeline
from the CLI."""

import json
import subprocess
import sys

import pytest
import yaml
from PIL import ImageChops

from capvqa.data.datasets import open_dataset
from capvqa.data.images import load_image
from capvqa.engine.config import load_spec
from capvqa.engine.stage import DatasetContext, StageInput
from capvqa.errors import ConfigError, DataError
from capvqa.stages import vlm_fewshot_answer as fewshot
from capvqa.stages.example_selection import InContextExamples
from capvqa.stages.vlm_fewshot_answer import (
    END_OF_UTTERANCE,
    VLMFewShotAnswerer,
    VLMFewShotConfig,
    stop_token_ids,
)
from capvqa.synthetic.tiny_zoo import IDEFICS3_CHAT_TEMPLATE
from capvqa.text.vlm_prompts import few_shot_format, few_shot_messages, prompt_format, render_few_shot_prompt

SHORT = "\nAnswer the question using a single word or phrase."


# ---------------------------------------------------------------------------------------------------
# Prompt (pure)


def test_few_shot_messages_interleave_examples_then_the_query():
    messages = few_shot_messages(prompt_format("idefics"), [("what is it?", "dog"), ("how many?", "2")], "where?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "what is it?" + SHORT}]
    assert messages[1]["content"] == [{"type": "text", "text": "dog"}]
    assert messages[3]["content"] == [{"type": "text", "text": "2"}]
    assert messages[4]["content"] == [{"type": "image"}, {"type": "text", "text": "where?" + SHORT}]


def test_idefics3_chat_template_renders_the_few_shot_prompt(tiny_zoo):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_zoo["idefics"])
    assert processor.chat_template == IDEFICS3_CHAT_TEMPLATE

    def template(messages):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    text = render_few_shot_prompt(prompt_format("idefics"), [("what is it?", "dog")], "where?", template)
    assert text == ("<|begin_of_text|>User:<image>what is it?" + SHORT + "<end_of_utterance>\n"
                    "Assistant: dog<end_of_utterance>\n"
                    "User:<image>where?" + SHORT + "<end_of_utterance>\nAssistant:")


@pytest.mark.parametrize("name", ["blip2", "instructblip", "llava", "qwen2_vl"])
def test_single_image_formats_cannot_hold_examples(name):
    with pytest.raises(ConfigError, match="in-context examples"):
        few_shot_format(name)
    with pytest.raises(ConfigError, match="idefics"):
        VLMFewShotConfig(prompt_format=name)


def test_few_shot_prompts_need_a_chat_template():
    with pytest.raises(ConfigError, match="chat template"):
        render_few_shot_prompt(prompt_format("idefics"), [], "where?", None)


# ---------------------------------------------------------------------------------------------------
# The stage on the tiny Idefics3, the bundled sample as pool


@pytest.fixture(scope="module")
def sample_items():
    return list(open_dataset("sample"))


def _entries(items, shots: dict[int, list[int]], n_shot: int) -> list[StageInput]:
    """Queries (sample question id -> the pool question ids selected for it, best first)."""
    by_id = {item.question_id: item for item in items}
    entries = []
    for query_id, example_ids in shots.items():
        item = by_id[query_id]
        examples = [{"question_id": i, "question": by_id[i].question, "answer": by_id[i].answers[0],
                     "caption": "c", "score": 1.0} for i in example_ids]
        record = InContextExamples(examples=examples, n_shot=n_shot, n_ensemble=1)
        entries.append(StageInput(item=item, item_key=f"k{query_id}", image_hash=f"h{item.image_id}",
                                  upstream={"examples": record}))
    return entries


@pytest.fixture(scope="module")
def stage(tiny_zoo, cpu_runtime):
    stage = VLMFewShotAnswerer(model=str(tiny_zoo["idefics"]), pool_dataset="sample", max_new_tokens=4)
    stage.setup(cpu_runtime)
    yield stage
    stage.cleanup()


def test_examples_come_first_most_similar_last_each_with_its_pool_image(stage, sample_items, monkeypatch):
    ids = [item.question_id for item in sample_items]
    query, ranked = ids[0], [ids[5], ids[9], ids[13], ids[20]]  # best first, as the selection ranks them
    seen = []
    real_generate = fewshot.generate_interleaved

    def recording_generate(vlm, image_lists, prompts, **kwargs):
        seen.append(image_lists)
        return real_generate(vlm, image_lists, prompts, **kwargs)

    monkeypatch.setattr(fewshot, "generate_interleaved", recording_generate)
    (out,) = stage.run(_entries(sample_items, {query: ranked}, n_shot=3))
    by_id = {item.question_id: item for item in sample_items}
    in_prompt = [ranked[2], ranked[1], ranked[0]]  # the top n_shot, reversed
    assert out.example_ids == in_prompt
    positions = [out.prompt.index(f"User:<image>{by_id[i].question}{SHORT}") for i in in_prompt]
    assert positions == sorted(positions)
    assert out.prompt.count("<image>") == 4
    assert out.prompt.endswith(f"User:<image>{by_id[query].question}{SHORT}<end_of_utterance>\nAssistant:")
    assert f"Assistant: {by_id[ranked[0]].answers[0]}<end_of_utterance>\nUser:<image>{by_id[query].question}" \
        in out.prompt
    (images,) = seen[0]
    expected = [load_image(by_id[i].image) for i in in_prompt] + [load_image(by_id[query].image)]
    assert len(images) == 4
    for got, want in zip(images, expected):
        assert got.size == want.size and ImageChops.difference(got, want).getbbox() is None
    assert 0 <= out.num_tokens <= 4


def test_a_batch_gets_the_answers_its_items_get_alone(stage, sample_items):
    ids = [item.question_id for item in sample_items]
    shots = {ids[0]: [ids[3], ids[4]], ids[1]: [ids[7]], ids[2]: [ids[8], ids[11], ids[12], ids[15]]}
    entries = _entries(sample_items, shots, n_shot=4)
    batched = stage.run(entries)
    assert batched == [stage.run([entry])[0] for entry in entries]  # left padding changes no answer
    assert [len(out.example_ids) for out in batched] == [2, 1, 4]  # a short pool gives shorter prompts


def test_no_examples_is_the_zero_shot_prompt(stage, sample_items):
    (out,) = stage.run(_entries(sample_items, {sample_items[0].question_id: []}, n_shot=8))
    assert out.example_ids == [] and out.prompt.count("<image>") == 1


def test_generation_stops_at_the_end_of_the_assistant_turn(stage):
    tokenizer = stage.vlm.tokenizer
    stops = stop_token_ids(stage.vlm)
    assert tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE) in stops
    assert tokenizer.eos_token_id in stops


def test_each_image_is_one_view_unless_image_splitting_is_on(stage, sample_items, monkeypatch):
    lengths = []
    real_generate = stage.vlm.model.generate

    def recording_generate(**kwargs):
        lengths.append((kwargs["input_ids"].shape[1], kwargs["pixel_values"].shape[1]))
        return real_generate(**kwargs)

    monkeypatch.setattr(stage.vlm.model, "generate", recording_generate)
    images = [load_image(item.image) for item in sample_items[:2]]
    prompt = render_few_shot_prompt(stage.format, [("what is it?", "a cat")], "where?", stage.vlm.chat_template)
    for splitting in (False, True):
        fewshot.generate_interleaved(stage.vlm, [images], [prompt], max_new_tokens=1, stop_ids=[0],
                                     image_splitting=splitting)
    (one_view, views), (split, split_views) = lengths
    assert views == 2 and split_views > 2 and split > one_view  # tiles plus a global view per image


def test_an_example_outside_the_pool_is_a_data_error(stage, sample_items):
    entry = _entries(sample_items, {sample_items[0].question_id: []}, n_shot=1)[0]
    bad = InContextExamples(examples=[{"question_id": 987654321, "question": "q", "answer": "a", "caption": "c",
                                       "score": None}], n_shot=1, n_ensemble=1)
    with pytest.raises(DataError, match="987654321"):
        stage.run([StageInput(item=entry.item, item_key="x", image_hash="y", upstream={"examples": bad})])


def test_the_zero_shot_idefics_format_runs_on_the_tiny_idefics3(tiny_zoo, cpu_runtime, sample_items):
    from capvqa.stages.vlm_answer import VLMAnswerer

    answerer = VLMAnswerer(model=str(tiny_zoo["idefics"]), prompt_format="idefics", max_new_tokens=3)
    answerer.setup(cpu_runtime)
    entries = [StageInput(item=item, item_key=f"k{item.question_id}", image_hash=f"h{item.image_id}")
               for item in (sample_items[0], sample_items[4], sample_items[9])]
    batched = answerer.run(entries)
    alone = [answerer.run([entry])[0] for entry in entries]
    answerer.cleanup()
    assert [(o.answer, o.prompt) for o in batched] == [(o.answer, o.prompt) for o in alone]
    assert batched[0].prompt == (f"<|begin_of_text|>User:<image>{entries[0].item.question}{SHORT}"
                                 "<end_of_utterance>\nAssistant:")


def test_the_stage_satisfies_the_contract():
    from capvqa.engine.registry import check_stage_class

    check_stage_class(VLMFewShotAnswerer, "VLMFewShotAnswerer")


# ---------------------------------------------------------------------------------------------------
# Config: one pool, one prompt's worth of examples


def test_auto_pool_resolves_as_the_selection_resolves_it():
    from capvqa.stages.example_selection import ExampleSelection

    for spec, split in (("sample", None), ("okvqa", "val2014")):
        context = DatasetContext(spec=spec, split=split, data_root="/data")
        mine = VLMFewShotAnswerer.resolve_params({"pool_dataset": "auto", "max_new_tokens": 3}, context)
        theirs = ExampleSelection.resolve_params({"pool_dataset": "auto"}, context)
        assert mine["max_new_tokens"] == 3
        assert {k: mine.get(k) for k in theirs} == theirs


def test_the_pipeline_loads_and_maps_its_roles_to_the_tiny_zoo(tiny_zoo):
    spec = load_spec("idefics", models_preset="tiny")
    assert spec.models["idefics"] == str(tiny_zoo["idefics"])
    assert load_spec("idefics").models["idefics"] == "HuggingFaceM4/Idefics3-8B-Llama3"
    assert spec.stage("examples").params["n_shot"] == 8


@pytest.mark.parametrize(("overrides", "message"), [
    (["examples.pool_dataset=okvqa"], "pool_dataset: 'auto' here, 'okvqa' there"),
    (["vlm.pool_limit=10"], "pool_limit"),
    (["examples.n_ensemble=2"], "n_ensemble"),
])
def test_the_pools_must_agree_and_one_prompt_of_examples(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_spec("idefics", overrides=overrides)
    load_spec("idefics", overrides=["examples.pool_dataset=okvqa", "vlm.pool_dataset=okvqa"])


# ---------------------------------------------------------------------------------------------------
# The pipeline from the CLI


@pytest.mark.slow
def test_idefics_writes_a_complete_run_with_the_sample_as_its_pool(tmp_path, tiny_zoo):
    out = tmp_path / "idefics"
    result = subprocess.run([sys.executable, "-m", "capvqa", "run", "idefics", "--dataset", "sample", "--models",
                             "tiny", "--limit", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert len(json.loads((out / "predictions.json").read_text())) == 4
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for record in records:
        vlm = record["stages"]["vlm"]
        selected = [e["question_id"] for e in record["stages"]["examples"]["examples"]]
        assert vlm["example_ids"] == selected[:8][::-1]
        assert record["question_id"] not in vlm["example_ids"]  # the query is never its own example
        assert vlm["prompt"].count("<image>") == len(vlm["example_ids"]) + 1
    stages = yaml.safe_load((out / "config.yaml").read_text())["stages"]
    assert stages["vlm"]["pool_dataset"] == stages["examples"]["pool_dataset"] == "sample"  # auto, resolved
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
