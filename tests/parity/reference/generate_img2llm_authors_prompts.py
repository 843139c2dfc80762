"""Write fixtures/img2llm/authors_prompts.json: Img2LLM prompts made by the authors' own code on fixed inputs.

Usage::

    python tests/parity/reference/generate_img2llm_authors_prompts.py PATH/TO/Img2Prompt [--commit SHA]

PATH is a checkout of https://github.com/CR-Gjx/Img2Prompt (the goldens were made at commit
5b838d1650e30495139325c0bb98294c179ecedc). Nothing of that code is copied here: the script imports
``VL_captioning/Imape2Prompt_evaluation.py`` from the checkout and runs, on the inputs defined below,

- its loaders ``create_cap_dic``, ``create_generated_question_dic`` and ``create_ans_to_cap_dic`` (what
  the script does to the caption, question and answer->caption files it reads),
- the statements of ``evaluation()``'s loop that build the prompt (the question, the next item's id
  with its wrap-around, ``create_context_prompt``, ``create_task_prompt`` and the concatenation),
  taken from the module's source with ``ast`` and executed as they are, up to the first tokenizer call,

with the configuration of the published runs (``--num_caps_per_img 30 --num_question_per_img 30``,
question type ``g_q``, no random questions). The two strings ``evaluation()`` then tokenises apart
(``Prompt``, ``Img2Prompt``) are the golden segments.

The module imports torch, transformers, accelerate, huggingface_hub, spaCy's ``en_core_web_sm``,
ruamel.yaml and the repo's own ``utils`` / ``dataset.utils`` / ``vqaTools`` (which import torch,
tensorboard and pycocotools). The prompt functions use none of them, so they are replaced by empty stub
modules in ``sys.modules`` before the import; nothing heavy is installed or loaded.

Inputs are written in capvqa's form (what its stages produce: captions without the "a picture of"
prompt, answers without LAVIS's trailing period, ``answer_captions`` with an empty list for an answer no
caption mentions) and converted to the files the authors' script reads the way LAVIS writes them:
answers get their ".", "yes." is appended last even when "yes" is already a top answer (LAVIS does; capvqa
keeps one "yes", so its prompt stage repeats that pair last, ``lavis_pairs``), and answers without
captions have no entry in the answer->caption map.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE.parent / "fixtures" / "img2llm" / "authors_prompts.json"
CONFIG = {"num_caps_per_img": 30, "num_question_per_img": 30, "question_type": "g_q", "random_question": False}
DATASETS = {"vqav2": "vqa", "okvqa": "okvqa"}  # capvqa task -> the script's --dataset
# the names evaluation()'s loop assigns before it tokenises; all must be found in its source
PROMPT_STATEMENTS = ("question", "question_id", "question_id_next", "ans_dict_queid", "syn_question_queid",
                     "syn_question_queid_next", "caption", "syn_ans_queid", "Prompt", "Context_Prompt",
                     "Task_Prompt", "Img2Prompt")


# --------------------------------------------------------------------------------------------------
# Fixed inputs (capvqa's form)


def _item(question_id: int, question: str, captions: list[str], answers: list[str],
          answer_captions: dict[str, list[int]], questions: list[str]) -> dict[str, Any]:
    assert len(questions) == len(answers) and set(answer_captions) == set(answers)
    return {"question_id": question_id, "question": question, "captions": captions, "answers": answers,
            "answer_captions": answer_captions, "questions": questions}


def _full_item() -> dict[str, Any]:
    """35 captions, 30 answers + "yes": caption choice over many answers, long answers skipped."""
    nouns = ["dog", "frisbee", "park", "grass", "tree", "man", "woman", "ball", "bench", "sky", "cloud",
             "child", "bicycle", "road", "car", "fence", "lake", "boat", "bird", "hat", "shirt", "kite",
             "table", "chair", "cup"]
    captions = []
    for i in range(35):
        a, b = nouns[i % len(nouns)], nouns[(3 * i + 1) % len(nouns)]
        captions.append(f"a {a} next to a {b} in the afternoon")
    captions[4] = "A Dog catching a Frisbee in NYC"  # capitalize() lower-cases the rest
    captions[7] = " a man throwing a frisbee"  # leading space: capitalize() then strip() leaves it lower case
    captions[9] = "a kite flying over the lake."  # trailing period: the script adds another
    answers = nouns[:22] + ["2", "red", "running", "a man in a red shirt", "a very small brown dog",
                            "two big dogs playing", "flying", "the frisbee", "yes"]
    answer_captions: dict[str, list[int]] = {}
    for answer in answers:
        answer_captions[answer] = [i for i, c in enumerate(captions) if f" {answer} " in f" {c.lower()} "]
    answer_captions["2"] = [12, 3]
    answer_captions["red"] = [30]
    questions = [f"what is the {a} doing?" if i % 3 else f"Where is the {a.upper()}?"
                 for i, a in enumerate(answers)]
    questions[5] = " how many dogs are there?"  # leading space: stays lower case after capitalize().strip()
    questions[-1] = "is there a dog playing with a frisbee?"
    return _item(101, "  What Is The Dog Catching?  ", captions, answers, answer_captions, questions)


def _few_answers_item() -> dict[str, Any]:
    """Fewer answers than slots: pairs and context visits cycle; the "yes" pair shows among the pairs."""
    captions = ["a cat sleeping on a couch", "a black cat on a red couch", "a cat and a remote",
                "Two Cats on a sofa.", "a living room"]
    answers = ["cat", "couch", "black cat", "yes"]
    answer_captions = {"cat": [0, 1, 2, 3], "couch": [0, 1], "black cat": [1], "yes": []}
    questions = ["What animal is on the couch?", "where is the cat sleeping?", "what kind of cat is it?",
                 "is the cat asleep?"]
    return _item(102, "Is the cat asleep?", captions, answers, answer_captions, questions)


def _yes_mentioned_item() -> dict[str, Any]:
    """"yes" mentioned by a caption and among the top answers: LAVIS appends "yes." again at the end, so
    the script's last question is still the yes-question."""
    captions = ["a sign that says yes", "a dog on the grass", "a sign saying yes on a pole"]
    answers = ["sign", "yes", "dog", "grass"]
    answer_captions = {"sign": [0, 2], "yes": [0, 2], "dog": [1], "grass": [1]}
    questions = ["what does the sign say?", "does the sign say yes?", "what animal is there?",
                 "what is the dog on?"]
    return _item(103, "what does the sign say?", captions, answers, answer_captions, questions)


def _only_yes_item() -> dict[str, Any]:
    """One answer ("yes"), mentioned nowhere: every visit points at caption 0."""
    captions = ["a blurry photo", "a dark room"]
    return _item(104, "Is it dark?", captions, ["yes"], {"yes": []}, ["is the room dark?"])


def _long_answers_item() -> dict[str, Any]:
    """Most answers have 5 words or more: few pairs pass the length rule."""
    captions = ["a group of people standing around a large table full of food",
                "people eating dinner at a restaurant"]
    answers = ["a group of people standing", "a large table full of food", "people eating dinner at a",
               "dinner", "food", "a restaurant full of people", "yes"]
    answer_captions = {a: ([0] if i % 2 == 0 else [1]) for i, a in enumerate(answers)}
    answer_captions["yes"] = []
    questions = [f"what is shown in picture {i}?" for i in range(len(answers))]
    return _item(105, "What are the people doing?", captions, answers, answer_captions, questions)


def cases() -> list[dict[str, Any]]:
    vqa_items = [_full_item(), _few_answers_item(), _yes_mentioned_item(), _only_yes_item(), _long_answers_item()]
    okvqa_items = [dict(_few_answers_item(), question_id=201), dict(_full_item(), question_id=202)]
    return [
        {"name": "vqav2", "task": "vqav2", "items": vqa_items},
        {"name": "okvqa", "task": "okvqa", "items": okvqa_items},
        {"name": "vqav2-one-item", "task": "vqav2", "items": [_few_answers_item()]},
    ]


# --------------------------------------------------------------------------------------------------
# Running the authors' code


class _Stub(types.ModuleType):
    """A module whose every attribute is a do-nothing callable (enough for ``from X import name``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _anything


def _anything(*args: Any, **kwargs: Any) -> Any:
    return _anything


def _install_stubs() -> None:
    for name in ("torch", "torch.nn", "torch.nn.functional", "torch.utils", "torch.utils.data", "torch.backends",
                 "torch.backends.cudnn", "torch.distributed", "accelerate", "transformers", "huggingface_hub",
                 "en_core_web_sm", "ruamel", "ruamel.yaml", "utils", "dataset", "dataset.utils", "vqaTools",
                 "vqaTools.vqa"):
        sys.modules[name] = _Stub(name)
    torch = sys.modules["torch"]
    torch.no_grad = lambda: (lambda function: function)  # type: ignore[attr-defined]  # the @torch.no_grad() decorator
    for name in list(sys.modules):
        parent, _, child = name.rpartition(".")
        if parent and isinstance(sys.modules.get(parent), _Stub) and isinstance(sys.modules[name], _Stub):
            setattr(sys.modules[parent], child, sys.modules[name])


def load_authors_module(checkout: Path) -> types.ModuleType:
    path = checkout / "VL_captioning" / "Imape2Prompt_evaluation.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: give the root of a CR-Gjx/Img2Prompt checkout")
    _install_stubs()
    spec = importlib.util.spec_from_file_location("Imape2Prompt_evaluation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__source_path__ = path  # type: ignore[attr-defined]
    return module


def prompt_statements(module: types.ModuleType) -> types.CodeType:
    """The assignments of ``evaluation()``'s loop body that build the prompt, compiled from its source."""
    tree = ast.parse(Path(module.__source_path__).read_text())  # type: ignore[attr-defined]
    evaluation = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "evaluation")
    loop = next(n for n in ast.walk(evaluation) if isinstance(n, ast.For)  # the loop over the test items
                and any(isinstance(t, ast.Name) and t.id == "per_test_data" for t in ast.walk(n.target)))
    chosen = [s for s in loop.body if isinstance(s, ast.Assign) and len(s.targets) == 1
              and isinstance(s.targets[0], ast.Name) and s.targets[0].id in PROMPT_STATEMENTS]
    names = [s.targets[0].id for s in chosen]  # type: ignore[attr-defined]
    if names != list(PROMPT_STATEMENTS):
        raise SystemExit(f"evaluation()'s loop changed: expected assignments {PROMPT_STATEMENTS}, found {names}")
    return compile(ast.Module(body=chosen, type_ignores=[]), module.__source_path__, "exec")  # type: ignore[attr-defined]


def _lavis_qa(questions: list[str], answers: list[str]) -> dict[str, list[str]]:
    """The QG file as LAVIS writes it: answers with their ".", and "yes." appended after the top answers
    even when "yes" is already among them (its question is then the same question generated again)."""
    questions, answers = list(questions), list(answers)
    if answers and answers[-1] != "yes" and "yes" in answers:
        questions.append(questions[answers.index("yes")])
        answers.append("yes")
    return {"question": questions, "answer": [a + "." for a in answers]}


def authors_segments(module: types.ModuleType, code: types.CodeType, case: dict[str, Any]) -> dict[str, list[str]]:
    items = case["items"]
    caption_dict = module.create_cap_dic([{"question_id": i["question_id"], "caption": i["captions"]} for i in items])
    syn_question_dict, syn_answer_dict = module.create_generated_question_dic([
        {"question_id": i["question_id"], **_lavis_qa(i["questions"], i["answers"])} for i in items])
    ans_to_cap_dicts = module.create_ans_to_cap_dic([
        {"question_id": i["question_id"], "ans_to_cap_dict": {a: c for a, c in i["answer_captions"].items() if c}}
        for i in items])
    test_data = [{"question_id": i["question_id"], "question": i["question"]} for i in items]
    config = {**CONFIG, "dataset": DATASETS[case["task"]]}
    segments = {}
    for n, per_test_data in enumerate(test_data):
        scope = {**vars(module), "n": n, "per_test_data": per_test_data, "test_data": test_data,
                 "caption_dict": caption_dict, "syn_question_dict": syn_question_dict,
                 "syn_answer_dict": syn_answer_dict, "ans_to_cap_dicts": ans_to_cap_dicts, "config": config,
                 "resume": False}
        exec(code, scope)  # noqa: S102 - the authors' own statements, on the inputs above
        segments[str(per_test_data["question_id"])] = [scope["Prompt"], scope["Img2Prompt"]]
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="root of a CR-Gjx/Img2Prompt checkout")
    parser.add_argument("--commit", help="the checkout's commit (default: git rev-parse HEAD there)")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or None
    module = load_authors_module(args.checkout)
    code = prompt_statements(module)
    out_cases = []
    for case in cases():
        out_cases.append({**case, "segments": authors_segments(module, code, case)})
    golden = {
        "source": {"repository": "https://github.com/CR-Gjx/Img2Prompt", "commit": commit,
                   "file": "VL_captioning/Imape2Prompt_evaluation.py"},
        "config": CONFIG,
        "cases": out_cases,
    }
    OUTPUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUTPUT} ({sum(len(c['segments']) for c in out_cases)} prompts)")


if __name__ == "__main__":
    main()
