"""The Img2LLM prompt: exact text of both variants, caption choice, exemplars and context fitting."""

import pytest

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.errors import ConfigError
from capvqa.stages.answer_extraction import CandidateAnswers
from capvqa.stages.caption_filter import FilteredCaptions
from capvqa.stages.img2llm_prompt import (
    Img2LLMPrompt,
    PromptParts,
    build_prompt_parts,
    context_length_of,
    fit_prompt,
    select_context_captions,
)
from capvqa.stages.question_generation import SyntheticQA

QUESTION = "What is the dog doing?"
CAPTIONS = ["a man riding a horse", "a brown horse on the beach", "a dog"]
ANSWERS = ["horse", "man", "beach", "a man in a red shirt", "yes"]
ANSWER_CAPTIONS = {"horse": [0, 1], "man": [0], "beach": [1], "a man in a red shirt": [0], "yes": []}
QA_QUESTIONS = ["what is the man riding?", "Who is riding the horse?", "where is the horse?",
                "who is there?", "is there a horse?"]
QA_ANSWERS = ANSWERS

PAPER_VQAV2 = (
    "Please reason the answer of the questions according to the given contexts.\n"
    "Contexts: A man riding a horse. A brown horse on the beach.\n"
    "Question: What is the man riding?\nAnswer: horse\n"
    "Question: Who is riding the horse?\nAnswer: man\n"
    "Question: Where is the horse?\nAnswer: beach\n"
    "Question: Is there a horse?\nAnswer: yes\n"
    "Question: Is this a toilet?\nAnswer: no\n"
    "Question: what is the dog doing?\nAnswer:"
)
LAVIS = (
    "Please reason the answer of the questions according to the given contexts.\n"
    "Contexts:a man riding a horsea brown horse on the beach\n"
    "Question:is there a horse?\nAnswer:yes\n"
    "Question:Is this a toilet?\nAnswer:no\n"
    "Question:What is the dog doing?\nAnswer:"
)


def parts(**options):
    return build_prompt_parts(QUESTION, CAPTIONS, ANSWERS, ANSWER_CAPTIONS, QA_QUESTIONS, QA_ANSWERS,
                              **options)


def test_paper_prompt_exact_text():
    assert parts().render() == PAPER_VQAV2


def test_lavis_prompt_exact_text():
    assert parts(variant="lavis").render() == LAVIS
    assert parts(variant="lavis", dataset="okvqa").render() == LAVIS  # LAVIS has no dataset switch


def test_yes_no_exemplars_only_for_vqav2():
    okvqa = parts(dataset="okvqa").render()
    assert "toilet" not in okvqa and "Answer: yes\n" not in okvqa
    assert okvqa == PAPER_VQAV2.replace(
        "Question: Is there a horse?\nAnswer: yes\nQuestion: Is this a toilet?\nAnswer: no\n", "")


def test_long_answers_are_skipped_by_word_count():
    assert "Who is there?" not in parts().render()  # "a man in a red shirt": 6 words
    assert "Question: Who is there?\nAnswer: a man in a red shirt\n" in parts(max_answer_words=7).render()


def test_context_captions_rarest_answer_first_with_reference_fallback_and_wraparound():
    answers = ["dog", "grass", "ball", "yes"]
    where = {"dog": [0, 1, 2], "grass": [1, 3], "ball": [3], "yes": []}
    # visits: yes -> caption 0 (no caption mentions it), ball -> 3, grass -> 1, dog -> 2
    assert select_context_captions(answers, where, num_captions=4, limit=4) == [0, 3, 1, 2]
    assert select_context_captions(answers, where, num_captions=4, limit=2) == [0, 3]
    # fewer answers than visits: the loop wraps and takes each answer's next unused caption
    assert select_context_captions(["dog", "yes"], {"dog": [0, 1, 2], "yes": []}, 3, 30) == [0, 1, 2]
    assert select_context_captions(["yes"], {"yes": []}, 0, 30) == []
    assert select_context_captions(["dog", "yes"], {"dog": [5]}, 2, 30) == [0]  # stale index ignored


def test_no_captions_still_gives_a_prompt():
    text = build_prompt_parts("Is it?", [], ["yes"], {"yes": []}, ["is it real?"], ["yes"]).render()
    assert text.endswith("Contexts: \nQuestion: Is it real?\nAnswer: yes\n"
                         "Question: Is this a toilet?\nAnswer: no\nQuestion: is it?\nAnswer:")


def words(text):
    return len(text.split())


def test_fit_drops_exemplars_last_first_then_captions_and_keeps_the_question():
    p = PromptParts(head="H ", captions=("c1 c1", "c2 c2", "c3 c3"), caption_separator=" ",
                    exemplars=("e1 e1 e1\n", "e2 e2 e2\n", "e3 e3 e3\n"), query="Q q q A")
    full = words(p.render())
    assert fit_prompt(p, words, full).text == p.render()

    two_exemplars = fit_prompt(p, words, full - 3)
    assert two_exemplars.text == p.render(3, 2)
    assert (two_exemplars.dropped_exemplars, two_exemplars.dropped_captions) == (1, 0)
    assert two_exemplars.num_exemplars == 2 and two_exemplars.num_captions == 3

    one_caption = fit_prompt(p, words, words(p.render(1, 0)))
    assert one_caption.text == "H c1 c1\nQ q q A"
    assert (one_caption.dropped_exemplars, one_caption.dropped_captions) == (3, 2)
    assert one_caption.num_tokens == words(one_caption.text)

    hopeless = fit_prompt(p, words, 2)
    assert hopeless.text == "H \nQ q q A" and hopeless.text.endswith(p.query)
    assert (hopeless.num_captions, hopeless.num_exemplars, hopeless.dropped_captions) == (0, 0, 3)
    assert hopeless.num_tokens > 2


def test_context_length_from_config_or_tokenizer():
    class Tok:
        model_max_length = int(1e30)

    class Conf:
        max_position_embeddings = 2048

    assert context_length_of(Tok(), Conf()) == 2048
    Tok.model_max_length = 1024
    assert context_length_of(Tok(), Conf()) == 1024
    assert context_length_of(Tok(), None) == 1024
    Tok.model_max_length = int(1e30)
    assert context_length_of(Tok(), None) is None


def test_prompt_context_length_never_exceeds_what_the_llm_backend_allows():
    """The prompt is fitted to a context the answer stage's backend respects, whatever the LM kind: a
    config that states its positions as ``n_ctx`` or in a text sub-config counts on both sides."""
    from types import SimpleNamespace as Config

    from capvqa.llm.huggingface import default_context_length

    class Multimodal:
        def get_text_config(self):
            return Config(max_position_embeddings=512)

    cases = [(Config(max_position_embeddings=2048), int(1e30)), (Config(n_ctx=256), 1024),
             (Config(n_positions=1024, n_ctx=512), None), (Config(), 1024), (Multimodal(), None),
             (Config(seq_length=4096, max_position_embeddings=8192), 2048)]
    for model_config, tokenizer_max in cases:
        fitted = context_length_of(Config(model_max_length=tokenizer_max), model_config)
        for kind in ("causal", "seq2seq"):
            limit = default_context_length(model_config, tokenizer_max, kind)
            if limit is not None:
                assert fitted is not None and fitted <= limit, (model_config, tokenizer_max, kind)


def test_config_is_checked_early():
    with pytest.raises(ConfigError, match="variant"):
        Img2LLMPrompt(variant="short")
    with pytest.raises(ConfigError, match="task"):
        Img2LLMPrompt(task="coco")
    from capvqa.engine.config import load_spec

    with pytest.raises(ConfigError, match=r"stage 'prompt'.*variant"):  # loading a config checks it
        load_spec("img2llm", ["prompt.variant=short"])


# --------------------------------------------------------------------------------------------------
# The stage, counting with the tiny OPT tokenizer


def entry(question=QUESTION):
    item = VQAItem(question_id=1, image_id=1, question=question, image=ImageRef(data=b"x"))
    return StageInput(item=item, item_key="k", image_hash="h", upstream={
        "captions": FilteredCaptions(captions=CAPTIONS, scores=[], all_scores=[], threshold=0.5),
        "answers": CandidateAnswers(answers=ANSWERS, counts=[3, 2, 1, 1, 0], extractor="rule",
                                    answer_captions=ANSWER_CAPTIONS),
        "qa": SyntheticQA(questions=QA_QUESTIONS, answers=QA_ANSWERS),
    })


def test_stage_fits_the_llm_context(tiny_zoo, cpu_runtime):
    stage = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]))
    stage.setup(cpu_runtime)
    assert stage.max_prompt_tokens == 512 - 10  # the tiny OPT: 512 positions
    result = stage.run([entry()])[0]
    assert result.prompts == [PAPER_VQAV2]
    assert (result.num_context_captions, result.num_exemplars) == (2, 5)
    assert (result.dropped_captions, result.dropped_exemplars) == (0, 0)
    assert result.num_tokens == len(stage.tokenizer(PAPER_VQAV2)["input_ids"])

    small = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]), context_length=result.num_tokens + 10 - 1)
    small.setup(cpu_runtime)
    cut = small.run([entry()])[0]
    assert cut.dropped_exemplars >= 1 and cut.dropped_captions == 0
    assert cut.num_tokens <= result.num_tokens - 1
    assert cut.prompts[0].endswith("Question: what is the dog doing?\nAnswer:")
    assert "Question: What is the man riding?\nAnswer: horse\n" in cut.prompts[0]

    tiny = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]), context_length=15, reserve_tokens=10)
    tiny.setup(cpu_runtime)
    squeezed = tiny.run([entry()])[0]
    assert (squeezed.num_context_captions, squeezed.num_exemplars) == (0, 0)
    assert (squeezed.dropped_captions, squeezed.dropped_exemplars) == (2, 5)
    assert squeezed.prompts[0].endswith("Question: what is the dog doing?\nAnswer:")


# --------------------------------------------------------------------------------------------------
# One budget: the prompt stage fits to exactly the room the LLM stage leaves


def long_entry(pairs: int = 60) -> StageInput:
    """An item whose full prompt is far longer than the tiny OPT's 512 positions (many short exemplars)."""
    answers = [f"a{i}" for i in range(pairs)] + ["yes"]
    item = VQAItem(question_id=7, image_id=7, question=QUESTION, image=ImageRef(data=b"x"))
    return StageInput(item=item, item_key="long", image_hash="h", upstream={
        "captions": FilteredCaptions(captions=CAPTIONS, scores=[], all_scores=[], threshold=0.5),
        "answers": CandidateAnswers(answers=answers, counts=[1] * len(answers), extractor="rule",
                                    answer_captions={answer: [0] for answer in answers}),
        "qa": SyntheticQA(questions=[f"is it {i}?" for i in range(len(answers))], answers=answers),
    })


def test_llm_max_new_tokens_override_fits_the_prompt_instead_of_truncating_it(tiny_zoo, cpu_runtime):
    """--set llm.max_new_tokens=30 reaches the prompt stage: it drops exemplars until the prompt fits the
    room the LLM leaves, so the LLM keeps every token and the instruction is intact (before, the prompt was
    fitted to 512 - 10 and the LLM then cut 20 more tokens from the left: the instruction first)."""
    from capvqa.engine.config import build_stage_config, load_spec
    from capvqa.stages.img2llm_prompt import INSTRUCTION
    from capvqa.stages.llm_answer import LLMAnswerer

    spec = load_spec("img2llm", ["llm.max_new_tokens=30"], models_preset="tiny")
    prompt_stage = Img2LLMPrompt(build_stage_config(spec, spec.stage("prompt")))
    llm_stage = LLMAnswerer(build_stage_config(spec, spec.stage("llm")))
    assert prompt_stage.config.reserve_tokens == 30 and prompt_stage.config.llm == str(tiny_zoo["causal_lm"])
    prompt_stage.setup(cpu_runtime)
    llm_stage.setup(cpu_runtime)
    try:
        entry_ = long_entry()
        prompt = prompt_stage.run([entry_])[0]
        answer = llm_stage.run([StageInput(item=entry_.item, item_key="long", image_hash="h",
                                           upstream={"prompt": prompt})])[0]
        ids, dropped = llm_stage.backend.encode(prompt.prompts, 30)[0]
        seen = llm_stage.backend.tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        llm_stage.cleanup()
    assert prompt.dropped_exemplars > 0 and prompt.dropped_captions == 0  # fitted as designed
    assert prompt.num_tokens <= 512 - 30
    assert answer.prompt_tokens_dropped == 0 and dropped == 0
    assert seen == prompt.prompts[0] and seen.startswith(INSTRUCTION)
