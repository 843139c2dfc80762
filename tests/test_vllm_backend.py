"""The vLLM backend's adapter logic, against a stand-in ``vllm`` module with vLLM's offline API.

vLLM itself needs a CUDA GPU and cannot be installed here. The stand-in implements the part of its API the
backend uses -- ``LLM(...)``, ``get_tokenizer()``, ``generate(prompts, SamplingParams, use_tqdm)`` with
``{"prompt_token_ids": ...}`` prompts, outputs carrying ``token_ids`` and per-step ``{token: Logprob}``
dicts, greedy decoding that ends at end-of-sequence, ``max_tokens`` or a stop string kept in the output --
by greedy decoding the tiny OPT one prompt at a time. The backend must then give exactly what the Hugging
Face backend gives: same text, tokens, log-probabilities and truncation records.
"""

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from test_llm_answer import INSTRUCTION, PROMPTS, REST, SEGMENTED, find_stop

from capvqa.errors import ConfigError
from capvqa.llm import GenerationSettings


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    instances: list = []

    def __init__(self, model, revision=None, dtype=None, tensor_parallel_size=1, gpu_memory_utilization=0.9,
                 max_model_len=None, seed=0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = dict(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           max_model_len=max_model_len)
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        length = max_model_len or self.model.config.max_position_embeddings
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=length))
        self.params = []
        self.sent = []  # the token ids of every prompt of every generate call
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=True):
        self.params.append(params)
        self.sent.append([list(prompt["prompt_token_ids"]) for prompt in prompts])
        return [self._greedy(prompt["prompt_token_ids"], params) for prompt in prompts]

    def _greedy(self, prompt_ids, params):
        ids, generated, logprobs = list(prompt_ids), [], []
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                step = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
                token = int(step.argmax())
                ids.append(token)
                generated.append(token)
                logprobs.append({token: SimpleNamespace(logprob=float(step[token]))})
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if token == self.tokenizer.eos_token_id or any(s in text for s in params.stop or ()):
                    break
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=generated, logprobs=logprobs)])


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


@pytest.fixture(scope="module")
def causal(tiny_zoo, cpu_runtime):
    from capvqa.llm.huggingface import HuggingFaceLM
    from capvqa.models.loading import ModelRef

    return HuggingFaceLM.load(ModelRef(str(tiny_zoo["causal_lm"])), cpu_runtime, prompts_per_generate=4)


def make_backend(tiny_zoo, context_length=None):
    from capvqa.llm.vllm_backend import VLLMBackend

    llm = FakeLLM(str(tiny_zoo["causal_lm"]), max_model_len=context_length)
    return VLLMBackend(llm, context_length=llm.llm_engine.model_config.max_model_len), llm


def assert_same(got, expected):
    assert [c.text for c in got] == [c.text for c in expected]
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.num_tokens for c in got] == [c.num_tokens for c in expected]
    assert [c.prompt_tokens_dropped for c in got] == [c.prompt_tokens_dropped for c in expected]
    assert [c.stopped for c in got] == [c.stopped for c in expected]
    assert [c.logprob for c in got] == pytest.approx([c.logprob for c in expected], abs=1e-4)
    # every token through the one that ended the row, as PICa's ensemble score reads them
    assert [c.generated_tokens for c in got] == [c.generated_tokens for c in expected]
    for ours, theirs in zip(got, expected):
        assert list(ours.generated_logprobs) == pytest.approx(list(theirs.generated_logprobs), abs=1e-4)


def test_vllm_backend_equals_the_hugging_face_backend(fake_vllm, tiny_zoo, causal):
    backend, llm = make_backend(tiny_zoo)
    plain = GenerationSettings(max_new_tokens=8, stop=())
    assert_same(backend.complete(PROMPTS, plain), causal.complete(PROMPTS, plain))
    index, stop, before = find_stop(causal, GenerationSettings(max_new_tokens=12, stop=()))
    stopped = GenerationSettings(max_new_tokens=12, stop=(stop, "\n"))
    got = backend.complete(PROMPTS, stopped)
    assert_same(got, causal.complete(PROMPTS, stopped))
    assert got[index].num_tokens == before and stop not in got[index].text
    assert got[index].stopped and not all(c.stopped for c in got)  # both kinds, equal to the HF backend's
    # the token that completed the stop string is listed, with its log-probability (PICa's score)
    assert len(got[index].generated_tokens) == before + 1 and stop in "".join(got[index].generated_tokens)
    # one generate call per complete(): every prompt goes to vLLM's scheduler at once, greedily
    assert len(llm.params) == 2
    params = llm.params[-1]
    assert params.temperature == 0.0 and params.logprobs == 0 and params.max_tokens == 12
    assert params.stop == [stop, "\n"] and params.include_stop_str_in_output


def test_vllm_backend_left_truncates_like_the_hugging_face_backend(fake_vllm, tiny_zoo, causal):
    from capvqa.llm.huggingface import HuggingFaceLM

    long_prompt = "Contexts: " + " ".join(f"word{i}" for i in range(40)) + "\nQuestion: what?\nAnswer:"
    backend, _ = make_backend(tiny_zoo, context_length=20)
    limited = HuggingFaceLM(causal.model, causal.tokenizer, kind="causal", context_length=20)
    settings = GenerationSettings(max_new_tokens=5, stop=())
    got = backend.complete([long_prompt, "hello world"], settings)
    assert got[0].prompt_tokens_dropped > 0 and got[1].prompt_tokens_dropped == 0
    assert_same(got, limited.complete([long_prompt, "hello world"], settings))


def test_vllm_backend_sends_segmented_prompts_as_the_hugging_face_backend_does(fake_vllm, tiny_zoo, causal):
    from capvqa.llm.huggingface import HuggingFaceLM

    prompts = [INSTRUCTION + REST, PROMPTS[0]]
    segments = [SEGMENTED, None]
    settings = GenerationSettings(max_new_tokens=6, stop=())
    backend, llm = make_backend(tiny_zoo)
    got = backend.complete(prompts, settings, segments=segments)
    assert_same(got, causal.complete(prompts, settings, segments=segments))
    tokenizer = causal.tokenizer
    two_bos = tokenizer(INSTRUCTION)["input_ids"] + tokenizer(REST)["input_ids"]
    assert llm.sent[-1] == [two_bos, tokenizer(PROMPTS[0])["input_ids"]]  # token-id prompts, BOS twice
    # left-truncated alike: the first BOS kept, the instruction cut first
    backend, llm = make_backend(tiny_zoo, context_length=len(two_bos) - 4)
    limited = HuggingFaceLM(causal.model, causal.tokenizer, kind="causal", context_length=len(two_bos) - 4)
    got = backend.complete(prompts, settings, segments=segments)
    assert got[0].prompt_tokens_dropped > 0
    assert_same(got, limited.complete(prompts, settings, segments=segments))
    assert llm.sent[-1][0] == [two_bos[0], *two_bos[len(two_bos) - (len(two_bos) - 4 - 6) + 1 :]]


def test_answer_stage_builds_vllm_with_its_settings_and_needs_cuda(fake_vllm, tiny_zoo, cpu_runtime):
    from dataclasses import replace

    from capvqa.llm.vllm_backend import VLLMBackend
    from capvqa.models.loading import ModelRef
    from capvqa.stages.llm_answer import LLMAnswerer

    stage = LLMAnswerer(model=str(tiny_zoo["causal_lm"]), backend="vllm", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="CUDA"):
        stage.setup(cpu_runtime)
    gpu_runtime = replace(cpu_runtime, device=torch.device("cuda"), dtype=torch.bfloat16)
    backend = VLLMBackend.load(ModelRef(str(tiny_zoo["causal_lm"])), gpu_runtime, tensor_parallel_size=2,
                               context_length=64)
    assert FakeLLM.instances[-1].kwargs == {"model": str(tiny_zoo["causal_lm"]), "dtype": "bfloat16",
                                            "tensor_parallel_size": 2, "max_model_len": 64}
    assert backend.context_length == 64 and backend.name.startswith("vllm:")


def test_cuda_dtype_reaches_vllm_and_the_cache_key(fake_vllm, tiny_zoo, cpu_runtime):
    from dataclasses import replace

    from capvqa.engine.runner import BoundStage
    from capvqa.stages.llm_answer import LLMAnswerer

    gpu_runtime = replace(cpu_runtime, device=torch.device("cuda"), dtype=torch.bfloat16)
    model = str(tiny_zoo["causal_lm"])
    fp16 = LLMAnswerer(model=model, backend="vllm", cuda_dtype="float16", context_length=64)
    bound = BoundStage.create("llm", fp16, {"prompt": "prompt"}, "bfloat16", device="cuda")
    fp16.setup(gpu_runtime)
    assert FakeLLM.instances[-1].kwargs["dtype"] == "float16"
    run_dtype = LLMAnswerer(model=model, backend="vllm", context_length=64)
    run_bound = BoundStage.create("llm", run_dtype, {"prompt": "prompt"}, "bfloat16", device="cuda")
    run_dtype.setup(gpu_runtime)
    assert FakeLLM.instances[-1].kwargs["dtype"] == "bfloat16"
    assert bound.fingerprint != run_bound.fingerprint


def test_missing_vllm_says_how_to_install(monkeypatch, tiny_zoo, cpu_runtime):
    from capvqa.stages.llm_answer import LLMAnswerer

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    stage = LLMAnswerer(model=str(tiny_zoo["causal_lm"]), backend="vllm")
    with pytest.raises(ConfigError, match=r"capvqa\[vllm\]"):
        stage.setup(cpu_runtime)
