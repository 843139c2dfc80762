"""PICa against the authors' code (microsoft/PICa ``gpt3_api_okvqa.py``): examples, prompts, ensemble answer.

Fixtures (tests/parity/fixtures/pica/, written by tests/parity/reference/generate_pica.py, which drives the
authors' ``PICa_OKVQA`` class on them): ``inputs.json`` is a tiny OK-VQA training pool in the official
file formats (questions, annotations, COCO captions), five val queries with VinVL-style captions and tags,
stand-in CLIP features (one unit vector per distinct question text and per image) and fake completions
with token log-probabilities; ``expected.json`` is what the reference did: the ranked examples of every
query, every prompt it sent (with the request settings) and the answer its ensemble chose.

capvqa's side runs its own stages the way a pipeline does, on the same files:

- ``ExampleSelection`` is built from the shipped pipeline config (``pica-full`` / ``pica``) with the pool
  pointed at an OK-VQA data root and COCO captions file written from the fixture, and set up for real
  (pool reading, first answers, first COCO captions, distinct-text/image embedding, ranking). The seam
  is the CLIP encoder: :class:`FixtureClip` replaces ``ClipEncoder`` in the stage's module and returns
  the fixture's features for each text and image, so both sides rank the identical vectors.
- ``PicaPrompt`` builds the prompts from those records (tags wired as in ``pica-full``).
- ``LLMAnswerer`` from ``pica-api`` builds its real OpenAI-compatible client; only the HTTP post is
  replaced, by a server that answers each prompt with the completion the reference got for it.

Deviations that docs/methods.md#deviations-in-pica documents are bridged where the generator can (their
random COCO caption pick returns the first caption) or asserted as such (empty answers in the ensemble).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference_weights import relative_max_difference

from capvqa.data.images import load_image
from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.config import build_stage_config, load_spec
from capvqa.engine.keys import item_fingerprint
from capvqa.engine.stage import StageInput
from capvqa.stages import example_selection
from capvqa.stages.clip_tags import ImageTags
from capvqa.stages.example_selection import ExampleSelection
from capvqa.stages.image_captioning import ImageCaption
from capvqa.stages.llm_answer import LLMAnswerer
from capvqa.stages.pica_prompt import PicaPrompt

FIXTURES = Path(__file__).parent / "fixtures" / "pica"
INPUTS = json.loads((FIXTURES / "inputs.json").read_text("utf-8"))
EXPECTED = json.loads((FIXTURES / "expected.json").read_text("utf-8"))
RUNS = {run["name"]: run for run in INPUTS["runs"]}
MODES = {"imagequestion": "question+image", "question": "question"}  # the reference's metric -> capvqa's
SCORE_TOLERANCE = 1e-4  # relative max difference, fp32


# ------------------------------------------------------------------------------- images and CLIP


def image_color(image_id: int) -> tuple[int, int, int]:
    """A solid colour per image id: the stand-in CLIP tells images apart by it."""
    return image_id % 256, image_id // 256 % 256, 77


def png_bytes(image_id: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), image_color(image_id)).save(buffer, format="PNG")
    return buffer.getvalue()


class FixtureClip:
    """Stands in for :class:`capvqa.models.clip_encoder.ClipEncoder`: the fixture's unit vectors per
    question text and per image (recognised by its colour), in the encoder's interface."""

    def __init__(self) -> None:
        self.texts = INPUTS["text_features"]
        self.images = {image_color(int(i)): f for i, f in INPUTS["image_features"].items()}

    @classmethod
    def load(cls, ref, runtime) -> FixtureClip:
        return cls()

    def encode_texts(self, texts, batch_size) -> torch.Tensor:
        return torch.tensor([self.texts[text] for text in texts], dtype=torch.float32)

    def encode_images(self, images, batch_size) -> torch.Tensor:
        return torch.tensor([self.images[image.getpixel((0, 0))] for image in images], dtype=torch.float32)

    def encode_image_refs(self, refs, batch_size) -> torch.Tensor:
        return self.encode_images([load_image(ref) for ref in refs], batch_size)


# ------------------------------------------------------------------------------ capvqa's stages


def write_pool(root: Path, captions: dict) -> tuple[Path, Path]:
    """An OK-VQA data root (train2014 questions, annotations, images) and a COCO captions file."""
    okvqa, images = root / "okvqa", root / "coco" / "train2014"
    okvqa.mkdir(parents=True)
    images.mkdir(parents=True)
    (okvqa / "OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(INPUTS["train_questions"]))
    (okvqa / "mscoco_train2014_annotations.json").write_text(json.dumps(INPUTS["train_annotations"]))
    for image_id in {q["image_id"] for q in INPUTS["train_questions"]["questions"]}:
        (images / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(png_bytes(image_id))
    captions_file = root / "captions_train2014.json"
    captions_file.write_text(json.dumps(captions))
    return root, captions_file


def query_inputs(question_ids=None) -> list[StageInput]:
    inputs = []
    for query in INPUTS["queries"]:
        if question_ids is not None and query["question_id"] not in question_ids:
            continue
        data = png_bytes(query["image_id"])
        item = VQAItem(question_id=query["question_id"], image_id=query["image_id"],
                       question=query["question"], image=ImageRef(data=data))
        image_hash = f"fixture-image-{query['image_id']}"
        inputs.append(StageInput(item=item, item_key=item_fingerprint(image_hash, item.question),
                                 image_hash=image_hash))
    return inputs


def pipeline_for(run: dict) -> str:
    """The shipped pipeline a reference run corresponds to: tags in the context is ``pica-full``."""
    return "pica-full" if run["caption_type"] == "vinvl_tag" else "pica"


def select_examples(run, tmp_path, runtime, queries, captions=None):
    """capvqa's ExampleSelection from the shipped config, set up on the fixture pool; its records."""
    root, captions_file = write_pool(tmp_path / "pool", captions or INPUTS["train_captions"])
    clip_dir = tmp_path / "fixture-clip"  # a local model folder: fingerprinted, never loaded
    clip_dir.mkdir()
    (clip_dir / "README").write_text("stand-in CLIP: tests/parity/test_pica_parity.py FixtureClip\n")
    spec = load_spec(pipeline_for(run), [
        f"models.clip={clip_dir}",
        "examples.pool_dataset=okvqa",
        f"examples.pool_data_root={root}",
        f"examples.pool_captions={captions_file}",
        f"examples.mode={MODES[run['similarity_metric']]}",
        f"examples.n_shot={run['n_shot']}",
        f"examples.n_ensemble={run['n_ensemble']}",
    ])
    stage = ExampleSelection(build_stage_config(spec, spec.stage("examples")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(example_selection, "ClipEncoder", FixtureClip)
        stage.setup(replace(runtime, cache_dir=tmp_path / "cache"))
        records = stage.run(queries)
    assert stage.report.captions_generated == 0  # every example caption came from the COCO file
    return spec, records


def build_prompts(spec, queries, records, tags_of=None):
    """capvqa's PicaPrompt on the selection records, with tags wired exactly when the pipeline wires them."""
    wired = "tags" in spec.stage("prompt").inputs
    by_id = {q["question_id"]: q for q in INPUTS["queries"]}
    inputs = []
    for entry, record in zip(queries, records):
        query = by_id[entry.item.question_id]
        upstream = {"caption": ImageCaption(caption=query["caption"]), "examples": record}
        if wired:
            tags = query["tags"] if tags_of is None else tags_of(query)
            upstream["tags"] = ImageTags(tags=list(tags), scores=[0.5] * len(tags))
        inputs.append(replace(entry, upstream=upstream))
    return [out.prompts for out in PicaPrompt().run(inputs)], inputs


class FixtureServer:
    """The completions endpoint: answers each prompt the reference sent with the completion it got."""

    def __init__(self, expected_queries, completions=None) -> None:
        table = {(c["question_id"], c["prompt_index"]): c for c in completions or INPUTS["completions"]}
        self.responses = {}
        for query in expected_queries:
            for index, prompt in enumerate(query["prompts"]):
                completion = table[(query["question_id"], index)]
                self.responses[prompt] = {"choices": [{
                    "text": completion["text"],
                    "logprobs": {"tokens": completion["tokens"], "token_logprobs": completion["token_logprobs"]},
                    "finish_reason": completion["finish_reason"],
                }]}
        self.bodies: list[dict] = []

    def post(self, body: dict) -> dict:
        self.bodies.append(body)
        if body["prompt"] not in self.responses:
            raise AssertionError(f"capvqa sent a prompt the reference never sent: {body['prompt'][-200:]!r}")
        return json.loads(json.dumps(self.responses[body["prompt"]]))


def answer_with_llm(inputs, prompts, expected_queries, runtime, monkeypatch, completions=None):
    """capvqa's LLMAnswerer as ``pica-api`` configures it, its real API client posting to FixtureServer."""
    spec = load_spec("pica-api")
    config = build_stage_config(spec, spec.stage("llm"))
    monkeypatch.setenv(config.api_key_env, "fixture-key")
    stage = LLMAnswerer(config)
    stage.setup(runtime)
    server = FixtureServer(expected_queries, completions)
    monkeypatch.setattr(stage.backend, "_post", server.post)
    prompt_records = [type("Prompts", (), {"prompts": p})() for p in prompts]
    batch = [replace(entry, upstream={"prompt": record}) for entry, record in zip(inputs, prompt_records)]
    return stage.run(batch), server, config


# ------------------------------------------------------------------------------------- the runs


def replay(run: dict, tmp_path: Path, runtime):
    """One reference run replayed through capvqa's selection and prompt stages: (run, the reference's
    queries, selection records, prompts, prompt-stage inputs)."""
    queries = query_inputs()
    spec, records = select_examples(run, tmp_path, runtime, queries)
    prompts, prompt_inputs = build_prompts(spec, queries, records)
    return run, EXPECTED["runs"][run["name"]], records, prompts, prompt_inputs


@pytest.fixture(scope="module", params=sorted(RUNS))
def run_result(request, tmp_path_factory, cpu_runtime):
    return replay(RUNS[request.param], tmp_path_factory.mktemp(f"pica-{request.param}"), cpu_runtime)


@pytest.fixture(scope="module")
def ensemble_result(tmp_path_factory, cpu_runtime):
    """The run with a 3-prompt ensemble (question+image, tags in the context)."""
    return replay(RUNS["imagequestion"], tmp_path_factory.mktemp("pica-ensemble"), cpu_runtime)


def test_examples_are_the_references_in_its_order(run_result):
    """Same examples, same ranks (hence the same split across ensemble prompts), same similarity."""
    run, expected, records, _prompts, _inputs = run_result
    assert [q["question_id"] for q in expected] == [q["question_id"] for q in INPUTS["queries"]]
    for reference, record in zip(expected, records):
        assert (record.n_shot, record.n_ensemble) == (run["n_shot"], run["n_ensemble"])
        got = [example["question_id"] for example in record.examples]
        assert got == reference["example_question_ids"], f"query {reference['question_id']}"
        scores = [example["score"] for example in record.examples]
        assert relative_max_difference(scores, reference["example_scores"]) <= SCORE_TOLERANCE


def test_prompts_are_byte_equal(run_result):
    """Every ensemble prompt is the exact string the reference sent, in the same order."""
    _run, expected, _records, prompts, _inputs = run_result
    for reference, got in zip(expected, prompts):
        assert len(got) == len(reference["prompts"]), f"query {reference['question_id']}"
        for index, (ours, theirs) in enumerate(zip(got, reference["prompts"])):
            assert ours == theirs, f"query {reference['question_id']} prompt {index}"


def test_ensemble_answers_are_the_references(run_result, cpu_runtime, monkeypatch):
    """Same post-processed answer per prompt, same chosen answer, same request settings.

    Excluded: the final choice of queries the fixture marks divergent (``divergent_queries``), which
    :func:`test_empty_answers_lose_the_ensemble_as_documented` checks.
    """
    _run, expected, _records, prompts, inputs = run_result
    answers, server, config = answer_with_llm(inputs, prompts, expected, cpu_runtime, monkeypatch)
    divergent = {int(q) for q in INPUTS["divergent_queries"]}
    for reference, answer in zip(expected, answers):
        qid = reference["question_id"]
        assert [c["answer"] for c in answer.candidates] == reference["candidate_answers"], f"query {qid}"
        if qid not in divergent or len(reference["prompts"]) == 1:
            assert answer.answer == reference["answer"], f"query {qid}"
    assert len(server.bodies) == sum(len(q["prompts"]) for q in expected)
    settings = expected[0]["request_settings"][0]
    for body in server.bodies:
        assert (body["max_tokens"], body["temperature"], body["logprobs"]) == (
            settings["max_tokens"], settings["temperature"], settings["logprobs"])
        # the reference also lists "<|endoftext|>", GPT's end-of-text token, where generation ends anyway
        assert body["stop"] == [s for s in settings["stop"] if s != "<|endoftext|>"]
    assert config.postprocess == "pica"


def test_empty_answers_lose_the_ensemble_as_documented(ensemble_result, cpu_runtime, monkeypatch):
    """docs/methods.md#deviations-in-pica, "Empty answers in the ensemble": the reference scores an
    immediate line break 0 (the best possible) and answers ""; capvqa keeps the best non-empty answer."""
    _run, expected, _records, prompts, inputs = ensemble_result
    answers, _server, _config = answer_with_llm(inputs, prompts, expected, cpu_runtime, monkeypatch)
    for qid in map(int, INPUTS["divergent_queries"]):
        index = [q["question_id"] for q in expected].index(qid)
        reference, answer = expected[index], answers[index]
        assert reference["answer"] == "" and "" in reference["candidate_answers"]
        non_empty = [i for i, c in enumerate(answer.candidates) if c["answer"]]
        best = max(non_empty, key=lambda i: (answer.candidates[i]["logprob"], -i))
        assert answer.prompt_index == best and answer.answer == reference["candidate_answers"][best] != ""


# -------------------------------------------------------------------------- probes of corner cases


def test_coco_caption_whitespace_is_kept_as_the_reference_keeps_it(tmp_path, cpu_runtime):
    """COCO captions with double spaces and a trailing line break reach the prompt as they are in the
    file (capvqa/data/coco_captions.py), as the reference puts them there."""
    probe, reference = INPUTS["probes"]["caption_whitespace"], EXPECTED["probes"]["caption_whitespace"]
    queries = query_inputs({probe["query"]})
    spec, records = select_examples(probe, tmp_path, cpu_runtime, queries, captions=probe["train_captions"])
    assert [e["question_id"] for e in records[0].examples] == reference["example_question_ids"]
    prompts, _inputs = build_prompts(spec, queries, records)
    assert prompts[0] == reference["prompts"]


def test_an_empty_tag_list_gives_the_references_context(tmp_path, cpu_runtime):
    """Tags wired (``pica-full``) but none for the image: the query context is caption + ". ", as the
    reference's caption + '. ' + ', '.join([]) (capvqa/stages/pica_prompt.py query_context)."""
    probe, reference = INPUTS["probes"]["empty_tags"], EXPECTED["probes"]["empty_tags"]
    queries = query_inputs({probe["query"]})
    spec, records = select_examples(probe, tmp_path, cpu_runtime, queries)
    assert [e["question_id"] for e in records[0].examples] == reference["example_question_ids"]
    prompts, _inputs = build_prompts(spec, queries, records, tags_of=lambda query: [])
    assert prompts[0] == reference["prompts"]


def test_a_double_newline_token_counts_as_in_the_reference(tmp_path, cpu_runtime, monkeypatch):
    """The reference sums token log-probabilities up to a token equal to "\\n", so a "\\n\\n" token (GPT's
    tokenizer has one; PICa's examples end in "\\n\\n===") counts: " yes" + "\\n\\n" (-1.25) loses to
    " no" (-0.5), where the tokens that produced the text alone would have chosen " yes" (-0.25).
    capvqa scores PICa's candidates by that rule (capvqa/llm logprob_until_newline)."""
    probe, reference = INPUTS["probes"]["double_newline_token"], EXPECTED["probes"]["double_newline_token"]
    queries = query_inputs({probe["query"]})
    spec, records = select_examples(probe, tmp_path, cpu_runtime, queries)
    prompts, inputs = build_prompts(spec, queries, records)
    assert prompts[0] == reference["prompts"]
    answers, _server, _config = answer_with_llm(
        inputs, prompts, [reference], cpu_runtime, monkeypatch, completions=probe["completions"])
    assert [c["answer"] for c in answers[0].candidates] == reference["candidate_answers"]
    assert answers[0].answer == reference["answer"]
