"""The Img2LLM prompt: exact text of every variant, caption choice, exemplars, segments and context fitting
(the authors' and LAVIS's variants against prompts made by their own code: tests/parity/test_img2llm_prompt_parity.py)."""

import pytest

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.errors import ConfigError
from capvqa.stages.answer_extraction import CandidateAnswers
from capvqa.stages.caption_filter import FilteredCaptions
from capvqa.stages.img2llm_prompt import (
    INSTRUCTION,
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
    options.setdefault("variant", "paper")
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
    text = build_prompt_parts("Is it?", [], ["yes"], {"yes": []}, ["is it real?"], ["yes"], variant="paper").render()
    assert text.endswith("Contexts: \nQuestion: Is it real?\nAnswer: yes\n"
                         "Question: Is this a toilet?\nAnswer: no\nQuestion: is it?\nAnswer:")


def words(segments):
    return sum(len(segment.split()) for segment in segments)


def test_fit_drops_exemplars_last_first_then_captions_and_keeps_the_question():
    p = PromptParts(head="H ", captions=("c1 c1", "c2 c2", "c3 c3"), caption_separator=" ",
                    exemplars=("e1 e1 e1\n", "e2 e2 e2\n", "e3 e3 e3\n"), query="Q q q A")
    full = words([p.render()])
    assert fit_prompt(p, words, full).text == p.render()

    two_exemplars = fit_prompt(p, words, full - 3)
    assert two_exemplars.text == p.render(3, 2)
    assert (two_exemplars.dropped_exemplars, two_exemplars.dropped_captions) == (1, 0)
    assert two_exemplars.num_exemplars == 2 and two_exemplars.num_captions == 3

    one_caption = fit_prompt(p, words, words([p.render(1, 0)]))
    assert one_caption.text == "H c1 c1\nQ q q A"
    assert (one_caption.dropped_exemplars, one_caption.dropped_captions) == (3, 2)
    assert one_caption.num_tokens == words([one_caption.text])

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
    stage = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]), variant="paper")
    stage.setup(cpu_runtime)
    assert stage.max_prompt_tokens == 2048 - 10  # the tiny OPT: 2048 positions, as OPT's
    result = stage.run([entry()])[0]
    assert result.prompts == [PAPER_VQAV2]
    assert (result.num_context_captions, result.num_exemplars) == (2, 5)
    assert (result.dropped_captions, result.dropped_exemplars) == (0, 0)
    assert result.num_tokens == len(stage.tokenizer(PAPER_VQAV2)["input_ids"])

    assert result.segments is None  # tokenised whole
    small = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]), variant="paper", context_length=result.num_tokens + 10 - 1)
    small.setup(cpu_runtime)
    cut = small.run([entry()])[0]
    assert cut.dropped_exemplars >= 1 and cut.dropped_captions == 0
    assert cut.num_tokens <= result.num_tokens - 1
    assert cut.prompts[0].endswith("Question: what is the dog doing?\nAnswer:")
    assert "Question: What is the man riding?\nAnswer: horse\n" in cut.prompts[0]

    tiny = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]), variant="paper", context_length=15, reserve_tokens=10)
    tiny.setup(cpu_runtime)
    squeezed = tiny.run([entry()])[0]
    assert (squeezed.num_context_captions, squeezed.num_exemplars) == (0, 0)
    assert (squeezed.dropped_captions, squeezed.dropped_exemplars) == (2, 5)
    assert squeezed.prompts[0].endswith("Question: what is the dog doing?\nAnswer:")


# --------------------------------------------------------------------------------------------------
# One budget: the prompt stage fits to exactly the room the LLM stage leaves


def long_entry(pairs: int = 60) -> StageInput:
    """An item whose full prompt is far longer than 512 positions (many short exemplars)."""
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
    fitted to the context minus 10 and the LLM then cut 20 more tokens from the left: the instruction first)."""
    from capvqa.engine.config import build_stage_config, load_spec
    from capvqa.stages.llm_answer import LLMAnswerer

    spec = load_spec("img2llm", ["llm.max_new_tokens=30", "llm.context_length=512"], models_preset="tiny")
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
        ids, dropped = llm_stage.backend.encode(prompt.prompts, 30, prompt.segments)[0]
        seen = llm_stage.backend.tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        llm_stage.cleanup()
    assert prompt.dropped_exemplars > 0 and prompt.dropped_captions == 0  # fitted as designed
    assert prompt.num_tokens <= 512 - 30 and len(ids) == prompt.num_tokens  # counted as the LLM encodes it
    assert answer.prompt_tokens_dropped == 0 and dropped == 0
    assert seen == prompt.prompts[0] and seen.startswith(INSTRUCTION)


# --------------------------------------------------------------------------------------------------
# The authors variant (byte for byte against the authors' own code: tests/parity/test_img2llm_prompt_parity.py)


def authors_parts(item, next_item, task="vqav2", **options):
    return build_prompt_parts(item["question"], item["captions"], item["answers"], item["answer_captions"],
                              item["questions"], item["answers"], variant="authors", dataset=task,
                              next_qa_questions=None if next_item is None else next_item["questions"],
                              next_qa_answers=None if next_item is None else next_item["answers"], **options)


def test_authors_prompt_layout():
    item = {"question": " What Is It? ", "captions": ["a Dog", " a cat", "a bird."],
            "answers": ["dog", "cat", "yes"], "answer_captions": {"dog": [0], "cat": [1], "yes": []},
            "questions": ["what is the dog?", "what is the cat?", "is there a dog?"]}
    following = dict(item, questions=["is it red?"])
    lead, rest = authors_parts(item, following, num_exemplar_slots=4).segments()
    assert lead == INSTRUCTION
    assert rest == (
        "Contexts:A dog.a cat.\n"  # visits: yes -> caption 0, cat -> 1, dog -> 0 (taken)
        "Question:Is it red?\nAnswer:no\n"
        "Question:Is there a dog?\nAnswer:yes\n"
        "Question:Is this a toilet?\nAnswer:no\n"
        "Question:What is the dog?\nAnswer:dog\n"
        "Question:What is the cat?\nAnswer:cat\n"
        "Question:Is there a dog?\nAnswer:yes\n"
        "Question:What is the dog?\nAnswer:dog\n"  # slot 3 wraps to pair 0
        "Question:what is it?\nAnswer:"
    )
    # no neighbour given (an input made by hand): the item is its own neighbour
    assert "Question:Is there a dog?\nAnswer:no\n" in authors_parts(item, None).render()
    # OK-VQA: no yes/no block; no slots: none either (the script writes it inside the slot loop)
    assert "Answer:no" not in authors_parts(item, following, "okvqa").render()
    no_slots = authors_parts(item, following, num_exemplar_slots=0)
    assert no_slots.exemplars == () and no_slots.fixed_exemplars == ()


def test_authors_prompt_without_generated_questions_leaves_their_blocks_out():
    """The script would crash (an empty list, indexed or taken modulo); capvqa still writes a prompt."""
    item = {"question": "what?", "captions": ["a dog"], "answers": [], "answer_captions": {}, "questions": []}
    other = dict(item, questions=["is it a dog?"], answers=["yes"], answer_captions={"yes": []})
    alone = authors_parts(item, other)
    assert alone.fixed_exemplars == ("Question:Is it a dog?\nAnswer:no\n", "Question:Is this a toilet?\nAnswer:no\n")
    assert alone.exemplars == () and alone.captions == ()  # no pairs, and no answers: no caption visits
    before_it = authors_parts(other, item)
    assert before_it.fixed_exemplars == ("Question:Is it a dog?\nAnswer:yes\n", "Question:Is this a toilet?\nAnswer:no\n")
    assert before_it.exemplars == ("Question:Is it a dog?\nAnswer:yes\n",) * 30


def test_fitting_an_authors_prompt_drops_pairs_then_captions_then_the_yes_no_block():
    """The yes/no block is written once, outside the pair slots: it goes only after every caption."""
    parts_ = authors_parts(
        {"question": "q?", "captions": ["a dog", "a big dog", "a small dog"], "answers": ["dog", "big", "yes"],
         "answer_captions": {"dog": [0, 1, 2], "big": [1], "yes": []},
         "questions": ["what is it?", "how big is it?", "is it a dog?"]}, None)
    assert (len(parts_.fixed_exemplars), len(parts_.exemplars), len(parts_.captions)) == (3, 30, 3)
    some_pairs = fit_prompt(parts_, words, words(parts_.segments(None, 4)))
    assert (some_pairs.num_exemplars, some_pairs.dropped_exemplars) == (3 + 4, 26)
    assert some_pairs.segments == tuple(parts_.segments(None, 4))
    one_caption = fit_prompt(parts_, words, words(parts_.segments(1, 0)))
    assert one_caption.segments == tuple(parts_.segments(1, 0))
    assert (one_caption.num_captions, one_caption.num_exemplars, one_caption.dropped_captions) == (1, 3, 2)
    assert one_caption.text.count("Answer:no\n") == 2 and "Answer:yes\n" in one_caption.text
    block_left = fit_prompt(parts_, words, words(parts_.segments(0, 0, 2)))
    assert block_left.text == parts_.render(0, 0, 2) and block_left.num_exemplars == 2
    assert "toilet" not in block_left.text and block_left.dropped_exemplars == 31


def test_only_the_authors_vqav2_prompt_reads_the_next_item():
    assert Img2LLMPrompt().NEIGHBOUR_INPUTS == ("qa",)
    assert Img2LLMPrompt(task="okvqa").NEIGHBOUR_INPUTS == ()
    assert Img2LLMPrompt(variant="paper").NEIGHBOUR_INPUTS == ()
    assert Img2LLMPrompt(variant="lavis").NEIGHBOUR_INPUTS == ()
    assert Img2LLMPrompt(num_exemplar_slots=0).NEIGHBOUR_INPUTS == ()
    assert Img2LLMPrompt.NEIGHBOUR_INPUTS == ("qa",)  # the class still declares it


def test_authors_stage_tokenises_the_instruction_apart(tiny_zoo, cpu_runtime):
    """Two segments, their token counts as the LLM backends encode them: OPT's BOS twice."""
    from capvqa.llm import encode_segments
    from capvqa.stages.question_generation import SyntheticQA as QA

    stage = Img2LLMPrompt(llm=str(tiny_zoo["causal_lm"]))
    stage.setup(cpu_runtime)
    following = QA(questions=["is it night?"], answers=["yes"])
    hand_made = entry()
    with_neighbour = StageInput(item=hand_made.item, item_key="k", image_hash="h", upstream=hand_made.upstream,
                                neighbours={"qa": following})
    result = stage.run([with_neighbour])[0]
    (segments,) = result.segments
    assert segments[0] == INSTRUCTION and "".join(segments) == result.prompts[0]
    assert segments[1].startswith("Contexts:A man riding a horse.") and "Question:Is it night?\nAnswer:no\n" in segments[1]
    ids, _, _ = encode_segments(stage.tokenizer, segments)
    bos = stage.tokenizer.bos_token_id
    assert result.num_tokens == len(ids) == len(stage.tokenizer(result.prompts[0])["input_ids"]) + 1
    assert ids.count(bos) == 2 and ids[0] == bos
    own = stage.run([hand_made])[0]  # no neighbour delivered: its own yes-question answers "no"
    assert "Question:Is there a horse?\nAnswer:no\nQuestion:Is there a horse?\nAnswer:yes\n" in own.prompts[0]



def test_the_prompt_must_read_the_answers_its_questions_were_generated_for(tmp_path):
    """The synthetic answers are looked up in the answers' caption map: both must be one stage's answers."""
    import yaml

    from capvqa.engine.config import load_spec

    data = load_spec("img2llm").to_dict()
    stages = data["stages"]
    stages = {**{k: v for k, v in stages.items() if k != "prompt"},
              "other_answers": {**stages["answer_extraction"], "num_answers": 5}, "prompt": stages["prompt"]}
    stages["prompt"]["inputs"]["answers"] = "other_answers"
    data["stages"] = stages
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"stage 'prompt'.*generated for the answers of stage 'answer_extraction'"):
        load_spec(path)


def test_the_yes_pair_is_last_as_lavis_hands_the_pairs_to_the_script():
    """LAVIS appends "yes." after the top answers even when "yes" is among them, so the script's last
    question is the yes-question; capvqa keeps one "yes" and repeats its pair last."""
    from capvqa.stages.img2llm_prompt import lavis_pairs

    assert lavis_pairs(["q sign", "q yes", "q dog"], ["sign", "yes", "dog"]) == (
        ["q sign", "q yes", "q dog", "q yes"], ["sign", "yes", "dog", "yes"])
    assert lavis_pairs(["q dog", "q yes"], ["dog", "yes"]) == (["q dog", "q yes"], ["dog", "yes"])
    assert lavis_pairs([], []) == ([], [])
