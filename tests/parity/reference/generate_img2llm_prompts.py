"""Write fixtures/img2llm/lavis_prompts.json: Img2LLM prompts made by LAVIS 1.0.2's own code on fixed inputs.

Usage (the reference venv, see make_reference_venv.sh; nothing is downloaded, no model is built)::

    .reference-venv/bin/python tests/parity/reference/generate_img2llm_prompts.py [--output PATH]

capvqa's ``variant: lavis`` of the Img2LLM prompt stage exists to equal LAVIS's
``Img2PromptVQA.prompts_construction`` (lavis/models/img2prompt_models/img2prompt_vqa.py, with the
``create_context_prompt`` / ``create_task_prompt`` it calls). That method reads no weights, only the
``samples`` dict, so it is called on an ``Img2PromptVQA`` made with ``object.__new__`` (no model is
loaded) with the inputs below, as LAVIS's demo calls it (``question_type`` "neural", the default).

Inputs are written in capvqa's form -- what its answer-extraction and question-generation stages hand
the prompt stage: answers lower case without LAVIS's trailing period, "yes" once (appended last unless a
caption already made it a top answer), one synthetic question per answer, ``answer_captions`` with an
empty list for an answer no caption mentions -- and converted to the ``samples`` LAVIS's own
``answer_extraction`` / ``forward_qa_generation`` would have produced from the same captions
(:func:`lavis_samples`). The fixture keeps both the capvqa-form inputs and the LAVIS samples, so a
reader sees exactly what each side was given.

``num_caps_per_img`` / ``num_question_per_img`` are capvqa's ``num_context_captions`` /
``num_exemplar_slots`` (the stage config's names for the same knobs).

The output is deterministic (no randomness: ``question_type`` "rule", the only random branch, is
unreachable -- LAVIS compares the string literal ``"question_type" == "rule"``); a rerun rewrites the
file byte for byte.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE.parent / "fixtures" / "img2llm" / "lavis_prompts.json"
SOURCE = "lavis/models/img2prompt_models/img2prompt_vqa.py"


# --------------------------------------------------------------------------------------------------
# Fixed inputs (capvqa's form)


def _case(name: str, question: str, captions: list[str], answers: list[str],
          answer_captions: dict[str, list[int]], questions: list[str], *, task: str = "vqav2",
          num_context_captions: int = 30, num_exemplar_slots: int = 30, why: str) -> dict[str, Any]:
    assert len(questions) == len(answers) and set(answer_captions) == set(answers), name
    assert all(0 <= i < len(captions) for c in answer_captions.values() for i in c), name
    assert captions, "LAVIS indexes caption 0 for an answer no caption mentions: it needs one"
    return {"name": name, "why": why, "task": task,
            "config": {"num_context_captions": num_context_captions, "num_exemplar_slots": num_exemplar_slots},
            "question": question, "captions": captions, "answers": answers,
            "answer_captions": answer_captions, "questions": questions}


def _mentions(captions: list[str], answers: list[str]) -> dict[str, list[int]]:
    """Which captions mention each answer (word match), "yes" none."""
    return {a: [i for i, c in enumerate(captions) if f" {a} " in f" {c.lower().strip(' .')} "] for a in answers}


def _full() -> dict[str, Any]:
    nouns = ["dog", "frisbee", "park", "grass", "tree", "man", "woman", "ball", "bench", "sky", "cloud",
             "child", "bicycle", "road", "car", "fence", "lake", "boat", "bird", "hat", "shirt", "kite",
             "table", "chair", "cup"]
    captions = [f"a {nouns[i % 25]} next to a {nouns[(3 * i + 1) % 25]} in the afternoon" for i in range(35)]
    captions[4] = "A Dog catching a Frisbee in NYC"
    captions[7] = " a man throwing a frisbee"
    captions[9] = "a kite flying over the lake."
    answers = nouns[:22] + ["2", "red", "running", "a man in a red shirt", "a very small brown dog",
                            "two big dogs playing", "flying", "the frisbee", "yes"]
    answer_captions = _mentions(captions, answers)
    answer_captions["2"] = [12, 3]
    answer_captions["red"] = [30]
    questions = [f"what is the {a} doing?" if i % 3 else f"Where is the {a.upper()}?" for i, a in enumerate(answers)]
    questions[-1] = "is there a dog playing with a frisbee?"
    return _case("full", "  What Is The Dog Catching?  ", captions, answers, answer_captions, questions,
                 why="35 captions, 30 answers + yes: 30 context visits over 31 answers, raw captions glued "
                     "(capitals, a leading space, a trailing period kept), question with spaces and capitals")


def _few_answers() -> dict[str, Any]:
    captions = ["a cat sleeping on a couch", "a black cat on a red couch", "a cat and a remote",
                "Two Cats on a sofa.", "a living room"]
    answers = ["cat", "couch", "black cat", "yes"]
    return _case("few-answers", "Is the cat asleep?", captions, answers,
                 {"cat": [0, 1, 2, 3], "couch": [0, 1], "black cat": [1], "yes": []},
                 ["What animal is on the couch?", "where is the cat sleeping?", "what kind of cat is it?",
                  "is the cat asleep?"],
                 why="fewer answers than visits: the loop wraps and takes each answer's next unused caption")


def _yes_mentioned() -> dict[str, Any]:
    captions = ["a sign that says yes", "a dog on the grass", "a sign saying yes on a pole", "a grassy field"]
    answers = ["sign", "yes", "dog", "grass"]
    return _case("yes-among-top-answers", "what does the sign say?", captions, answers,
                 {"sign": [0, 2], "yes": [0, 2], "dog": [1], "grass": [1, 3]},
                 ["what does the sign say?", "does the sign say yes?", "what animal is there?",
                  "what is the dog on?"],
                 why='"yes" mentioned by captions and among the top answers: LAVIS appends "yes." again, '
                     "so its last visit (the first) is that yes and its last question the yes-question")


def _only_yes() -> dict[str, Any]:
    return _case("only-yes", "Is it dark", ["a blurry photo", "a dark room"], ["yes"], {"yes": []},
                 ["is the room dark?"], why="one answer, mentioned nowhere: every visit points at caption 0; "
                                            "question without '?'")


def _duplicate_questions() -> dict[str, Any]:
    captions = ["a red bus on a street", "a bus parked at a stop", "a street with cars", "people waiting"]
    answers = ["bus", "street", "red", "people", "yes"]
    questions = ["what is on the street?", "what is on the street?", "what color is the bus?",
                 "what color is the bus?", "what is on the street?"]
    return _case("duplicate-questions", "what color is the bus", captions, answers,
                 {"bus": [0, 1], "street": [0, 2], "red": [0], "people": [3], "yes": []}, questions,
                 why="the question generator wrote the same question for several answers (the yes one too); "
                     "question without '?'")


def _few_visits() -> dict[str, Any]:
    captions = ["a plate of food", "a fork next to a plate", "a glass of water", "food on a table",
                "a wooden table"]
    answers = ["plate", "food", "table", "fork", "glass", "yes"]
    return _case("three-captions", "What is on the plate?", captions, answers,
                 {"plate": [0, 1], "food": [0, 3], "table": [3, 4], "fork": [1], "glass": [2], "yes": []},
                 ["what is on the table?", "what is on the plate?", "where is the food?", "what is next to the plate?",
                  "what is the water in?", "is there food?"],
                 num_context_captions=3, num_exemplar_slots=5,
                 why="num_caps_per_img 3: three visits (yes, glass, fork), fewer captions than exist")


def _no_slots() -> dict[str, Any]:
    case = _few_visits()
    return dict(case, name="no-question-slots", config={"num_context_captions": 30, "num_exemplar_slots": 0},
                why="num_question_per_img 0: LAVIS writes no yes/no exemplar at all")


def _okvqa() -> dict[str, Any]:
    return dict(_few_answers(), name="okvqa", task="okvqa", question="What breed is this cat?",
                why="OK-VQA: LAVIS has no dataset switch, the yes/no exemplars stay")


def _unicode() -> dict[str, Any]:
    captions = ["a café in Paris — at night", "tables outside a café", "a waiter carrying plates"]
    answers = ["café", "tables", "waiter", "night", "yes"]
    return _case("unicode", "Wo ist das Café?\n", captions, answers,
                 {"café": [0, 1], "tables": [1], "waiter": [2], "night": [0], "yes": []},
                 ["where is the café?", "what is outside?", "who is carrying plates?", "when was it taken?",
                  "is it a café?"],
                 why="non-ASCII captions and question, a question ending in a line break, kept as given")


def cases() -> list[dict[str, Any]]:
    return [_full(), _few_answers(), _yes_mentioned(), _only_yes(), _duplicate_questions(), _few_visits(),
            _no_slots(), _okvqa(), _unicode()]


# --------------------------------------------------------------------------------------------------
# Running LAVIS's code


def lavis_samples(case: dict[str, Any]) -> dict[str, Any]:
    """The ``samples`` LAVIS's answer extraction and question generation produce for these inputs.

    Its answers carry a "." and end with "yes.", appended even when "yes" is already a top answer (its
    question is then the same QG input generated again: the same question); capvqa appends "yes" only when
    it is not among the top answers, so a "yes" that is not last was a top answer. Its answer -> captions
    map has keys lower case and no entry for an answer no caption mentions."""
    questions, answers = list(case["questions"]), list(case["answers"])
    if answers and answers[-1] != "yes" and "yes" in answers:
        questions.append(questions[answers.index("yes")])
        answers.append("yes")
    return {
        "text_input": [case["question"]],
        "captions": [list(case["captions"])],
        "answers": [answer + "." for answer in answers],
        "questions": questions,
        "ans_to_cap_dict": {a.lower(): list(c) for a, c in case["answer_captions"].items() if c},
    }


def lavis_prompt(samples: dict[str, Any], config: dict[str, int]) -> str:
    from lavis.models.img2prompt_models.img2prompt_vqa import Img2PromptVQA

    model = object.__new__(Img2PromptVQA)  # prompts_construction reads no attribute: no weights, no spaCy
    return Img2PromptVQA.prompts_construction(model, dict(samples),
                                              num_caps_per_img=config["num_context_captions"],
                                              num_question_per_img=config["num_exemplar_slots"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    out = []
    for case in cases():
        samples = lavis_samples(case)
        out.append({**case, "lavis_samples": samples, "prompt": lavis_prompt(samples, case["config"])})
    fixture = {
        "source": {"package": "salesforce-lavis", "version": metadata.version("salesforce-lavis"), "file": SOURCE,
                   "function": "Img2PromptVQA.prompts_construction", "question_type": "neural"},
        "config_names": {"num_context_captions": "num_caps_per_img", "num_exemplar_slots": "num_question_per_img"},
        "cases": out,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output} ({len(out)} prompts)")


if __name__ == "__main__":
    main()
