"""Reference fixtures for PICa: the authors' ``gpt3_api_okvqa.py`` (microsoft/PICa) on a tiny fixed pool.

Usage (any Python with numpy; the authors' script needs nothing else once ``openai`` and ``tqdm`` are
stubbed, which this script does)::

    python tests/parity/reference/generate_pica.py /path/to/PICa-checkout

The checkout only needs ``gpt3_api_okvqa.py`` (its data files are Git LFS objects and are not used).
Writes ``tests/parity/fixtures/pica/inputs.json`` (what both sides read: the training pool in the
official OK-VQA/COCO file formats, the queries, the CLIP stand-in features, the fake completions) and
``expected.json`` (what the reference did with them). Deterministic: a rerun writes identical bytes.

How the reference is driven (their file is imported from the checkout, never edited):

- the pool, captions, VinVL-style query captions, tags and similarity features are written to a temporary
  folder in the exact file formats ``PICa_OKVQA.__init__`` reads, and their class is built from them;
- ``openai`` is a stub module whose ``Completion.create`` records every request (the prompt sent and its
  settings) and answers from a fixed table of completions with token log-probabilities;
- ``random.randint`` in their module returns its lower bound. Their code draws a random one of an
  example image's COCO captions (docs/methods.md#deviations-in-pica: capvqa takes the first); with
  the lower bound it takes the first too, which is the documented deviation bridged, not hidden. Their
  other draws (a query's one VinVL caption, redraws of invalid examples) do not occur on this input.
- ``get_context_keys`` is wrapped to record the ranked example keys each query got.

Two runs (question+image similarity with tags and a 3-prompt ensemble; question similarity, one prompt)
cover the main comparison. Three probes record corner cases where capvqa currently differs from the
reference: COCO captions with stray whitespace, an empty tag list, and a completion whose log-probabilities
end in a "\\n\\n" token (see the probe constants below and the xfail tests that read them).

The similarity features are unit vectors from ``reference_weights.parameter_values`` (one per distinct
question text and per image, as capvqa computes CLIP features per distinct text and image); the
reference's per-QA-line feature matrices are these rows expanded, as its preprocessing built them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/parity: reference_weights

from reference_weights import parameter_values  # noqa: E402

REFERENCE_REPO = "microsoft/PICa"
REFERENCE_COMMIT = "61d342c77a05688afefcc9e1b8c29b4497db6a99"
FEATURE_DIM = 16
MIN_SCORE_GAP = 1e-5  # ranks must not hinge on float32 noise (~1e-7 here; capvqa scores in torch, the reference in numpy)

# ------------------------------------------------------------------------------------- fixed inputs
# (image id, [COCO captions in file order])
TRAIN_IMAGES = [
    (9001, ["A man riding a wave on top of a surfboard.", "A surfer in a wetsuit on a large wave."]),
    (9002, ["Two giraffes standing next to a tall tree.", "Giraffes eating leaves in a zoo enclosure."]),
    (9003, ["A red double decker bus driving down a street.", "A bus parked at the curb in London."]),
    (9004, ["A plate of food with broccoli and rice.", "Dinner on a white plate with vegetables."]),
    (9005, ["A cat sleeping on top of a laptop keyboard.", "A kitten curled up on a computer."]),
    (9006, ["A man holding a tennis racquet on a court.", "A tennis player about to serve the ball."]),
    (9007, ["A train traveling down tracks next to a forest.", "A green locomotive pulling cars."]),
    (9008, ["A kitchen with wooden cabinets and a stove.", "An old kitchen with a gas oven."]),
    (9009, ["A group of people flying kites in a park.", "Kites in the sky over a grassy field."]),
    (9010, ["A fire hydrant on the side of a road.", "A yellow hydrant near the sidewalk."]),
]
# (question id, image id, question, first answer, the other nine answers)
TRAIN_QUESTIONS = [
    (90010, 9001, "What sport is this?", "surfing", ["surf", "surfing", "surfboarding"]),
    (90011, 9001, "What is the man wearing to keep warm?", "wetsuit", ["wet suit", "wetsuit"]),
    (90020, 9002, "What do these animals eat?", "leaves", ["leaf", "plants", "leaves"]),
    (90021, 9002, "Which continent are these animals native to?", "africa", ["africa"]),
    (90030, 9003, "In which city is this bus most likely found?", "london", ["london", "england"]),
    (90031, 9003, "What fuel does this vehicle use?", "diesel", ["diesel", "gas", "gasoline"]),
    (90040, 9004, "What vitamin is the green vegetable rich in?", "vitamin c", ["vitamin k", "c"]),
    (90041, 9004, "What country does this grain come from originally?", "china", ["asia", "china"]),
    (90050, 9005, "What is the animal doing?", "sleeping", ["sleep", "napping", "resting"]),
    (90051, 9005, "What brand is the computer?", "apple", ["apple", "dell", "mac"]),
    (90060, 9006, "What sport is being played?", "tennis", ["tennis"]),
    (90061, 9006, "Who is a famous player of this sport?", "roger federer", ["federer", "serena"]),
    (90070, 9007, "What powers this train?", "diesel", ["electricity", "coal", "diesel"]),
    (90071, 9007, "What type of trees are these?", "pine", ["evergreen", "pine", "oak"]),
    (90080, 9008, "What is the oven used for?", "baking", ["bake", "cooking", "baking"]),
    (90081, 9008, "What material are the cabinets made of?", "wood", ["wood", "oak"]),
    (90090, 9009, "What keeps the kites in the air?", "wind", ["wind", "air"]),
    (90091, 9009, "What season is it?", "spring", ["summer", "spring", "fall"]),
    (90100, 9010, "Who uses this object?", "firefighter", ["firemen", "fire fighter"]),
    (90101, 9010, "What color is the hydrant?", "yellow", ["yellow"]),
]
# (question id, image id, question, VinVL caption, tags)
QUERIES = [
    (70010, 7001, "What is the name of this style of bus?", "a red bus on a city street",
     ["bus", "street", "building"]),
    (70020, 7002, "What sport is this?", "a man holding a surfboard on a beach", ["surfboard", "beach", "ocean"]),
    (70030, 7003, "What animal is this and where does it live?", "a giraffe standing in a field",
     ["giraffe", "grass", "tree", "sky"]),
    (70040, 7004, "What is this appliance used for?", "a kitchen with a stove and a sink", ["stove"]),
    (70050, 7005, "What are the people doing?", "people standing in a park with kites", ["kite", "person"]),
]
# Fake completions per (query id, prompt index): (text, tokens, token log-probabilities, finish_reason).
# The text is what an API returns with stop ["\n"] (already cut); tokens may run on past it, as the
# reference expects ("\n" and later tokens must not count). Log-probabilities are dyadic, so sums are
# exact in any order and the tie below is a real tie.
COMPLETIONS = {
    # the first prompt wins only because its "\n" token (-4.0) and what follows do not count
    (70010, 0): (" Double decker.", [" Double", " deck", "er", ".", "\n", "Q"], [-0.125, -0.125, -0.125, -0.125, -4.0, -1.0], "stop"),
    (70010, 1): (" A double-decker", [" A", " double", "-", "deck", "er"], [-0.25, -0.25, -0.125, -0.125, -0.125], "length"),
    (70010, 2): (" the Routemaster", [" the", " Route", "master", "\n"], [-0.5, -1.0, -0.25, -0.5], "stop"),
    # a tie between the first and the last prompt: the first (best-ranked examples) wins
    (70020, 0): (" Surfing", [" Surf", "ing"], [-0.5, -0.25], "stop"),
    (70020, 1): (" surfing", [" surf", "ing", "\n"], [-1.0, -0.25, -0.125], "stop"),
    (70020, 2): (" Surfboarding", [" Surf", "bo", "arding"], [-0.25, -0.25, -0.25], "stop"),
    # commas, articles, "to" and upper case; the last prompt wins
    (70030, 0): (" A giraffe, Africa", [" A", " gir", "affe", ",", " Africa"], [-1.0, -0.5, -0.5, -0.5, -0.5], "length"),
    (70030, 1): (" giraffe to the zoo", [" gir", "affe", " to", " the", " zoo"], [-0.5, -0.5, -0.25, -0.5, -0.5], "length"),
    (70030, 2): (" The Giraffe. Savanna", [" The", " Gir", "affe", ".", " Savanna"], [-0.25, -0.25, -0.125, -0.125, -0.25], "length"),
    (70040, 0): (" Cooking food.", [" Cooking", " food", "."], [-0.75, -0.5, -0.125], "stop"),
    (70040, 1): (" baking", [" baking", "\n"], [-0.5, -0.0625], "stop"),
    (70040, 2): (" to cook", [" to", " cook"], [-0.5, -0.5], "stop"),
    # an empty completion (an immediate line break): the reference scores it 0, the best possible, and
    # answers "" -- the deviation docs/methods.md#deviations-in-pica documents ("Empty answers in the
    # ensemble"); capvqa keeps the best non-empty answer instead. Prompt 0 alone (n_ensemble 1) is "".
    (70050, 0): ("", ["\n"], [-0.25], "stop"),
    (70050, 1): (" flying kites", [" flying", " k", "ites"], [-0.25, -0.125, -0.125], "stop"),
    (70050, 2): (" Kite flying", [" K", "ite", " flying"], [-0.5, -0.5, -0.5], "stop"),
}
DIVERGENT_QUERIES = {70050: "empty-answer-ensemble"}  # which parts differ, and why: see COMPLETIONS

# The reference runs: metric and caption type as its command line names them.
RUNS = [
    {"name": "imagequestion", "similarity_metric": "imagequestion", "caption_type": "vinvl_tag",
     "n_shot": 4, "n_ensemble": 3},
    {"name": "question", "similarity_metric": "question", "caption_type": "vinvl", "n_shot": 4,
     "n_ensemble": 1},
]
# A probe beside the runs: real COCO captions carry stray spaces and line breaks; the reference puts them
# into the prompt as they are. One query; every image's first caption gets such whitespace.
WHITESPACE_PROBE = {"name": "caption-whitespace", "similarity_metric": "imagequestion",
                    "caption_type": "vinvl", "n_shot": 2, "n_ensemble": 1, "query": 70010}
# A probe for an image whose tag list is empty, with tags in the context (caption_type vinvl_tag).
EMPTY_TAGS_PROBE = {"name": "empty-tags", "similarity_metric": "imagequestion", "caption_type": "vinvl_tag",
                    "n_shot": 2, "n_ensemble": 1, "query": 70040}
# A probe for a completion whose logprobs end in a "\n\n" token (GPT's tokenizer has one, and PICa's
# examples end in "\n\n===", so a model often emits it): the reference stops summing only at a token equal
# to "\n", so it counts "\n\n"; here that decides the ensemble.
DOUBLE_NEWLINE_PROBE = {"name": "double-newline-token", "similarity_metric": "imagequestion",
                        "caption_type": "vinvl", "n_shot": 2, "n_ensemble": 2, "query": 70020,
                        "completions": [
                            {"question_id": 70020, "prompt_index": 0, "text": " yes", "tokens": [" yes", "\n\n"],
                             "token_logprobs": [-0.25, -1.0], "finish_reason": "stop"},
                            {"question_id": 70020, "prompt_index": 1, "text": " no", "tokens": [" no", "\n"],
                             "token_logprobs": [-0.5, -0.125], "finish_reason": "stop"},
                        ]}


def unit_feature(name: str) -> list[float]:
    """A unit vector for ``name`` (float32 values, stored as exact decimal floats)."""
    values = parameter_values(f"pica-parity.{name}", (FEATURE_DIM,)).astype(np.float64)
    return [float(v) for v in (values / np.linalg.norm(values)).astype(np.float32)]


def with_stray_whitespace(captions: dict) -> dict:
    """A copy of a COCO captions document whose first caption per image has spaces and a line break
    where real COCO captions sometimes have them (leading, doubled, trailing " \\n")."""
    out = json.loads(json.dumps(captions))
    seen = set()
    for annotation in out["annotations"]:
        if annotation["image_id"] not in seen:
            seen.add(annotation["image_id"])
            annotation["caption"] = " " + annotation["caption"].replace(" ", "  ", 1) + " \n"
    return out


def build_inputs() -> dict:
    """Everything both sides read, JSON-ready."""
    answers = {}
    for qid, _image, _question, first, others in TRAIN_QUESTIONS:
        rest = (others * 9)[:9]  # ten answers per question, as OK-VQA has
        answers[qid] = [first, *rest]
    texts = sorted({q[2] for q in TRAIN_QUESTIONS} | {q[2] for q in QUERIES})
    train_captions = {
        "images": [],
        "annotations": [
            {"image_id": image, "id": 100 * image + i, "caption": caption}
            for image, captions in TRAIN_IMAGES for i, caption in enumerate(captions)
        ],
    }
    images = [image for image, _ in TRAIN_IMAGES] + [q[1] for q in QUERIES]
    return {
        "reference": {"repo": REFERENCE_REPO, "commit": REFERENCE_COMMIT, "file": "gpt3_api_okvqa.py"},
        "feature_dim": FEATURE_DIM,
        "train_questions": {
            "data_subtype": "train2014",
            "questions": [{"image_id": image, "question": question, "question_id": qid}
                          for qid, image, question, _first, _others in TRAIN_QUESTIONS],
        },
        "train_annotations": {
            "annotations": [
                {"image_id": image, "question_id": qid, "question_type": "other", "answer_type": "other",
                 "answers": [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                             for i, a in enumerate(answers[qid])]}
                for qid, image, _question, _first, _others in TRAIN_QUESTIONS
            ]
        },
        "train_captions": train_captions,
        "queries": [{"question_id": qid, "image_id": image, "question": question, "caption": caption,
                     "tags": tags} for qid, image, question, caption, tags in QUERIES],
        "text_features": {text: unit_feature(f"text.{text}") for text in texts},
        "image_features": {str(image): unit_feature(f"image.{image}") for image in images},
        "completions": [
            {"question_id": qid, "prompt_index": index, "text": text, "tokens": tokens,
             "token_logprobs": logprobs, "finish_reason": finish}
            for (qid, index), (text, tokens, logprobs, finish) in sorted(COMPLETIONS.items())
        ],
        "divergent_queries": {str(k): v for k, v in DIVERGENT_QUERIES.items()},
        "runs": RUNS,
        "probes": {
            "caption_whitespace": {**WHITESPACE_PROBE, "train_captions": with_stray_whitespace(train_captions)},
            "empty_tags": EMPTY_TAGS_PROBE,
            "double_newline_token": DOUBLE_NEWLINE_PROBE,
        },
    }


# ------------------------------------------------------------------------ reference-format files


def write_reference_files(root: Path, inputs: dict, *, captions: dict | None = None,
                          tags: dict[int, list[str]] | None = None) -> None:
    """The files ``PICa_OKVQA.__init__`` reads, under ``root`` (their default folder names)."""
    coco, text_dir, sim = root / "coco_annotations", root / "input_text", root / "coco_clip_new"
    for folder in (coco, text_dir / "vinvl_caption", text_dir / "coco_caption_pred_tags", sim):
        folder.mkdir(parents=True, exist_ok=True)
    queries = inputs["queries"]
    (coco / "OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(inputs["train_questions"]))
    (coco / "mscoco_train2014_annotations.json").write_text(json.dumps(inputs["train_annotations"]))
    (coco / "captions_train2014.json").write_text(json.dumps(captions or inputs["train_captions"]))
    (coco / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [
        {"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]} for q in queries]}))
    (coco / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"image_id": q["image_id"], "question_id": q["question_id"], "answers": [{"answer": "x"}] * 10}
        for q in queries]}))
    # VinVL caption rows: image id, then a JSON list whose text PICa cuts between 'caption": "' and '", "conf"'
    (text_dir / "vinvl_caption" / "VinVL_base_val2014.tsv").write_text("".join(
        f"{q['image_id']}\t{json.dumps([{'caption': q['caption'], 'conf': 0.9}])}\n" for q in queries))
    tag_rows = "".join(
        f"{q['image_id']}\t{json.dumps([{'class': t, 'conf': 0.5} for t in (tags or {}).get(q['image_id'], q['tags'])])}\n"
        for q in queries)
    tag_dir = text_dir / "coco_caption_pred_tags"
    (tag_dir / "val.score.json.tsv").write_text(tag_rows)
    (tag_dir / "test.score.json.tsv").write_text("")
    (tag_dir / "train.score.json.tsv").write_text("")
    # similarity: one feature row per QA line, lines numbered in question-file order
    train = inputs["train_questions"]["questions"]
    text_f, image_f = inputs["text_features"], inputs["image_features"]
    (sim / "okvqa_qa_line2sample_idx_train2014.json").write_text(json.dumps(
        {str(i): f"{q['image_id']}<->{q['question_id']}" for i, q in enumerate(train)}))
    (sim / "okvqa_qa_line2sample_idx_val2014.json").write_text(json.dumps(
        {str(i): f"{q['image_id']}<->{q['question_id']}" for i, q in enumerate(queries)}))

    def rows(features, keys):
        return np.asarray([features[k] for k in keys], dtype=np.float32)

    np.save(sim / "coco_clip_vitb16_train2014_okvqa_question.npy", rows(text_f, [q["question"] for q in train]))
    np.save(sim / "coco_clip_vitb16_val2014_okvqa_question.npy", rows(text_f, [q["question"] for q in queries]))
    np.save(sim / "coco_clip_vitb16_train2014_okvqa_convertedidx_image.npy",
            rows(image_f, [str(q["image_id"]) for q in train]))
    np.save(sim / "coco_clip_vitb16_val2014_okvqa_convertedidx_image.npy",
            rows(image_f, [str(q["image_id"]) for q in queries]))


# ---------------------------------------------------------------------------------- the reference


class StubCompletionAPI:
    """``openai.Completion``: records each request, answers from the fixed completions table."""

    def __init__(self, completions: list[dict]) -> None:
        self.table = {(c["question_id"], c["prompt_index"]): c for c in completions}
        self.question_id: int | None = None
        self.requests: list[dict] = []

    def create(self, **kwargs):
        entry = self.table[(self.question_id, len(self.requests))]
        self.requests.append(kwargs)
        logprobs = {"tokens": list(entry["tokens"]), "token_logprobs": list(entry["token_logprobs"])}
        return {"choices": [{"text": entry["text"], "logprobs": logprobs, "finish_reason": entry["finish_reason"]}]}


def load_reference(checkout: Path, api: StubCompletionAPI) -> types.ModuleType:
    """Import their script with stub ``openai``/``tqdm`` modules and a first-caption ``random``."""
    openai = types.ModuleType("openai")
    openai.Completion = api
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda iterable, *args, **kwargs: iterable
    sys.modules["openai"], sys.modules["tqdm"] = openai, tqdm
    spec = importlib.util.spec_from_file_location("pica_gpt3_api_okvqa", checkout / "gpt3_api_okvqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.random = types.SimpleNamespace(randint=lambda low, high: low)  # see the module docstring
    return module


def run_reference(checkout: Path, inputs: dict, run: dict, query_ids: list[int], *,
                  captions: dict | None = None, tags: dict[int, list[str]] | None = None) -> list[dict]:
    """Their ``PICa_OKVQA`` built from reference-format files; per query what it sent and answered.
    A run (probe) with its own ``completions`` answers from those."""
    api = StubCompletionAPI(run.get("completions", inputs["completions"]))
    reference = load_reference(checkout, api)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_reference_files(root, inputs, captions=captions, tags=tags)
        args = types.SimpleNamespace(
            engine="davinci", caption_type=run["caption_type"], n_shot=run["n_shot"],
            n_ensemble=run["n_ensemble"], similarity_metric=run["similarity_metric"],
            valcaption_file=str(root / "input_text/vinvl_caption/VinVL_base_val2014.tsv"),
            tag_path=str(root / "input_text/coco_caption_pred_tags"), coco_path=str(root / "coco_annotations"),
            similarity_path=str(root / "coco_clip_new"), output_path=str(root / "output"))
        pica = reference.PICa_OKVQA(args)
    ranked: list[list[str]] = []
    original = pica.get_context_keys
    pica.get_context_keys = lambda key, metric, n: ranked.append(original(key, metric, n)) or ranked[-1]
    by_id = {q["question_id"]: q for q in inputs["queries"]}
    results = []
    for qid in query_ids:
        key = f"{by_id[qid]['image_id']}<->{qid}"
        api.question_id, api.requests = qid, []
        with contextlib.redirect_stdout(io.StringIO()):
            _key, answer, _last_prompt, _accuracy = pica.sample_inference(key)
        keys = ranked[-1]
        results.append({
            "question_id": qid,
            "example_question_ids": [int(k.split("<->")[1]) for k in keys],
            "example_scores": scores_of(pica, key, keys, run["similarity_metric"]),
            "prompts": [r["prompt"] for r in api.requests],
            "request_settings": [{k: v for k, v in r.items() if k != "prompt"} for r in api.requests],
            "candidate_answers": [reference.process_answer(api.table[(qid, i)]["text"])
                                  for i in range(len(api.requests))],
            "answer": answer,
        })
    return results


def scores_of(pica, key: str, keys: list[str], metric: str) -> list[float]:
    """The similarity of each chosen example, from their loaded feature matrices (float32, as they rank)."""
    line = pica.valkey2idx[key]
    rows = {v: int(k) for k, v in pica.train_idx.items()}
    scores = pica.train_feature @ pica.val_feature[line, :]
    if metric == "imagequestion":
        scores = scores + pica.image_train_feature @ pica.image_val_feature[line, :]
    order = np.sort(scores)[::-1]
    gaps = -np.diff(order[: len(keys) + 1])
    if gaps.size and gaps.min() < MIN_SCORE_GAP:
        raise SystemExit(f"query {key}: scores {gaps.min():.2e} apart (< {MIN_SCORE_GAP}); change the features")
    return [float(scores[rows[k]]) for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a microsoft/PICa checkout (gpt3_api_okvqa.py)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "fixtures" / "pica")
    args = parser.parse_args()
    inputs = build_inputs()
    query_ids = [q["question_id"] for q in inputs["queries"]]
    expected = {"reference": inputs["reference"], "runs": {}, "probes": {}}
    for run in RUNS:
        expected["runs"][run["name"]] = run_reference(args.checkout, inputs, run, query_ids)
    probe = inputs["probes"]["caption_whitespace"]
    expected["probes"]["caption_whitespace"] = run_reference(
        args.checkout, inputs, probe, [probe["query"]], captions=probe["train_captions"])[0]
    probe = EMPTY_TAGS_PROBE
    empty = {q["image_id"]: [] for q in inputs["queries"] if q["question_id"] == probe["query"]}
    expected["probes"]["empty_tags"] = run_reference(args.checkout, inputs, probe, [probe["query"]], tags=empty)[0]
    probe = DOUBLE_NEWLINE_PROBE
    expected["probes"]["double_newline_token"] = run_reference(args.checkout, inputs, probe, [probe["query"]])[0]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, document in (("inputs.json", inputs), ("expected.json", expected)):
        (args.out / name).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}/inputs.json and expected.json")


if __name__ == "__main__":
    main()
