"""The LLM answer stage and its local Hugging Face backend, on the tiny OPT and tiny T5."""

from dataclasses import dataclass

import pytest
import torch

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.codec import decode_record, encode_record
from capvqa.engine.stage import StageInput, semantic_config
from capvqa.errors import ConfigError
from capvqa.llm import Completion, GenerationSettings, covering_prefix_length, cut_at_stop
from capvqa.stages.llm_answer import LLMAnswer, LLMAnswerConfig, LLMAnswerer, choose_candidate
from capvqa.text.answer_postprocess import img2llm_answer

PROMPTS = [
    "Question: what is it?\nAnswer:",
    "1 2 3 4 5 6",
    "Please reason the answer.\nContexts: A man.\nQuestion: who?\nAnswer:",
    "a",
    "the cat sat on the mat. The dog",
    "hello world",
]


@dataclass(frozen=True)
class Prompt:
    """Stands in for the prompt stages' record: only ``prompts`` is read."""

    prompts: list[str]


def entry(prompts: list[str], qid: int = 1) -> StageInput:
    item = VQAItem(question_id=qid, image_id=1, question="what?", image=ImageRef(data=b"x"))
    return StageInput(
        item=item, item_key=f"k{qid}", image_hash="h", upstream={"prompt": Prompt(list(prompts))}
    )


@pytest.fixture(scope="module")
def causal(tiny_zoo, cpu_runtime):
    from capvqa.llm.huggingface import HuggingFaceLM
    from capvqa.models.loading import ModelRef

    return HuggingFaceLM.load(ModelRef(str(tiny_zoo["causal_lm"])), cpu_runtime, prompts_per_generate=4)


@pytest.fixture(scope="module")
def seq2seq(tiny_zoo, cpu_runtime):
    from capvqa.llm.huggingface import HuggingFaceLM
    from capvqa.models.loading import ModelRef

    return HuggingFaceLM.load(ModelRef(str(tiny_zoo["reader"])), cpu_runtime)


def causal_logprob(lm, prompt_ids: list[int], completion: list[int]) -> float:
    """Sum of log-softmax at the completion tokens in one forward pass over prompt + completion."""
    ids = torch.tensor([prompt_ids + completion])
    with torch.inference_mode():
        logits = lm.model(input_ids=ids).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[len(prompt_ids) - 1 + t, token]) for t, token in enumerate(completion))


def seq2seq_logprob(lm, prompt: str, completion: list[int]) -> float:
    encoded = lm.tokenizer([prompt], return_tensors="pt")
    start = lm.model.config.decoder_start_token_id
    decoder = torch.tensor([[start] + completion[:-1]]) if completion else torch.tensor([[start]])
    with torch.inference_mode():
        logits = lm.model(**encoded, decoder_input_ids=decoder).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[t, token]) for t, token in enumerate(completion))


def find_stop(lm, settings: GenerationSettings) -> tuple[int, str, int]:
    """A (prompt index, stop string, tokens before it) such that the tiny model emits the stop mid-answer.

    The tiny model's weights are random but fixed, so this is deterministic; it picks the first generated
    token that adds new, clean text after at least one token.
    """
    for i, completion in enumerate(lm.complete(PROMPTS, settings)):
        tokens = list(completion.token_ids)
        for k in range(1, len(tokens)):
            before = lm.tokenizer.decode(tokens[:k], skip_special_tokens=True)
            after = lm.tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
            piece = after[len(before) :]
            if after.startswith(before) and piece.strip() and "\ufffd" not in piece and piece not in before:
                return i, piece, k
    pytest.fail("the tiny model never emits a usable stop string")


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def test_cut_at_stop_uses_the_earliest_occurrence():
    assert cut_at_stop("a.b\nc", ("\n", ".")) == ("a", True)
    assert cut_at_stop("abc", ("\n",)) == ("abc", False)
    assert cut_at_stop("\nabc", ("\n",)) == ("", True)


def test_covering_prefix_counts_the_tokens_that_produced_the_text():
    prefixes = [" a", " a dog", " a dog.", " a dog.\n"]
    assert covering_prefix_length(prefixes, " a dog") == 2
    assert covering_prefix_length([" a", " a dog.", " a dog.\n"], " a dog") == 2  # straddling token counts
    assert covering_prefix_length(prefixes, "") == 0
    assert covering_prefix_length(["\ufffd", "é"], "é") == 2  # completed byte-level character


def test_left_truncate_keeps_special_prefix_and_suffix():
    from capvqa.llm.huggingface import left_truncate

    assert left_truncate([2, 10, 11, 12, 13], [10, 11, 12, 13], 3) == ([2, 12, 13], 2)
    assert left_truncate([10, 11, 12, 1], [10, 11, 12], 3) == ([11, 12, 1], 1)
    assert left_truncate([2, 10, 11], [10, 11], 5) == ([2, 10, 11], 0)
    with pytest.raises(ConfigError):
        left_truncate([2, 10, 11, 1], [10, 11], 2)


def test_default_context_length():
    from types import SimpleNamespace

    from capvqa.llm.huggingface import default_context_length

    assert default_context_length(SimpleNamespace(max_position_embeddings=2048), int(1e30), "causal") == 2048
    assert default_context_length(SimpleNamespace(), 1024, "causal") == 1024
    assert default_context_length(SimpleNamespace(), int(1e30), "causal") is None
    assert default_context_length(SimpleNamespace(n_positions=512), 512, "seq2seq") == 512


# ---------------------------------------------------------------------------------------------------
# Causal LM


def test_causal_batch_equals_one_by_one(causal):
    settings = GenerationSettings(max_new_tokens=8, stop=())
    together = causal.complete(PROMPTS, settings)
    alone = [causal.complete([p], settings)[0] for p in PROMPTS]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.logprob for c in together] == pytest.approx([c.logprob for c in alone], abs=1e-4)


def test_causal_max_new_tokens_and_logprob_recomputation(causal):
    settings = GenerationSettings(max_new_tokens=6, stop=())
    completions = causal.complete(PROMPTS, settings)
    assert all(c.num_tokens <= 6 for c in completions)
    assert any(c.num_tokens == 6 for c in completions)
    for prompt, completion in zip(PROMPTS, completions):
        prompt_ids = causal.tokenizer(prompt)["input_ids"]
        assert completion.logprob == pytest.approx(
            causal_logprob(causal, prompt_ids, list(completion.token_ids)), abs=1e-4
        )
        assert completion.text == causal.tokenizer.decode(
            list(completion.token_ids), skip_special_tokens=True
        )


def test_causal_stop_string_cuts_text_tokens_and_logprob(causal):
    long = GenerationSettings(max_new_tokens=12, stop=())
    index, stop, before = find_stop(causal, long)
    unstopped = causal.complete([PROMPTS[index]], long)[0]
    stopped_settings = GenerationSettings(max_new_tokens=12, stop=(stop,))
    together = causal.complete(PROMPTS, stopped_settings)
    stopped = together[index]
    assert stop not in stopped.text
    assert stopped.token_ids == unstopped.token_ids[:before]
    assert stopped.text == causal.tokenizer.decode(
        list(unstopped.token_ids[:before]), skip_special_tokens=True
    )
    prompt_ids = causal.tokenizer(PROMPTS[index])["input_ids"]
    assert stopped.logprob == pytest.approx(
        causal_logprob(causal, prompt_ids, list(stopped.token_ids)), abs=1e-4
    )
    # rows that stop early and rows that run to max_new_tokens share a batch without changing each other
    alone = [causal.complete([p], stopped_settings)[0] for p in PROMPTS]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.logprob for c in together] == pytest.approx([c.logprob for c in alone], abs=1e-4)


def test_causal_stop_ends_generation_early(causal, monkeypatch):
    long = GenerationSettings(max_new_tokens=12, stop=())
    index, stop, before = find_stop(causal, long)
    steps = []
    original = causal.model.generate

    def counting_generate(*args, **kwargs):
        out = original(*args, **kwargs)
        steps.append(len(out.logits))
        return out

    monkeypatch.setattr(causal.model, "generate", counting_generate)
    causal.complete([PROMPTS[index]], GenerationSettings(max_new_tokens=12, stop=(stop,)))
    assert steps == [before + 1]  # the token that completed the stop string is the last one generated


def test_context_length_left_truncates_and_records(tiny_zoo, cpu_runtime, causal):
    from capvqa.llm.huggingface import HuggingFaceLM

    long_prompt = "Contexts: " + " ".join(f"word{i}" for i in range(40)) + "\nQuestion: what?\nAnswer:"
    full_ids = causal.tokenizer(long_prompt)["input_ids"]
    limited = HuggingFaceLM(causal.model, causal.tokenizer, kind="causal", context_length=20)
    ids, dropped = limited.encode([long_prompt], max_new_tokens=5)[0]
    assert len(ids) == 15 and dropped == len(full_ids) - 15
    assert ids[0] == full_ids[0] == causal.tokenizer.bos_token_id and ids[1:] == full_ids[-14:]

    stage = LLMAnswerer(model=str(tiny_zoo["causal_lm"]), max_new_tokens=5, llm=limited)
    stage.setup(cpu_runtime)
    out = stage.run([entry([long_prompt]), entry(["short"], qid=2)])
    assert (
        out[0].prompt_tokens_dropped == dropped and out[0].candidates[0]["prompt_tokens_dropped"] == dropped
    )
    assert out[1].prompt_tokens_dropped == 0
    # the truncated prompt is what the model saw: same as completing the truncated ids directly
    direct = limited._generate([ids], GenerationSettings(max_new_tokens=5, stop=("\n", ".")))[0]
    assert out[0].raw == direct[2] and out[0].logprob == pytest.approx(direct[1], abs=1e-4)


def test_stage_end_to_end_on_tiny_opt(tiny_zoo, cpu_runtime, causal):
    stage = LLMAnswerer(model=str(tiny_zoo["causal_lm"]), batch_size=4)
    stage.setup(cpu_runtime)  # loads through the normal path
    try:
        entries = [entry([p], qid=i) for i, p in enumerate(PROMPTS)]
        out = stage.run(entries)
    finally:
        stage.cleanup()
    direct = causal.complete(PROMPTS, GenerationSettings(max_new_tokens=10, stop=("\n", ".")))
    for record, completion in zip(out, direct):
        assert isinstance(record, LLMAnswer)
        assert record.raw == completion.text and record.answer == img2llm_answer(completion.text)
        assert record.logprob == pytest.approx(completion.logprob, abs=1e-4)
        assert record.prompt_index == 0 and len(record.candidates) == 1
        assert record.postprocess == "img2llm"
        assert decode_record(LLMAnswer, *encode_record(record)) == record


# ---------------------------------------------------------------------------------------------------
# Seq2seq LM


def test_auto_backend_picks_seq2seq_for_t5(seq2seq):
    assert seq2seq.kind == "seq2seq"


def test_seq2seq_batch_equals_one_by_one_and_logprob(seq2seq):
    prompts = ["question: what is it? context: a dog.", "hello there", "what color is the cat on the mat?"]
    settings = GenerationSettings(max_new_tokens=5, stop=())
    together = seq2seq.complete(prompts, settings)
    alone = [seq2seq.complete([p], settings)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.logprob for c in together] == pytest.approx([c.logprob for c in alone], abs=1e-4)
    assert any(c.text for c in together)
    for prompt, completion in zip(prompts, together):
        assert completion.num_tokens <= 5
        assert completion.logprob == pytest.approx(
            seq2seq_logprob(seq2seq, prompt, list(completion.token_ids)), abs=1e-4
        )


def test_seq2seq_stop_string(seq2seq):
    prompt = "question: what is it? context: a dog."
    full = seq2seq.complete([prompt], GenerationSettings(max_new_tokens=6, stop=()))[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = seq2seq.complete([prompt], GenerationSettings(max_new_tokens=6, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.logprob == pytest.approx(seq2seq_logprob(seq2seq, prompt, list(cut.token_ids)), abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# Ensemble, post-processing, config


class FakeBackend:
    """Completions by prompt text: a deterministic stand-in for the ensemble logic."""

    name = "fake"

    def __init__(self, table: dict[str, tuple[str, float | None]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def complete(self, prompts, settings):
        self.calls.append(list(prompts))
        return [Completion(text=self.table[p][0], logprob=self.table[p][1], num_tokens=1) for p in prompts]

    def close(self) -> None:
        pass


def test_ensemble_keeps_highest_logprob_and_skips_empty_answers(cpu_runtime):
    backend = FakeBackend(
        {
            "p0": (" The dog", -2.5),
            "p1": (" a cat", -0.7),
            "p2": ("", 0.0),  # an immediate stop: empty answer with the highest possible sum
            "p3": (" Horse.", -1.0),
            "q0": (" Red", -3.0),
            "r0": ("", 0.0),
            "r1": ("", -1.0),
        }
    )
    stage = LLMAnswerer(model="fake/model", postprocess="pica", stop=["\n"], llm=backend)
    stage.setup(cpu_runtime)
    out = stage.run([entry(["p0", "p1", "p2", "p3"], 1), entry(["q0"], 2), entry(["r0", "r1"], 3)])
    assert backend.calls == [["p0", "p1", "p2", "p3", "q0", "r0", "r1"]]  # one call for the whole batch
    assert (out[0].answer, out[0].raw, out[0].logprob, out[0].prompt_index) == ("cat", " a cat", -0.7, 1)
    assert [c["answer"] for c in out[0].candidates] == ["dog", "cat", "", "horse"]
    assert [c["logprob"] for c in out[0].candidates] == [-2.5, -0.7, 0.0, -1.0]
    assert (out[1].answer, out[1].prompt_index) == ("red", 0)
    assert (out[2].answer, out[2].prompt_index) == ("", 0)  # all empty: the best of them
    assert out[0].postprocess == "pica"


def test_choose_candidate_ties_and_missing_logprobs():
    same = [{"answer": "a", "logprob": -1.0}, {"answer": "b", "logprob": -1.0}]
    assert choose_candidate(same) == 0
    assert choose_candidate([{"answer": "a", "logprob": None}]) == 0
    with pytest.raises(ConfigError, match="log-probabilities"):
        choose_candidate([{"answer": "a", "logprob": None}, {"answer": "b", "logprob": -1.0}])


def test_okvqa_postprocess_records_the_lemmatizer(cpu_runtime):
    from capvqa.eval.lemmatize import lemmatizer_name, make_lemmatizer

    backend = FakeBackend({"p": (" They are running dogs", -1.0)})
    stage = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="rule", llm=backend)
    stage.setup(cpu_runtime)
    out = stage.run([entry(["p"])])[0]
    assert out.answer == "run dog" and out.raw == " They are running dogs"
    assert out.postprocess == "img2llm+okvqa(lemmatizer=rule)"
    auto = LLMAnswerer(model="fake/model", task="okvqa", llm=backend)
    auto.setup(cpu_runtime)
    assert auto.run([entry(["p"])])[0].postprocess == (
        f"img2llm+okvqa(lemmatizer={lemmatizer_name(make_lemmatizer('auto'))})"
    )


def test_config_validation_and_cache_key_fields():
    config = LLMAnswerConfig(stop=["\n"])
    assert config.stop == ("\n",)
    semantic = semantic_config(config)
    for field in (
        "batch_size",
        "concurrency",
        "max_retries",
        "timeout_s",
        "api_key_env",
        "device_map",
        "prompts_per_generate",
        "retry_backoff_s",
        "trust_remote_code",
        "tensor_parallel_size",
        "gpu_memory_utilization",
    ):
        assert field not in semantic
    for field in ("model", "max_new_tokens", "stop", "postprocess", "task", "context_length", "base_url"):
        assert field in semantic
    with pytest.raises(ConfigError, match="backend"):
        LLMAnswerConfig(backend="tgi")
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        LLMAnswerConfig(backend="vllm", tensor_parallel_size=0)
    assert not LLMAnswerConfig(postprocess="pica", task="okvqa").okvqa  # OK-VQA rules are Img2LLM's
    assert LLMAnswerConfig(postprocess="img2llm", task="okvqa").okvqa
    with pytest.raises(ConfigError, match="task"):
        LLMAnswerConfig(task="gqa")
    with pytest.raises(ConfigError, match="stop"):
        LLMAnswerConfig(stop=["\n", ""])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        LLMAnswerConfig(max_new_tokens=0)


def test_model_fingerprint_accepts_an_api_model_name():
    from capvqa.engine.runner import BoundStage

    config = LLMAnswerConfig(
        model="gpt-3.5-turbo-instruct", backend="openai", base_url="http://127.0.0.1:1/v1"
    )
    stage = LLMAnswerer(config)
    bound = BoundStage.create("answer", stage, {"prompt": "prompt"})
    assert len(bound.fingerprint) == 64
