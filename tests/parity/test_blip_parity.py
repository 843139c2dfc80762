"""BLIP stages against LAVIS 1.0.2 on identical weights and inputs (docs/methods.md#matching-gradcam,
#question-guided-captioning, #captions-and-the-itm-filter).

The fixtures (tests/parity/fixtures/blip/) come from tests/parity/reference/generate_blip.py, which ran
LAVIS's ``PNPVQA.forward_itm``, ``PNPVQA.forward_cap`` and ``BlipITM.itm_rank`` (Img2Prompt's in-loop
caption filter) on small BLIP models whose every parameter is ``parameter_values(name, shape)`` under
LAVIS's name. Here the same state dicts are rebuilt from the fixture manifests, saved as original
``.pth`` checkpoints and handed to capvqa's stages through their ``checkpoint:`` setting -- so the
original-BLIP converter, image preprocessing, question cleaning, tokenisation with ``[ENC]``, GradCAM,
patch gathering, the decoder and the ITM filter are all compared with the reference, from raw image files
and raw question strings. Real values must agree to a relative max difference of 1e-4 (fp32, CPU),
token ids and strings exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_weights import parameter_values, relative_max_difference

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.models.blip_captioner import PatchDecoding, SampledDecoding

FIXTURES = Path(__file__).parent / "fixtures" / "blip"
TOLERANCE = 1e-4
BASE_TEXT_HEADS = 4  # as the hub configs get it wrong (transformers#22625); the converter must set 12


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((FIXTURES / "blip_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "blip_reference.npz") as data:
        return {name: data[name] for name in data.files}


def original_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    """The reference model's ``state_dict()`` rebuilt from its manifest: every parameter from
    ``parameter_values``, tied entries sharing their source tensor (as ``torch.save`` of the model keeps
    them), ``position_ids`` buffers as ``arange``."""
    state = {name: torch.from_numpy(parameter_values(name, shape)) for name, shape in manifest["parameters"]}
    for alias, source in manifest["aliases"].items():
        state[alias] = state[source]
    for name, shape in manifest["arange_buffers"].items():
        state[name] = torch.arange(shape[-1]).expand(shape).clone()
    return state


def blip_tokenizer(reference: dict):
    """The fixture's WordPiece vocabulary plus ``[DEC]`` (bos) and ``[ENC]``, as LAVIS's ``init_tokenizer``."""
    from transformers import BertTokenizer

    tokens = (FIXTURES / reference["tokenizer"]["vocab_file"]).read_text(encoding="utf-8").splitlines()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def base_model_folder(folder: Path, reference: dict, vision_depth: int) -> Path:
    """What a user passes as ``model:`` beside ``checkpoint:``: a BLIP config of the checkpoint's size --
    with the hub's wrong text head count and ViT LayerNorm epsilon, which the converter must correct --
    and a BLIP processor (the hub's image settings: 384 bicubic, CLIP mean/std) with the vocabulary."""
    from transformers import BlipConfig, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    sizes, ids = reference["sizes"], reference["tokenizer"]
    tokenizer = blip_tokenizer(reference)
    assert len(tokenizer) == ids["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [ids["dec"], ids["enc"]]
    text_config = {
        "vocab_size": ids["vocab_size"], "hidden_size": sizes["text_hidden"],
        "encoder_hidden_size": sizes["vision_width"], "intermediate_size": sizes["text_intermediate"],
        "num_hidden_layers": sizes["text_layers"], "num_attention_heads": BASE_TEXT_HEADS,
        "max_position_embeddings": sizes["max_position_embeddings"], "projection_dim": sizes["embed_dim"],
        "bos_token_id": ids["dec"], "sep_token_id": ids["sep"], "eos_token_id": ids["sep"],
        "pad_token_id": ids["pad"],
    }
    vision_config = {
        "hidden_size": sizes["vision_width"], "intermediate_size": 4 * sizes["vision_width"],
        "num_hidden_layers": vision_depth, "num_attention_heads": sizes["vision_heads"],
        "image_size": sizes["image_size"], "patch_size": sizes["patch_size"], "layer_norm_eps": 1e-5,
        "projection_dim": sizes["embed_dim"],
    }
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=sizes["embed_dim"],
                        image_text_hidden_size=sizes["embed_dim"])
    image_processor = BlipImageProcessorPil(size={"height": sizes["image_size"], "width": sizes["image_size"]})
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, reference) -> dict[str, Path]:
    """{itm, captioner}: base folder; {itm_pth, captioner_pth}: the reference state dicts as .pth files."""
    root = tmp_path_factory.mktemp("blip-parity")
    sizes = reference["sizes"]
    paths = {
        "itm": base_model_folder(root / "itm-base", reference, sizes["itm_vision_depth"]),
        "captioner": base_model_folder(root / "captioner-base", reference, sizes["captioner_vision_depth"]),
    }
    for kind in ("itm", "captioner"):
        paths[f"{kind}_pth"] = root / f"lavis_{kind}.pth"
        torch.save({"model": original_state_dict(reference["manifests"][kind])}, paths[f"{kind}_pth"])
    return paths


def stage_inputs(reference: dict, pair_indices: list[int]) -> list[StageInput]:
    pairs, images = reference["matching"]["pairs"], reference["images"]
    return [
        StageInput(
            item=VQAItem(question_id=i, image_id=pairs[i]["image"], question=pairs[i]["question"],
                         image=ImageRef(path=FIXTURES / "images" / images[pairs[i]["image"]])),
            item_key=f"pair{i}", image_hash=images[pairs[i]["image"]],
        )
        for i in pair_indices
    ]


# --------------------------------------------------------------------------------------------------
# 1. GradCAM matching (PNPVQA.forward_itm, block 7)


@pytest.fixture(scope="module")
def matcher(models, cpu_runtime):
    from capvqa.stages.gradcam_matching import GradCamMatching

    stage = GradCamMatching(model=str(models["itm"]), checkpoint=str(models["itm_pth"]))
    stage.setup(cpu_runtime)
    return stage


@pytest.fixture(scope="module")
def matched(matcher, reference):
    return matcher.run(stage_inputs(reference, list(range(len(reference["matching"]["pairs"])))))


def test_fixture_covers_a_question_over_the_itm_token_limit(reference):
    matching = reference["matching"]
    limit = matching["max_text_tokens"]
    assert any(pair["untruncated_tokens"] > limit for pair in matching["pairs"])
    assert any(pair["untruncated_tokens"] < limit for pair in matching["pairs"])
    assert max(sum(mask) for mask in matching["attention_mask"]) == limit


def test_converter_fixes_heads_and_layer_norm_eps(matcher, reference):
    config = matcher._model.config
    assert config.text_config.num_attention_heads == reference["sizes"]["text_heads"] != BASE_TEXT_HEADS
    assert config.vision_config.layer_norm_eps == 1e-6


def test_preprocessed_pixels_match_blip_image_eval(matcher, reference, arrays):
    from capvqa.data.images import load_image

    images = [load_image(ImageRef(path=FIXTURES / "images" / name)) for name in reference["images"]]
    pixels = matcher.processor.image_processor(images=images, return_tensors="pt")["pixel_values"].numpy()
    assert relative_max_difference(pixels[:, :, ::16, ::16], arrays["pixel_samples"]) <= TOLERANCE


def test_itm_text_ids_match_lavis(matcher, matched, reference):
    """Question cleaning, '?' stripping, WordPiece, truncation to 35 and [ENC] at position 0."""
    matching = reference["matching"]
    input_ids, mask = matcher.itm.text_inputs([out.matching_text for out in matched], matching["max_text_tokens"])
    assert input_ids.tolist() == matching["input_ids"]
    assert mask.tolist() == matching["attention_mask"]


def test_gradcam_relevance_matches_lavis(matched, arrays):
    relevance = np.stack([out.relevance for out in matched])
    assert relevance.shape == arrays["gradcams"].shape == (len(matched), 24 * 24)
    assert all(out.grid == [24, 24] for out in matched)
    for row, (actual, expected) in enumerate(zip(relevance, arrays["gradcams"])):
        assert relative_max_difference(actual, expected) <= TOLERANCE, f"pair {row}"


def test_itm_match_logit_matches_lavis(matched, reference):
    logits = np.array([out.match_logit for out in matched])
    assert relative_max_difference(logits, np.array(reference["matching"]["match_logits"])) <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# 2. Patch captioning (PNPVQA.forward_cap, BlipCaption, prompt "a picture of ")


def decode_reference_rows(captioner, reference: dict, rows: list[dict]) -> PatchDecoding:
    """capvqa's captioner on the reference's patch draws: its own images, ViT and patch gather; its
    sampled captions are not compared (capvqa samples from its own seeded streams)."""
    from capvqa.data.images import load_image

    pairs, images = reference["matching"]["pairs"], reference["images"]
    embeds = captioner.encode_images([load_image(ImageRef(path=FIXTURES / "images" / name)) for name in images])
    settings = reference["captioning"]["settings"]
    decoding = SampledDecoding(top_k=settings["top_k"], top_p=float(settings["top_p"]),
                               repetition_penalty=settings["repetition_penalty"],
                               min_length=settings["cap_min_length"], max_length=settings["cap_max_length"])
    return captioner.sample_from_patches(
        embeds, [pairs[row["pair"]]["image"] for row in rows],
        [np.asarray(row["patches"], dtype=np.int64) for row in rows], list(range(len(rows))), decoding,
    )


@pytest.fixture(scope="module")
def captioning(models, cpu_runtime, reference):
    from capvqa.stages.patch_captioning import PatchCaptioning

    cap = reference["captioning"]
    stage = PatchCaptioning(model=str(models["captioner"]), checkpoint=str(models["captioner_pth"]),
                            prompt=cap["prompt"], num_patches=cap["settings"]["num_patches"])
    stage.setup(cpu_runtime)
    captioner = stage._captioner
    return captioner, decode_reference_rows(captioner, reference, cap["rows"])


def test_prompt_ids_match_lavis(captioning, reference):
    captioner, _ = captioning
    cap = reference["captioning"]
    assert captioner.prompt_ids == cap["prompt_ids"]
    assert all(ids[: len(cap["prompt_ids"])] == cap["prompt_ids"] for ids in cap["output_ids"])


def test_sampled_patch_embeddings_match_lavis(captioning, arrays):
    _, decoded = captioning
    assert decoded.memory_mask.all()
    assert relative_max_difference(decoded.memory.numpy(), arrays["caption_memory"]) <= TOLERANCE


def test_teacher_forced_decoder_logits_match_lavis(captioning, reference, arrays):
    captioner, decoded = captioning
    ids = torch.tensor(reference["captioning"]["output_ids"])
    with torch.inference_mode():
        logits = captioner.model.text_decoder(
            input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=decoded.memory,
            encoder_attention_mask=decoded.memory_mask,
        ).logits
    assert logits.shape == arrays["caption_logits"].shape
    for row, (actual, expected) in enumerate(zip(logits.numpy(), arrays["caption_logits"])):
        assert relative_max_difference(actual, expected) <= TOLERANCE, f"row {row}"


def test_decoded_captions_match_lavis(captioning, reference):
    """LAVIS strips the prompt by ``output[len(prompt):]``; rows ended by [SEP] and padding included."""
    captioner, _ = captioning
    filt = reference["filter"]
    assert captioner.texts(torch.tensor(filt["output_ids"])) == filt["captions"]
    kept = [caption for item in reference["captioning"]["forward_cap_captions"] for caption in item]
    assert kept == filt["captions"][: len(kept)]


# --------------------------------------------------------------------------------------------------
# 3. Img2LLM's in-loop ITM caption filter (BlipITM.itm_rank as Img2Prompt's forward_cap calls it)


@pytest.fixture(scope="module")
def filtering(models, cpu_runtime, reference):
    from capvqa.stages.filtered_patch_captioning import FilteredPatchCaptioning

    stage = FilteredPatchCaptioning(
        model=str(models["captioner"]), checkpoint=str(models["captioner_pth"]), itm_model=str(models["itm"]),
        itm_checkpoint=str(models["itm_pth"]), prompt=reference["captioning"]["prompt"],
    )
    stage.setup(cpu_runtime)
    return stage


def test_in_loop_filter_probabilities_match_lavis(filtering, reference):
    filt = reference["filter"]
    rows = [reference["captioning"]["rows"][r] for r in filt["rows"]]
    decoded = decode_reference_rows(filtering._captioner, reference, rows)
    output_ids = torch.tensor(filt["output_ids"])
    assert (output_ids == reference["tokenizer"]["pad"]).any(), "the fixture must cover padded rows"
    chunk = PatchDecoding(texts=filt["captions"], output_ids=output_ids, memory=decoded.memory,
                          memory_mask=decoded.memory_mask)
    probabilities = np.array(filtering.match_probabilities(chunk))
    assert relative_max_difference(probabilities, np.array(filt["probabilities"])) <= TOLERANCE
