"""Image+text requests on every backend of the VLM answer stage (docs/methods.md#served-vision-language-models).

* ``vllm``: against a stand-in ``vllm`` module with vLLM's offline API extended to images. It checks
  that every request is what real vLLM takes -- ``{"prompt": str, "multi_modal_data": {"image":
  PIL.Image}}``, the prompt carrying the image placeholder where vLLM expects one (LLaVA) and none where
  vLLM adds the image tokens itself (BLIP-2, InstructBLIP), greedy ``SamplingParams``, one image per
  prompt allowed at start-up -- and decodes each request alone with the tiny zoo model, returning token
  ids with the end-of-sequence token as vLLM does. The answers must equal the Hugging Face backend's.
* ``openai``: a loopback chat completions server (``ThreadingHTTPServer`` on 127.0.0.1, port 0) that
  decodes the image's data URL, applies the model's chat template as vLLM's server does, runs the tiny
  VLM and answers; the image it receives must be the item's, and the answers the Hugging Face backend's.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import threading
import types
from collections import deque
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from loopback_server import serving
from PIL import Image
from test_vlm_answer import FAMILIES, QUESTIONS, _inputs

from capvqa.data.images import load_image
from capvqa.engine.codec import record_to_json
from capvqa.errors import ConfigError, UserError
from capvqa.llm import VisionLanguageBackend, VlmDecoding
from capvqa.llm.openai_api import (
    OpenAIChatVisionClient,
    image_data_url,
    vision_chat_body,
    vlm_completion_from_chat,
)
from capvqa.stages.vlm_answer import VLMAnswerConfig, VLMAnswerer
from capvqa.text.vlm_prompts import prompt_format, question_text

KEY_ENV = "CAPVQA_TEST_VLM_KEY"
KEY = "sk-vlm-test-DO-NOT-LEAK-42"
#: model types whose vLLM prompt carries the image placeholder (vLLM adds BLIP-2's query tokens itself)
PLACEHOLDER_TYPES = frozenset({"llava", "qwen2_vl", "idefics3"})


def answers(records):
    """What must agree across backends: everything but the backend's name."""
    return [(r.answer, r.raw, r.num_tokens) for r in records]


@pytest.fixture(scope="module")
def hf_answers(tiny_zoo, cpu_runtime, tmp_path_factory):
    """{role: (entries, records)} of the in-process backend, greedy, 4 new tokens."""
    folder = tmp_path_factory.mktemp("vlm-backends")
    entries = _inputs(folder, QUESTIONS)
    results = {}
    for role, (fmt, _) in FAMILIES.items():
        stage = VLMAnswerer(model=str(tiny_zoo[role]), prompt_format=fmt, max_new_tokens=4)
        stage.setup(cpu_runtime)
        results[role] = stage.run(entries)
        stage.cleanup()
    return entries, results


# ---------------------------------------------------------------------------------------------------
# vLLM: a stand-in of its offline API with multimodal prompts


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeVisionLLM:
    instances: list = []

    def __init__(self, model, revision=None, dtype=None, tensor_parallel_size=1, gpu_memory_utilization=0.9,
                 max_model_len=None, seed=0, limit_mm_per_prompt=None, trust_remote_code=False):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self.kwargs = dict(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           max_model_len=max_model_len, limit_mm_per_prompt=limit_mm_per_prompt)
        self.model_type = AutoConfig.from_pretrained(model).model_type
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.requests: list = []
        self.params: list = []
        FakeVisionLLM.instances.append(self)

    def get_tokenizer(self):
        return self.processor.tokenizer

    def generate(self, prompts, params, use_tqdm=True):
        assert isinstance(prompts, list) and params.temperature == 0.0
        for request in prompts:
            assert set(request) == {"prompt", "multi_modal_data"} and isinstance(request["prompt"], str)
            assert set(request["multi_modal_data"]) == {"image"}
            image = request["multi_modal_data"]["image"]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            placeholders = request["prompt"].count(str(self.processor.image_token))
            assert placeholders == (1 if self.model_type in PLACEHOLDER_TYPES else 0), request["prompt"]
        self.requests.append(prompts)
        self.params.append(params)
        return [self._greedy(request["prompt"], request["multi_modal_data"]["image"], params) for request in prompts]

    def _greedy(self, prompt, image, params):
        tokenizer = self.processor.tokenizer
        stop_ids = list(getattr(params, "stop_token_ids", None) or [])
        ends = stop_ids if getattr(params, "ignore_eos", False) else [tokenizer.eos_token_id, *stop_ids]
        inputs = self.processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=params.max_tokens,
                                      eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        encoder_decoder = self.model.config.get_text_config().is_encoder_decoder
        # vLLM returns the generated ids only (no prompt, no decoder start), the end token included
        ids = out[0, 1:] if encoder_decoder else out[0, inputs["input_ids"].shape[1]:]
        ids = ids.tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=ids)])


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeVisionLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeVisionLLM.instances.clear()
    return module


@pytest.fixture
def gpu_runtime(cpu_runtime):
    return replace(cpu_runtime, device=torch.device("cuda"), dtype=torch.bfloat16)


@pytest.mark.parametrize("role", list(FAMILIES))
def test_vllm_answers_equal_the_hugging_face_backend(role, fake_vllm, hf_answers, tiny_zoo, gpu_runtime):
    entries, hf = hf_answers
    fmt, _ = FAMILIES[role]
    stage = VLMAnswerer(model=str(tiny_zoo[role]), prompt_format=fmt, max_new_tokens=4, backend="vllm")
    stage.setup(gpu_runtime)
    got = stage.run(entries)
    stage.cleanup()
    assert answers(got) == answers(hf[role])
    assert [r.prompt for r in got] == [r.prompt for r in hf[role]]  # the processor's template, applied alike
    assert {r.backend for r in got} == {f"vllm:{tiny_zoo[role]}"} and hf[role][0].backend == f"hf:{tiny_zoo[role]}"
    (llm,) = FakeVisionLLM.instances
    assert llm.kwargs == {"model": str(tiny_zoo[role]), "dtype": "bfloat16", "tensor_parallel_size": 1,
                          "max_model_len": None, "limit_mm_per_prompt": {"image": 1}}
    (requests,) = llm.requests  # the whole batch in one generate call
    assert [r["prompt"] for r in requests] == [r.prompt for r in hf[role]]
    for request, entry in zip(requests, entries):  # the item's decoded pixels, as the HF backend reads them
        assert np.array_equal(np.asarray(request["multi_modal_data"]["image"]), np.asarray(load_image(entry.item.image)))
    params = llm.params[0]
    assert params.max_tokens == 4 and not hasattr(params, "stop_token_ids")


def test_vllm_ends_at_the_line_break_as_lavis_blip2_opt(fake_vllm, tiny_zoo, cpu_runtime, gpu_runtime, tmp_path):
    common = {"model": str(tiny_zoo["blip2_opt"]), "prompt_format": "blip2", "max_new_tokens": 6,
              "newline_ends": True}
    entries = _inputs(tmp_path, QUESTIONS)
    local = VLMAnswerer(**common)
    local.setup(cpu_runtime)
    served = VLMAnswerer(**common, backend="vllm")
    served.setup(gpu_runtime)
    assert answers(served.run(entries)) == answers(local.run(entries))
    params = FakeVisionLLM.instances[-1].params[-1]
    # the line break is the only end-of-sequence token, as generate(eos_token_id=newline) makes it
    assert params.stop_token_ids == [local.vlm.newline_id()] and params.ignore_eos is True


def test_vllm_needs_cuda_and_the_package_before_loading_anything(fake_vllm, monkeypatch, tiny_zoo, cpu_runtime):
    stage = VLMAnswerer(model=str(tiny_zoo["llava"]), prompt_format="llava", backend="vllm")
    with pytest.raises(ConfigError, match="CUDA"):
        stage.setup(cpu_runtime)
    assert not FakeVisionLLM.instances
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError, match=r"capvqa\[vllm\]"):
        VLMAnswerer(model=str(tiny_zoo["llava"]), prompt_format="llava", backend="vllm").setup(cpu_runtime)


# ---------------------------------------------------------------------------------------------------
# Settings checked when the config loads, and what the cache key holds


@pytest.mark.parametrize(("bad", "message"), [
    ({"backend": "tgi"}, "unknown backend 'tgi'"),
    ({"backend": "vllm", "num_beams": 5}, "greedily only.*num_beams 1"),
    ({"backend": "openai", "num_beams": 2}, "greedily only"),
    ({"backend": "openai", "image_format": "webp"}, "image_format"),
    ({"backend": "openai", "base_url": "api.example.com"}, "http://"),
    ({"backend": "openai", "timeout_s": 0}, "timeout_s > 0"),
    ({"backend": "vllm", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
])
def test_backend_settings_are_checked_when_the_config_loads(bad, message):
    with pytest.raises(ConfigError, match=message):
        VLMAnswerConfig(**bad)


def test_backend_settings_from_the_cli_are_checked_before_any_model(tiny_zoo):
    from capvqa.engine.config import load_spec

    with pytest.raises(ConfigError, match="num_beams is 5"):  # the blip2 config decodes with LAVIS's 5 beams
        load_spec("blip2", overrides=["vlm.backend=vllm"], models_preset="tiny")
    spec = load_spec("blip2", overrides=["vlm.backend=vllm", "vlm.num_beams=1"], models_preset="tiny")
    assert spec.to_dict()["stages"]["vlm"]["backend"] == "vllm"


def _fingerprint(stage):
    from capvqa.engine.runner import BoundStage

    return BoundStage.create("vlm", stage, {}, "float32").fingerprint


def test_the_cache_key_holds_what_changes_answers(tiny_zoo, monkeypatch):
    monkeypatch.setattr("capvqa.models.loading.model_fingerprint", lambda ref: f"fp:{ref.id}")
    base = {"model": "gpt-4o-mini", "prompt_format": "llava", "max_new_tokens": 8}
    api = {**base, "backend": "openai", "base_url": "http://127.0.0.1:8000/v1"}
    key = _fingerprint(VLMAnswerer(**api))
    for changed in ({"base_url": "http://10.0.0.2:8000/v1"}, {"api_model": "llava-1.5"}, {"image_format": "jpeg"},
                    {"max_new_tokens": 9}, {"prompt_format": "qwen2_vl"}):
        assert _fingerprint(VLMAnswerer(**{**api, **changed})) != key, changed
    for same in ({"api_key_env": "OTHER"}, {"concurrency": 9}, {"max_retries": 0}, {"timeout_s": 5.0},
                 {"batch_size": 1}):
        assert _fingerprint(VLMAnswerer(**{**api, **same})) == key, same
    local = {**base, "model": str(tiny_zoo["llava"])}
    keys = {_fingerprint(VLMAnswerer(**local, backend=b)) for b in ("hf", "vllm")} | {key}
    assert len(keys) == 3  # hf, vllm and a server never share answers
    assert _fingerprint(VLMAnswerer(**local, backend="vllm", tensor_parallel_size=2)) == _fingerprint(
        VLMAnswerer(**local, backend="vllm"))


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible chat completions with image content


class ChatApp:
    """The fake server's state: one tiny VLM per served name, failures to script, what was received."""

    def __init__(self, models) -> None:
        self.models = models  # served name -> VisionLanguageModel
        self.model_lock = threading.Lock()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.script: deque = deque()
            self.requests: list[dict] = []
            self.images: list[tuple[str, bytes]] = []  # (mime type, decoded bytes) of every image received
            self.rendered: list[str] = []
            self.in_flight = self.max_in_flight = 0

    def template(self, model, messages) -> str:
        """The server's chat template: the model's own (vLLM's server), else the user text as is (what
        ``--chat-template`` must give a template-less BLIP-2)."""
        if model.chat_template is not None:
            return model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(part["text"] for part in messages[0]["content"] if part["type"] == "text")

    def answer(self, body: dict) -> dict:
        model = self.models[body["model"]]
        (message,) = body["messages"]
        assert message["role"] == "user"
        messages, image = [{"role": "user", "content": []}], None
        for part in message["content"]:
            if part["type"] == "image_url":
                header, _, data = part["image_url"]["url"].partition(",")
                assert header.startswith("data:image/") and header.endswith(";base64")
                raw = base64.b64decode(data, validate=True)
                with self.lock:
                    self.images.append((header[5:-7], raw))
                image = Image.open(io.BytesIO(raw)).convert("RGB")
                messages[0]["content"].append({"type": "image"})
            else:
                messages[0]["content"].append({"type": "text", "text": part["text"]})
        prompt = self.template(model, messages)
        with self.lock:
            self.rendered.append(prompt)
        with self.model_lock:
            (completion,) = model.generate([image], [prompt], VlmDecoding(max_new_tokens=body["max_tokens"]))
        text = completion.text
        for stop in body.get("stop") or []:
            text = text.split(stop)[0]
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"completion_tokens": completion.num_tokens}}


def make_handler(app: ChatApp):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def send_json(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            auth = self.headers.get("Authorization", "")
            with app.lock:
                app.requests.append({"path": self.path, "body": body})
                app.in_flight += 1
                app.max_in_flight = max(app.max_in_flight, app.in_flight)
                action = app.script.popleft() if app.script else None
            try:
                if self.path != "/v1/chat/completions":
                    return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
                if auth != f"Bearer {KEY}":
                    return self.send_json(401, {"error": {"message": f"invalid key {auth.removeprefix('Bearer ')}"}})
                if action is not None:
                    return self.send_json(action, {"error": {"message": f"scripted {action}"}})
                return self.send_json(200, app.answer(body))
            finally:
                with app.lock:
                    app.in_flight -= 1

    return Handler


@pytest.fixture(scope="module")
def chat_server(tiny_zoo, cpu_runtime):
    from capvqa.models.loading import ModelRef
    from capvqa.models.vlm import load_vision_language_model

    models = {role: load_vision_language_model(ModelRef(str(tiny_zoo[role])), cpu_runtime) for role in FAMILIES}
    app = ChatApp(models)
    with serving(make_handler(app)) as app.base_url:
        yield app


@pytest.fixture
def api(chat_server, monkeypatch):
    chat_server.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    return chat_server


def remote_stage(api, role, **kwargs) -> VLMAnswerer:
    fmt, _ = FAMILIES[role]
    options = {"model": role, "prompt_format": fmt, "max_new_tokens": 4, "backend": "openai",
               "base_url": api.base_url, "api_key_env": KEY_ENV, "retry_backoff_s": 0.001, "timeout_s": 30.0}
    return VLMAnswerer(**{**options, **kwargs})


@pytest.mark.parametrize("role", list(FAMILIES))
def test_openai_answers_equal_the_hugging_face_backend(role, api, hf_answers, cpu_runtime, caplog):
    caplog.set_level(logging.DEBUG)
    entries, hf = hf_answers
    stage = remote_stage(api, role, concurrency=2)
    stage.setup(cpu_runtime)
    got = stage.run(entries)
    assert answers(got) == answers(hf[role])
    fmt = prompt_format(FAMILIES[role][0])
    # the record holds the user turn's text; the server's template made the text the local model read
    assert [r.prompt for r in got] == [question_text(fmt, q) for q in QUESTIONS]
    assert sorted(api.rendered) == sorted(r.prompt for r in hf[role])
    assert {r.backend for r in got} == {f"openai:{role}@{api.base_url}"}
    assert api.max_in_flight <= 2 and len(api.requests) == len(entries)
    body = next(r["body"] for r in api.requests if QUESTIONS[0] in json.dumps(r["body"]))
    assert body["temperature"] == 0 and body["max_tokens"] == 4 and body["model"] == role and "stop" not in body
    image_part, text_part = body["messages"][0]["content"]  # the family's order: the image, then the text
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": question_text(fmt, QUESTIONS[0])}
    # each request's image is its own item's image, pixel for pixel
    assert [mime for mime, _ in api.images] == ["image/png"] * len(entries)
    for entry in entries:
        (request,) = [r["body"] for r in api.requests
                      if r["body"]["messages"][0]["content"][1]["text"] == question_text(fmt, entry.item.question)]
        raw = base64.b64decode(request["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1])
        arrived = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        assert np.array_equal(arrived, np.asarray(load_image(entry.item.image)))
    assert KEY not in json.dumps([record_to_json(r) for r in got]) and KEY not in caplog.text
    assert KEY not in repr(stage.config) and KEY not in repr(stage.vlm)


def test_openai_sends_jpeg_when_asked(api, cpu_runtime, tmp_path):
    entries = _inputs(tmp_path, QUESTIONS[:1])
    stage = remote_stage(api, "llava", image_format="jpeg")
    stage.setup(cpu_runtime)
    stage.run(entries)
    ((mime, raw),) = api.images
    item = load_image(entries[0].item.image)
    expected = io.BytesIO()
    item.save(expected, format="JPEG", quality=95)
    assert mime == "image/jpeg" and raw == expected.getvalue()  # the item's image, encoded once
    assert Image.open(io.BytesIO(raw)).size == item.size


def test_openai_newline_ends_is_a_stop_string(api, cpu_runtime, tmp_path):
    stage = remote_stage(api, "blip2_opt", newline_ends=True)
    stage.setup(cpu_runtime)
    stage.run(_inputs(tmp_path, QUESTIONS[:1]))
    assert api.requests[0]["body"]["stop"] == ["\n"]


def test_openai_retries_then_fails_clearly(api, cpu_runtime, tmp_path, caplog):
    entries = _inputs(tmp_path, QUESTIONS[:1])
    stage = remote_stage(api, "blip2", max_retries=2)
    stage.setup(cpu_runtime)
    api.script.extend([503, 429])
    assert len(stage.run(entries)) == 1 and len(api.requests) == 3
    assert "VLM API" in caplog.text and "HTTP 503" in caplog.text
    api.reset()
    api.script.extend([503, 503, 503])
    with pytest.raises(UserError, match=r"VLM API .* failed after 3 attempt\(s\): HTTP 503"):
        stage.run(entries)
    api.reset()
    api.script.append(400)  # a bad request is not retried
    with pytest.raises(UserError, match="HTTP 400"):
        stage.run(entries)
    assert len(api.requests) == 1


def test_openai_key_problems_are_clear_and_scrubbed(api, monkeypatch, cpu_runtime, tmp_path):
    monkeypatch.delenv("CAPVQA_NO_SUCH_VLM_KEY", raising=False)
    with pytest.raises(UserError, match="CAPVQA_NO_SUCH_VLM_KEY"):
        remote_stage(api, "llava", api_key_env="CAPVQA_NO_SUCH_VLM_KEY").setup(cpu_runtime)
    wrong = "sk-wrong-VLM-secret-77"
    monkeypatch.setenv(KEY_ENV, wrong)
    stage = remote_stage(api, "llava")
    stage.setup(cpu_runtime)
    with pytest.raises(UserError, match="HTTP 401") as error:  # the server echoes the key; we scrub it
        stage.run(_inputs(tmp_path, QUESTIONS[:1]))
    assert wrong not in str(error.value) and "***" in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Pure parts


def test_chat_body_is_the_family_turn_with_a_data_url():
    decoding = VlmDecoding(max_new_tokens=7, newline_ends=True)
    body = vision_chat_body("m", "data:image/png;base64,AAAA", "what?", decoding)
    assert body == {"model": "m", "max_tokens": 7, "temperature": 0, "n": 1, "stop": ["\n"], "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "what?"}]}]}


def test_image_data_url_round_trips_png_exactly():
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    url = image_data_url(Image.fromarray(pixels))
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), pixels)
    with pytest.raises(ConfigError, match="image_format"):
        image_data_url(Image.fromarray(pixels), "gif")


@pytest.mark.parametrize(("payload", "stop", "expected"), [
    ({"choices": [{"message": {"content": " two\n"}}], "usage": {"completion_tokens": 3}}, (), (" two\n", 3)),
    ({"choices": [{"message": {"content": "red\nblue"}}]}, ("\n",), ("red", 0)),  # a server that ignored stop
    ({"choices": [{"message": {"content": [{"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]}}]},
     (), ("a cat", 0)),
    ({"choices": [{"message": {"content": None, "refusal": "no"}}]}, (), ("", 0)),
])
def test_vlm_completion_from_chat(payload, stop, expected):
    completion = vlm_completion_from_chat(payload, stop)
    assert (completion.text, completion.num_tokens) == expected


def test_a_response_without_a_message_is_a_clear_error():
    with pytest.raises(UserError, match="chat/completions"):
        vlm_completion_from_chat({"choices": [{"text": "x"}]})


def test_every_backend_satisfies_the_protocol(monkeypatch):
    from capvqa.llm.vllm_backend import VLLMVisionBackend
    from capvqa.models.vlm import VisionLanguageModel

    monkeypatch.setenv(KEY_ENV, KEY)
    client = OpenAIChatVisionClient(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    assert isinstance(client, VisionLanguageBackend)
    for cls in (VisionLanguageModel, VLLMVisionBackend):
        assert all(callable(getattr(cls, method, None)) for method in ("render", "generate", "close"))
