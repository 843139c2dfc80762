"""End-to-end vision-language models (docs/methods.md#end-to-end-vision-language-models): the prompt
formats, the answerer stage on every tiny-zoo family, and the pipelines run from the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.config import load_spec
from capvqa.engine.stage import StageInput
from capvqa.errors import ConfigError
from capvqa.stages.vlm_answer import VLMAnswerConfig, VLMAnswerer
from capvqa.text.vlm_prompts import PROMPT_FORMATS, chat_messages, clean_answer, prompt_format, render_prompt

SHORT = "\nAnswer the question using a single word or phrase."

# role in the tiny zoo -> (prompt format, decoder-only LM); test_vlm_backends serves each on every backend
FAMILIES = {
    "blip2": ("blip2", False),
    "blip2_opt": ("blip2", True),
    "instructblip": ("instructblip", False),
    "llava": ("llava", True),
}
# and the families answered in-process only: test_vlm_backends' vLLM stand-in builds AutoProcessor, which
# needs torchvision for Qwen2-VL (vLLM itself installs torchvision)
IN_PROCESS_FAMILIES = {**FAMILIES, "qwen2_vl": ("qwen2_vl", True)}
PIPELINES = ["blip2", "blip2-opt-2.7b", "instructblip", "llava", "qwen-vl"]


# ---------------------------------------------------------------------------------------------------
# Prompts (pure)


@pytest.mark.parametrize(("name", "expected"), [
    # LAVIS's blip_question: lower-case, the marks dropped, trailing spaces cut
    ("blip2", "Question: what is the man left  doing? Short answer:"),
    # LAVIS's blip_caption: lower-case, the marks become spaces, whitespace collapsed and stripped
    ("instructblip", "Question: what is the man left doing? Short Answer:"),
])
def test_plain_formats_are_the_lavis_prompts_over_lavis_question_processing(name, expected):
    assert render_prompt(prompt_format(name), "What is the Man (left)  doing?! ") == expected


def test_chat_formats_keep_the_question_as_is():
    assert render_prompt(prompt_format("llava"), "What is the Man (left) doing?!") == (
        "USER: <image>\nWhat is the Man (left) doing?!" + SHORT + " ASSISTANT:")


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics"])
def test_chat_formats_put_image_then_short_answer_instruction_in_one_user_turn(name):
    seen = []

    def template(messages):
        seen.append(messages)
        return "<rendered>"

    assert render_prompt(prompt_format(name), "what is it?", template) == "<rendered>"
    assert seen == [chat_messages("what is it?" + SHORT)]
    assert seen[0][0]["content"][0] == {"type": "image"}


def test_llava_without_a_chat_template_uses_the_llava_hf_layout():
    assert render_prompt(prompt_format("llava"), "what is it?") == "USER: <image>\nwhat is it?" + SHORT + " ASSISTANT:"


@pytest.mark.parametrize("name", ["qwen2_vl", "idefics"])
def test_a_chat_only_format_without_a_template_is_an_error(name):
    with pytest.raises(ConfigError, match="chat template"):
        render_prompt(prompt_format(name), "what is it?")


def test_unknown_format_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="blip2"):
        VLMAnswerConfig(prompt_format="flamingo")
    assert set(PROMPT_FORMATS) >= {"blip2", "instructblip", "llava", "qwen2_vl", "idefics"}


@pytest.mark.parametrize(("raw", "answer"), [
    (" two ", "two"), ("\n yes\nbecause the sky", "yes"), ("", ""), ("\n\n", ""), ("a red car.", "a red car."),
])
def test_clean_answer_keeps_the_first_non_empty_line(raw, answer):
    assert clean_answer(raw) == answer


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"num_beams": 0}, {"batch_size": 0}])
def test_config_checks(bad):
    with pytest.raises(ConfigError):
        VLMAnswerConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# The stage on each tiny family


def _inputs(folder: Path, questions: list[str]) -> list[StageInput]:
    rng = np.random.default_rng(0)
    sizes = [(90, 120), (48, 64)]
    entries = []
    for i, question in enumerate(questions):
        path = folder / f"img{i % 2}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 2], 3), dtype=np.uint8)).save(path)
        item = VQAItem(question_id=i, image_id=i % 2, question=question, image=ImageRef(path=path))
        entries.append(StageInput(item=item, item_key=f"item-{i}", image_hash=f"img{i % 2}"))
    return entries


QUESTIONS = ["what is on the table?", "how many cats are on the bed in this room?", "is it sunny?"]


@pytest.mark.parametrize("role", list(IN_PROCESS_FAMILIES))
def test_each_family_answers_a_batch_as_it_answers_each_item(role, tiny_zoo, cpu_runtime, tmp_path):
    fmt, decoder_only = IN_PROCESS_FAMILIES[role]
    stage = VLMAnswerer(model=str(tiny_zoo[role]), prompt_format=fmt, max_new_tokens=4)
    stage.setup(cpu_runtime)
    try:
        vlm = stage.vlm
        assert vlm.decoder_only is decoder_only
        assert vlm.tokenizer.padding_side == ("left" if decoder_only else "right")
        entries = _inputs(tmp_path, QUESTIONS)
        batched = stage.run(entries)
        one_by_one = [stage.run([entry])[0] for entry in entries]
    finally:
        stage.cleanup()
    assert batched == one_by_one  # padding changes no answer
    for question, out in zip(QUESTIONS, batched):
        assert isinstance(out.answer, str) and out.answer == clean_answer(out.raw)
        assert 0 <= out.num_tokens <= 4
        assert question in out.prompt
    if role == "llava":
        assert batched[0].prompt == "USER: <image>\n" + QUESTIONS[0] + SHORT + " ASSISTANT:"
    elif role == "qwen2_vl":
        assert batched[0].prompt == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>" + QUESTIONS[0] + SHORT + "<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert batched[0].prompt == render_prompt(prompt_format(fmt), QUESTIONS[0])


def test_beam_search_runs_and_is_deterministic(tiny_zoo, cpu_runtime, tmp_path):
    stage = VLMAnswerer(model=str(tiny_zoo["blip2"]), prompt_format="blip2", max_new_tokens=4, num_beams=3,
                        length_penalty=-1.0)
    stage.setup(cpu_runtime)
    entries = _inputs(tmp_path, QUESTIONS[:2])
    assert stage.run(entries) == stage.run(entries)
    stage.cleanup()


def test_blip2_opt_can_end_answers_at_a_line_break_as_lavis(tiny_zoo, cpu_runtime, tmp_path, monkeypatch):
    stage = VLMAnswerer(model=str(tiny_zoo["blip2_opt"]), prompt_format="blip2", max_new_tokens=6, num_beams=2,
                        length_penalty=0.0, newline_ends=True)
    stage.setup(cpu_runtime)
    vlm = stage.vlm
    newline = vlm.newline_id()
    assert vlm.tokenizer.decode([newline]) == "\n"
    seen = {}
    real_generate = vlm.model.generate

    def recording_generate(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(vlm.model, "generate", recording_generate)
    outputs = stage.run(_inputs(tmp_path, QUESTIONS[:2]))
    stage.cleanup()
    assert seen["eos_token_id"] == newline and seen["num_beams"] == 2
    assert all("\n" not in out.raw.rstrip("\n") for out in outputs)


def test_a_mismatched_format_warns(tiny_zoo, cpu_runtime, caplog):
    stage = VLMAnswerer(model=str(tiny_zoo["llava"]), prompt_format="blip2")
    stage.setup(cpu_runtime)
    stage.cleanup()
    assert "prompt format 'blip2' is for blip-2 models" in caplog.text


def test_the_stage_satisfies_the_contract():
    from capvqa.engine.registry import check_stage_class

    check_stage_class(VLMAnswerer, "VLMAnswerer")


# ---------------------------------------------------------------------------------------------------
# Pipelines from the CLI


def _capvqa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capvqa", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", PIPELINES)
def test_each_alias_maps_its_role_to_the_tiny_zoo(name, tiny_zoo):
    spec = load_spec(name, models_preset="tiny")
    (role,) = spec.models
    assert spec.models[role] == str(tiny_zoo[role])


def test_qwen2_vl_without_torchvision_loads_an_image_only_processor_and_says_so(tiny_zoo, cpu_runtime, caplog):
    import importlib.util

    from capvqa.models.loading import ModelRef
    from capvqa.models.qwen2_vl_image_processor import Qwen2VLImageOnlyProcessor
    from capvqa.models.vlm import load_vision_language_model

    assert load_spec("qwen-vl").models == {"qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct"}
    vlm = load_vision_language_model(ModelRef(str(tiny_zoo["qwen2_vl"])), cpu_runtime)
    if importlib.util.find_spec("torchvision") is None:
        assert type(vlm.processor) is Qwen2VLImageOnlyProcessor
        assert "videos unavailable" in caplog.text
    assert vlm.model_type == "qwen2_vl" and vlm.chat_template is not None
    vlm.close()


def test_other_import_errors_of_a_processor_are_not_hidden(tiny_zoo, cpu_runtime, monkeypatch):
    import capvqa.models.vlm as vlm_module
    from capvqa.models.loading import ModelRef

    def fail(*args, **kwargs):
        raise ImportError("LlavaProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(vlm_module, "load_processor", fail)
    with pytest.raises(ImportError, match="LlavaProcessor"):  # a torchvision error, but not Qwen2-VL's
        vlm_module.load_vision_language_model(ModelRef(str(tiny_zoo["llava"])), cpu_runtime)


@pytest.mark.parametrize(("name", "dataset", "expected"), [
    ("blip2", "okvqa", 40.7), ("blip2-flan-t5-xl", "vqav2", 63.1), ("blip2-opt-2.7b", "vqav2", 53.5),
])
def test_shipped_blip2_configs_find_their_published_numbers(name, dataset, expected):
    from capvqa.report.published import lookup_published

    spec = load_spec(name).to_dict()
    config = dict(spec, run={"dataset": dataset, "split": "val2014"})
    assert lookup_published(config).result.accuracy == expected
    assert not lookup_published(dict(config, models_preset="tiny")).applies


@pytest.mark.slow
def test_every_vlm_alias_writes_a_complete_run_and_the_report_compares_them(tmp_path, tiny_zoo):
    outs = []
    for name in PIPELINES:
        out = tmp_path / name
        result = _capvqa("run", name, "--dataset", "sample", "--models", "tiny", "--limit", "4", "--out", str(out),
                         "--set", "vlm.max_new_tokens=3")
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((out / "status.json").read_text())["status"] == "complete"
        predictions = json.loads((out / "predictions.json").read_text())
        assert len(predictions) == 4
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        assert all(r["stages"]["vlm"]["prompt"] for r in records)
        assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
        outs.append(out)
    pnp = tmp_path / "pnp"
    result = _capvqa("run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "4", "--out", str(pnp),
                     "--set", "captioning.num_captions=4", "--set", "captioning.num_patches=4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "report.md"
    result = _capvqa("report", *map(str, [*outs, pnp]), "--out", str(tmp_path / "report.html"),
                     "--markdown", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    for name in PIPELINES:
        assert f"| {name} |" in text
    html = (tmp_path / "report.html").read_text()
    for system in ("BLIP-2", "Frozen", "Flamingo"):  # systems capvqa cannot run are shown for comparison
        assert f"{system}: published VQA accuracy" in html

    # a second run of one alias is served from the cache
    again = _capvqa("run", "llava", "--dataset", "sample", "--models", "tiny", "--limit", "4",
                    "--out", str(tmp_path / "again"), "--set", "vlm.max_new_tokens=3")
    assert again.returncode == 0, again.stderr[-3000:]
    timings = json.loads((tmp_path / "again" / "timings.json").read_text())
    assert "vlm" in json.dumps(timings)
    assert (json.loads((tmp_path / "again" / "predictions.json").read_text())
            == json.loads((tmp_path / "llava" / "predictions.json").read_text()))
