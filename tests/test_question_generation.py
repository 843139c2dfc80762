"""Img2LLM question generation on the tiny T5, and the T5_large_QG.pth conversion."""

import http.server
import threading

import pytest
import torch

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput, semantic_config
from capvqa.errors import ConfigError, ModelLoadError
from capvqa.models import qg_checkpoint
from capvqa.models.checkpoints import checkpoint_download_path
from capvqa.models.loading import ModelRef
from capvqa.stages.answer_extraction import CandidateAnswers
from capvqa.stages.caption_filter import FilteredCaptions
from capvqa.stages.question_generation import (
    QG_TEMPLATE,
    SPACED_CAPTION_SEPARATOR,
    SPACED_QG_TEMPLATE,
    QuestionGeneration,
    QuestionGenerationConfig,
    qg_inputs,
)


def entry(captions, answers, key):
    item = VQAItem(question_id=key, image_id=1, question="what is it?", image=ImageRef(data=b"x"))
    return StageInput(
        item=item, item_key=key, image_hash="h",
        upstream={
            "captions": FilteredCaptions(captions=list(captions), scores=[], all_scores=[], threshold=0.5),
            "answers": CandidateAnswers(answers=list(answers), counts=[1] * len(answers), extractor="rule",
                                        answer_captions={}),
        },
    )


def test_input_is_the_references_by_default():
    # LAVIS: "answer: %s  context: %s." % (answer + ".", captions concatenated with no separator)
    texts = qg_inputs(["dog", "yes"], ["a dog on a beach", "a man surfing"])
    assert texts == [
        "answer: dog.  context: a dog on a beacha man surfing.",
        "answer: yes.  context: a dog on a beacha man surfing.",
    ]
    assert QuestionGenerationConfig().template == QG_TEMPLATE and QuestionGenerationConfig().caption_separator == ""
    # the stage feeds the answer stage's plain answers ("dog", "yes") and adds the reference's period
    stage = QuestionGeneration(model="unused")
    inputs = stage.inputs_for(entry(["a dog on a beach", "a man surfing"], ["dog", "man", "yes"], "k"))
    assert inputs == [f"answer: {a}.  context: a dog on a beacha man surfing." for a in ("dog", "man", "yes")]


def test_spaced_variant_is_selectable():
    spaced = qg_inputs(["dog"], ["a dog on a beach", "a man surfing"], SPACED_QG_TEMPLATE, SPACED_CAPTION_SEPARATOR)
    assert spaced == ["answer: dog  context: a dog on a beach a man surfing."]
    # captions are joined as given, as LAVIS joins them
    assert qg_inputs(["dog"], [" a dog ", "a man"]) == ["answer: dog.  context:  a dog a man."]
    stage = QuestionGeneration(model="unused", template=SPACED_QG_TEMPLATE, caption_separator=" ")
    assert stage.inputs_for(entry(["a b", "c"], ["b", "yes"], "k")) == [
        "answer: b  context: a b c.", "answer: yes  context: a b c."
    ]
    # the format is part of the cache key: the two variants never share generated questions
    assert semantic_config(stage.config) != semantic_config(QuestionGenerationConfig(model="unused"))


@pytest.mark.parametrize("template", ["answer: {answr}  context: {context}.", "answer: {answer}", "{0} {answer}"])
def test_bad_template_is_a_config_error(template):
    with pytest.raises(ConfigError, match="template"):
        QuestionGenerationConfig(template=template)


@pytest.fixture(scope="module")
def qg(tiny_zoo, cpu_runtime):
    stage = QuestionGeneration(model=str(tiny_zoo["qg"]), max_length=8, max_inputs_per_generate=3)
    stage.setup(cpu_runtime)
    return stage


ENTRIES = [
    (["a man riding a horse on the beach", "a brown horse"], ["horse", "man", "beach", "yes"]),
    ([], ["yes"]),
    (["two dogs playing in the snow with a red frisbee near some trees"], ["dogs", "two", "frisbee", "yes"]),
]


def test_batched_generation_equals_one_by_one(qg):
    batch = [entry(c, a, f"k{i}") for i, (c, a) in enumerate(ENTRIES)]
    together = qg.run(batch)
    assert [r.answers for r in together] == [a for _, a in ENTRIES]
    assert [len(r.questions) for r in together] == [len(a) for _, a in ENTRIES]
    for result, one in zip(together, batch):
        alone = [qg.generate([text])[0] for text in qg.inputs_for(one)]
        assert result.questions == alone
    assert all(isinstance(q, str) for r in together for q in r.questions)


def test_decoding_is_beam_search_with_max_length(qg):
    text = qg.inputs_for(entry(*ENTRIES[0], "k"))[0]
    tokens = qg.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        plain = qg._model.generate(**tokens, num_beams=3, max_length=8, do_sample=False)
    assert qg.generate([text]) == [qg.tokenizer.decode(plain[0], skip_special_tokens=True).strip()]


# --------------------------------------------------------------------------------------------------
# T5_large_QG.pth conversion


def fake_qg_checkpoint(zoo_folder, path, *, prefix="", extra=None):
    """A checkpoint as LAVIS's authors saved it: a transformers-4.x T5 state dict under "model", with the
    embedding copies sharing storage with ``shared`` and an untied ``lm_head``."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(zoo_folder)
    generator = torch.Generator().manual_seed(7)
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.05
    shared = state["shared.weight"]
    state["encoder.embed_tokens.weight"] = shared
    state["decoder.embed_tokens.weight"] = shared
    state["lm_head.weight"] = torch.randn(shared.shape, generator=generator) * 0.05
    state = {prefix + name: tensor for name, tensor in state.items()}
    payload = {"model": state}
    if extra is not None:
        payload["extra"] = extra
    torch.save(payload, path)
    return {name.removeprefix(prefix): tensor for name, tensor in state.items()}


def test_checkpoint_converts_and_loads_back_untied(tiny_zoo, cpu_runtime, tmp_path, torch_load_calls):
    state = fake_qg_checkpoint(tiny_zoo["qg"], tmp_path / "T5_large_QG.pth")
    loads = torch_load_calls
    checkpoint = str(tmp_path / "T5_large_QG.pth")
    stage = QuestionGeneration(model=str(tiny_zoo["qg"]), checkpoint=checkpoint, max_length=6)
    stage.setup(cpu_runtime)
    assert loads and all(kwargs.get("weights_only") is True for kwargs in loads)

    model = stage._model
    assert not model.config.scale_decoder_outputs  # still the t5-lm-adapt (v1.1) architecture
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert torch.equal(model.shared.weight, state["shared.weight"])
    assert torch.equal(model.encoder.embed_tokens.weight, state["shared.weight"])
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert len(stage.run([entry(*ENTRIES[0], "k")])[0].questions) == 4

    # converted once: a second setup reuses the folder
    folder = qg_checkpoint.ensure_qg_model(checkpoint, ModelRef(str(tiny_zoo["qg"])))
    assert folder.parent == qg_checkpoint.capvqa_home() / "models" / "converted"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert qg_checkpoint.ensure_qg_model(checkpoint, ModelRef(str(tiny_zoo["qg"]))) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_tied_checkpoint_stays_tied_and_module_prefix_is_removed(tiny_zoo, tmp_path):
    state = fake_qg_checkpoint(tiny_zoo["qg"], tmp_path / "tied.pth", prefix="module.")
    assert qg_checkpoint.load_checkpoint_state_dict(tmp_path / "tied.pth").keys() == state.keys()
    state["lm_head.weight"] = state["shared.weight"]
    torch.save({"model": state}, tmp_path / "tied.pth")
    folder = qg_checkpoint.ensure_qg_model(str(tmp_path / "tied.pth"), ModelRef(str(tiny_zoo["qg"])))
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))


class NotATensor:
    pass


def test_loader_refuses_pickled_objects(tiny_zoo, tmp_path):
    fake_qg_checkpoint(tiny_zoo["qg"], tmp_path / "evil.pth", extra=NotATensor())
    with pytest.raises(ModelLoadError, match="tensors only"):
        qg_checkpoint.load_checkpoint_state_dict(tmp_path / "evil.pth")


def test_checkpoint_of_another_model_is_rejected(tiny_zoo, tmp_path):
    state = fake_qg_checkpoint(tiny_zoo["qg"], tmp_path / "other.pth")
    state["shared.weight"] = torch.zeros(3, 3)
    del state["encoder.final_layer_norm.weight"]
    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="does not fit"):
        qg_checkpoint.ensure_qg_model(str(tmp_path / "other.pth"), ModelRef(str(tiny_zoo["qg"])))
    torch.save({"weights": state}, tmp_path / "nokey.pth")
    with pytest.raises(ModelLoadError, match="no state dict under 'model'"):
        qg_checkpoint.load_checkpoint_state_dict(tmp_path / "nokey.pth")


def test_url_is_downloaded_once(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": {"w": torch.ones(2)}}, served / "T5_large_QG.pth")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/T5_large_QG.pth"
    try:
        with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
            qg_checkpoint.resolve_checkpoint(url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("CAPVQA_DOWNLOAD_MIRROR", raising=False)
        path = qg_checkpoint.resolve_checkpoint(url)
        again = qg_checkpoint.resolve_checkpoint(url)
    finally:
        server.shutdown()
        server.server_close()
    assert path == again == checkpoint_download_path(url)
    assert path.name == "T5_large_QG.pth" and str(path).startswith(str(qg_checkpoint.capvqa_home()))
    assert requests == ["/T5_large_QG.pth"]
    assert torch.equal(qg_checkpoint.load_checkpoint_state_dict(path)["w"], torch.ones(2))
