"""The OpenAI-compatible completions backend against a real local HTTP server serving the tiny OPT.

The server (a ``ThreadingHTTPServer`` on 127.0.0.1, port 0) implements the completions schema with its
own greedy decoding of the tiny model and can be scripted to fail: status codes with headers, slow
answers, dropped connections. Everything stays on the loopback interface and is shut down at the end.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler

import pytest
import torch
from loopback_server import serving
from test_llm_answer import entry

from capvqa.engine.codec import record_to_json
from capvqa.errors import UserError
from capvqa.llm import GenerationSettings
from capvqa.llm.openai_api import OpenAICompletionsClient, completion_from_response, parse_retry_after
from capvqa.stages.llm_answer import LLMAnswerer

KEY_ENV = "CAPVQA_TEST_LLM_KEY"
KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
PROMPTS = [
    "Question: what is it?\nAnswer:",
    "1 2 3 4 5 6",
    "Please reason the answer.\nContexts: A man.\nQuestion: who?\nAnswer:",
    "the cat sat on the mat. The dog",
    "hello world",
]


class CompletionsApp:
    """State of the fake API: the model, a script of failures, and what was received."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_lock = threading.Lock()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.script: deque = deque()  # one action per coming request, then normal answers
            self.always = None  # an action for every request (persistent failure)
            self.requests: list[dict] = []
            self.in_flight = 0
            self.max_in_flight = 0
            self.delay_s = 0.0

    def next_action(self):
        with self.lock:
            return self.script.popleft() if self.script else self.always

    def complete(self, body: dict) -> dict:
        """Greedy completion in the completions schema, cut at ``stop`` like a real server.

        Like vLLM, the returned ``tokens``/``token_logprobs`` include the token that contained the stop
        string (the text does not), so the client has to decide which tokens produced the text; and
        ``finish_reason`` is "stop" both at a stop string and at end-of-sequence, with vLLM's
        ``stop_reason`` telling them apart (the stop string, or null).
        """
        tokenizer, stop = self.tokenizer, body.get("stop") or []
        ids = tokenizer(body["prompt"], return_tensors="pt")
        with self.model_lock, torch.inference_mode():
            out = self.model.generate(
                **ids,
                do_sample=False,
                max_new_tokens=body["max_tokens"],
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=1,
            )
        generated = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
        logprobs = [float(step[0].float().log_softmax(-1)[tok]) for step, tok in zip(out.logits, generated)]
        finish, stop_reason = "length", None
        if tokenizer.eos_token_id in generated:
            cut = generated.index(tokenizer.eos_token_id)
            generated, logprobs = generated[:cut], logprobs[:cut]
            finish = "stop"
        prefixes = [
            tokenizer.decode(generated[:k], skip_special_tokens=True) for k in range(len(generated) + 1)
        ]
        text = prefixes[-1]
        hits = sorted((text.find(s), s) for s in stop if s in text)
        n = len(generated)
        if hits:
            text, finish, stop_reason = text[: hits[0][0]], "stop", hits[0][1]
            n = next(k for k in range(len(generated) + 1) if len(prefixes[k]) > len(text))  # incl. stop token
        pieces = [prefixes[k][len(prefixes[k - 1]) :] for k in range(1, n + 1)]
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                    "logprobs": {
                        "tokens": pieces,
                        "token_logprobs": logprobs[:n],
                        "top_logprobs": None,
                        "text_offset": None,
                    },
                }
            ],
        }


def make_handler(app: CompletionsApp):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.leave()  # before the reply goes out: the client may send its next request right after
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            auth = self.headers.get("Authorization", "")
            with app.lock:
                app.requests.append({"path": self.path, "body": body, "authorized": auth == f"Bearer {KEY}"})
                app.in_flight += 1
                app.max_in_flight = max(app.max_in_flight, app.in_flight)
            self.counted = True
            try:
                self.respond(body, auth)
            finally:
                self.leave()

        def leave(self) -> None:
            if getattr(self, "counted", False):
                self.counted = False
                with app.lock:
                    app.in_flight -= 1

        def respond(self, body: dict, auth: str) -> None:
            if self.path != "/v1/completions":
                return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            if auth != f"Bearer {KEY}":  # echo the key, as some servers do: the client must scrub it
                return self.send_json(
                    401, {"error": {"message": f"invalid key {auth.removeprefix('Bearer ')}"}}
                )
            action = app.next_action()
            if app.delay_s:
                time.sleep(app.delay_s)
            if action is not None:
                kind = action[0]
                if kind == "status":
                    return self.send_json(
                        action[1], {"error": {"message": f"scripted {action[1]}"}}, action[2]
                    )
                if kind == "sleep":
                    time.sleep(action[1])
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
            return self.send_json(200, app.complete(body))

    return Handler


@pytest.fixture(scope="module")
def local_lm(tiny_zoo, cpu_runtime):
    from capvqa.llm.huggingface import HuggingFaceLM
    from capvqa.models.loading import ModelRef

    return HuggingFaceLM.load(ModelRef(str(tiny_zoo["causal_lm"])), cpu_runtime)


@pytest.fixture(scope="module")
def server(local_lm):
    app = CompletionsApp(local_lm.model, local_lm.tokenizer)
    with serving(make_handler(app)) as app.base_url:
        yield app


@pytest.fixture
def api(server, monkeypatch):
    server.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    return server


def client(server, **kwargs) -> OpenAICompletionsClient:
    options = {
        "base_url": server.base_url,
        "model": "tiny-opt",
        "api_key_env": KEY_ENV,
        "max_retries": 3,
        "timeout_s": 5.0,
        "backoff_base_s": 0.001,
    }
    options.update(kwargs)
    return OpenAICompletionsClient(**options)


SETTINGS = GenerationSettings(max_new_tokens=10, stop=("\n", "."))


# ---------------------------------------------------------------------------------------------------


def test_stage_answers_equal_the_local_backend(api, local_lm, cpu_runtime, caplog):
    caplog.set_level(logging.DEBUG)
    common = {"model": "tiny-opt", "max_new_tokens": 10}
    remote = LLMAnswerer(backend="openai", base_url=api.base_url, api_key_env=KEY_ENV, **common)
    remote.setup(cpu_runtime)
    local = LLMAnswerer(llm=local_lm, **common)
    local.setup(cpu_runtime)
    entries = [entry([p], qid=i) for i, p in enumerate(PROMPTS)]
    got, want = remote.run(entries), local.run(entries)
    assert [(r.answer, r.raw) for r in got] == [(r.answer, r.raw) for r in want]
    assert [r.logprob for r in got] == pytest.approx([r.logprob for r in want], abs=1e-4)
    assert [r.candidates[0]["num_tokens"] for r in got] == [r.candidates[0]["num_tokens"] for r in want]
    assert len(api.requests) == len(PROMPTS) and all(r["authorized"] for r in api.requests)
    sent = api.requests[0]["body"]
    assert sent["temperature"] == 0 and sent["logprobs"] == 1 and sent["max_tokens"] == 10
    assert sent["stop"] == ["\n", "."] and sent["model"] == "tiny-opt"
    # the key is in no record, config, log line or repr
    assert KEY not in json.dumps([record_to_json(r) for r in got])
    assert KEY not in repr(remote.config) and KEY not in repr(remote.backend)
    assert KEY not in caplog.text


def test_img2llm_okvqa_answers_over_the_api_equal_local(api, tiny_zoo, cpu_runtime, monkeypatch):
    """The server drops the stop string from the text: whether one ended the completion comes from its
    finish_reason / stop_reason, so Img2LLM's OK-VQA rule lemmatises exactly the answers it does locally."""
    from test_llm_answer import IMG2LLM_PROMPTS, load_steered_opt

    steered = load_steered_opt(tiny_zoo, cpu_runtime)  # answers " rockets." and " kites" x 10
    monkeypatch.setattr(api, "model", steered.model)
    common = {"model": "tiny-opt", "task": "okvqa", "lemmatizer": "rule"}
    remote = LLMAnswerer(backend="openai", base_url=api.base_url, api_key_env=KEY_ENV, **common)
    remote.setup(cpu_runtime)
    local = LLMAnswerer(llm=steered, **common)
    local.setup(cpu_runtime)
    entries = [entry([p], qid=i) for i, p in enumerate(IMG2LLM_PROMPTS)]
    got = [(r.answer, r.raw, r.candidates[0]["stopped"]) for r in remote.run(entries)]
    want = [(r.answer, r.raw, r.candidates[0]["stopped"]) for r in local.run(entries)]
    assert got == want
    assert got[0] == ("rocket", " rockets", True) and got[1][2] is False  # lemmatised after the period only


def test_pica_ensemble_over_the_api_equals_local(api, local_lm, cpu_runtime):
    common = {"model": "tiny-opt", "max_new_tokens": 5, "stop": ["\n"], "postprocess": "pica"}
    remote = LLMAnswerer(
        backend="openai", base_url=api.base_url, api_key_env=KEY_ENV, concurrency=2, **common
    )
    remote.setup(cpu_runtime)
    local = LLMAnswerer(llm=local_lm, **common)
    local.setup(cpu_runtime)
    entries = [entry(PROMPTS[:3], 1), entry(PROMPTS[3:], 2)]
    got, want = remote.run(entries), local.run(entries)
    assert [(r.answer, r.prompt_index) for r in got] == [(r.answer, r.prompt_index) for r in want]
    assert api.max_in_flight <= 2


def test_segmented_prompts_are_sent_as_their_joined_text(api, local_lm, cpu_runtime, caplog):
    from test_llm_answer import INSTRUCTION, REST, SEGMENTED

    remote = LLMAnswerer(backend="openai", model="tiny-opt", base_url=api.base_url, api_key_env=KEY_ENV)
    remote.setup(cpu_runtime)
    local = LLMAnswerer(llm=local_lm, model="tiny-opt")
    local.setup(cpu_runtime)
    got = remote.run([entry([INSTRUCTION + REST], 1, segments=[SEGMENTED]), entry([INSTRUCTION + REST], 2)])
    assert [r["body"]["prompt"] for r in api.requests] == [INSTRUCTION + REST] * 2
    # the server tokenises the text once: one BOS, as the local backend does for the unsegmented prompt
    want = local.run([entry([INSTRUCTION + REST], 2)])[0]
    assert [r.raw for r in got] == [want.raw] * 2
    assert caplog.text.count("segmented prompts are sent as one text") == 1
    remote.run([entry([INSTRUCTION + REST], 3, segments=[SEGMENTED])])
    assert caplog.text.count("segmented prompts are sent as one text") == 1  # once per client


def test_429_with_retry_after_is_honoured(api, caplog):
    api.script.append(("status", 429, {"Retry-After": "0.3"}))
    started = time.monotonic()
    result = client(api).complete([PROMPTS[0]], SETTINGS)
    assert time.monotonic() - started >= 0.3
    assert len(api.requests) == 2 and isinstance(result[0].text, str)
    assert "HTTP 429" in caplog.text and KEY not in caplog.text


def test_500_then_success(api):
    api.script.append(("status", 500, {}))
    api.script.append(("drop",))  # a dropped connection is retried too
    result = client(api).complete(PROMPTS[:1], SETTINGS)
    assert len(api.requests) == 3 and result[0].logprob is not None


def test_persistent_503_fails_after_bounded_retries(api):
    api.always = ("status", 503, {})
    with pytest.raises(UserError) as error:
        client(api, max_retries=2).complete(PROMPTS[:1], SETTINGS)
    assert len(api.requests) == 3
    message = str(error.value)
    assert "3 attempt(s)" in message and "HTTP 503" in message and api.base_url in message


def test_timeout_is_retried(api):
    api.script.append(("sleep", 2.0))
    result = client(api, timeout_s=0.5).complete(PROMPTS[:1], SETTINGS)
    # the first request timed out and was retried (a loaded machine may time out a retry too)
    assert len(api.requests) >= 2 and isinstance(result[0].text, str)


def test_persistent_timeout_fails_clearly(api):
    api.always = ("sleep", 0.6)
    with pytest.raises(UserError, match="timeout_s=0.2"):
        client(api, timeout_s=0.2, max_retries=1).complete(PROMPTS[:1], SETTINGS)
    assert len(api.requests) == 2


def test_client_errors_are_not_retried_and_echoed_keys_are_scrubbed(api, monkeypatch, caplog):
    wrong = "sk-wrong-SECRET-key-999"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(UserError, match="HTTP 401") as error:
        client(api).complete(PROMPTS[:1], SETTINGS)
    assert len(api.requests) == 1
    assert wrong not in str(error.value) and "***" in str(error.value) and wrong not in caplog.text
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(UserError, match="HTTP 404"):
        client(api, base_url=api.base_url + "/wrong").complete(PROMPTS[:1], SETTINGS)
    api.script.append(("status", 302, {"Location": api.base_url + "/elsewhere"}))
    with pytest.raises(UserError, match="HTTP 302"):  # redirects would carry the key: not followed
        client(api).complete(PROMPTS[:1], SETTINGS)
    assert not any(r["path"].endswith("/elsewhere") for r in api.requests)


def test_concurrency_limit_and_alignment(api):
    api.delay_s = 0.05
    results = client(api, concurrency=2).complete(PROMPTS, SETTINGS)
    alone = [client(api).complete([p], SETTINGS)[0] for p in PROMPTS]
    assert api.max_in_flight <= 2
    assert [r.text for r in results] == [r.text for r in alone]


def test_missing_key_variable_is_a_clear_error(monkeypatch, cpu_runtime):
    monkeypatch.delenv("CAPVQA_NO_SUCH_KEY", raising=False)
    stage = LLMAnswerer(
        model="tiny-opt", backend="openai", base_url="http://127.0.0.1:9/v1", api_key_env="CAPVQA_NO_SUCH_KEY"
    )
    with pytest.raises(UserError, match="CAPVQA_NO_SUCH_KEY"):
        stage.setup(cpu_runtime)


def test_connection_refused_fails_after_retries(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_client = OpenAICompletionsClient(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        api_key_env=KEY_ENV,
        max_retries=1,
        backoff_base_s=0.001,
        timeout_s=2,
    )
    with pytest.raises(UserError, match="connection failed"):
        api_client.complete(["hi"], SETTINGS)


# ---------------------------------------------------------------------------------------------------
# Pure parts


def test_completion_from_response_sums_the_tokens_that_made_the_text():
    payload = {
        "choices": [
            {
                "text": " a dog",
                "logprobs": {"tokens": [" a", " dog", "\n"], "token_logprobs": [-0.5, -1.0, -0.1]},
            }
        ]
    }
    completion = completion_from_response(payload, ("\n",))
    assert (completion.text, completion.logprob, completion.num_tokens) == (" a dog", -1.5, 2)
    no_tokens = {"choices": [{"text": " a dog", "logprobs": {"token_logprobs": [-0.5, -1.0]}}]}
    assert completion_from_response(no_tokens, ("\n",)).logprob == -1.5
    assert completion_from_response({"choices": [{"text": "x"}]}, ()).logprob is None
    ignored_stop = {
        "choices": [
            {
                "text": " red\nQuestion",
                "logprobs": {"tokens": [" red", "\n", "Question"], "token_logprobs": [-1.0, -2.0, -3.0]},
            }
        ]
    }
    assert completion_from_response(ignored_stop, ("\n",)).logprob == -1.0
    assert completion_from_response(ignored_stop, ("\n",)).stopped  # the client's own cut


def test_completion_from_response_keeps_the_listed_tokens_for_picas_score():
    """The server's tokens and log-probabilities come back whole, as PICa's reference read them; only
    with both lists of one length (a null value counts 0, as it adds nothing to the sum)."""
    listed = {"choices": [{"text": " yes", "logprobs": {
        "tokens": [" yes", "\n\n", "Q"], "token_logprobs": [-0.25, -1.0, None]}}]}
    completion = completion_from_response(listed, ("\n",))
    assert completion.generated_tokens == (" yes", "\n\n", "Q")
    assert completion.generated_logprobs == (-0.25, -1.0, 0.0)
    assert completion.logprob == -0.25  # the tokens that produced the text: Img2LLM's record
    unaligned = {"choices": [{"text": " a", "logprobs": {"tokens": [" a"], "token_logprobs": [-1.0, -2.0]}}]}
    assert completion_from_response(unaligned, ("\n",)).generated_tokens is None
    no_tokens = {"choices": [{"text": " a", "logprobs": {"token_logprobs": [-1.0]}}]}
    assert completion_from_response(no_tokens, ("\n",)).generated_logprobs is None


@pytest.mark.parametrize(
    ("choice", "stop", "stopped"),
    [
        ({"finish_reason": "stop"}, ("\n",), True),  # OpenAI: a stop string (or end-of-sequence)
        ({"finish_reason": "length"}, ("\n",), False),  # max_tokens reached
        ({"finish_reason": "stop", "stop_reason": "\n"}, ("\n",), True),  # vLLM: the stop string
        ({"finish_reason": "stop", "stop_reason": None}, ("\n",), False),  # vLLM: end-of-sequence
        ({"finish_reason": "stop", "stop_reason": 50118}, ("\n",), False),  # vLLM: a stop token id
        ({"finish_reason": "stop_sequence"}, ("\n",), True),  # TGI
        ({"finish_reason": "eos_token"}, ("\n",), False),  # TGI
        ({"finish_reason": "content_filter"}, ("\n",), False),
        ({}, ("\n",), True),  # not said: the server was asked to stop there
        ({"finish_reason": "stop"}, (), False),  # no stop strings sent: end-of-sequence
        ({"finish_reason": "length", "text": " red\nQuestion"}, ("\n",), True),  # stop ignored, cut here
    ],
)
def test_stopped_comes_from_the_finish_reason(choice, stop, stopped):
    payload = {"choices": [{"text": " red", **choice}]}
    assert completion_from_response(payload, stop).stopped is stopped
    with pytest.raises(UserError, match="choices"):
        completion_from_response({"error": "x"}, ())


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
