"""The tiny zoo builds offline, deterministically, and every role loads back through from_pretrained."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
    AutoTokenizer,
    BlipForImageTextRetrieval,
    BlipProcessor,
    CLIPModel,
    GPT2Tokenizer,
    T5Tokenizer,
)

from capvqa.errors import ModelLoadError
from capvqa.synthetic import offline_tokenizers, tiny_zoo
from capvqa.synthetic.tiny_zoo import ROLES, build_tiny_zoo, ensure_tiny_zoo, tiny_zoo_manifest

PASSAGE = "what color is the cat? \\n a picture of a black cat on a bed."  # literal backslash-n


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    started = time.perf_counter()
    paths = build_tiny_zoo(tmp_path_factory.mktemp("zoo") / "tiny-zoo")
    assert time.perf_counter() - started < 20.0
    return paths


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)).convert("L"),  # grey, small
    ]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------------------------
# Layout and determinism


def test_layout_and_manifest(zoo):
    root = zoo["itm"].parent
    assert set(zoo) == set(ROLES)
    manifest = json.loads((root / tiny_zoo.MANIFEST_NAME).read_text())
    assert manifest == json.loads(json.dumps(tiny_zoo_manifest()))
    assert manifest["zoo_version"] == tiny_zoo.ZOO_VERSION
    for role, folder in zoo.items():
        assert folder == root / role
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, role
    assert "processor_config.json" in {p.name for p in zoo["itm"].iterdir()}
    assert "processor_config.json" in {p.name for p in zoo["clip"].iterdir()}
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 9_000_000


def test_build_is_deterministic(zoo, tmp_path):
    again = build_tiny_zoo(tmp_path / "again")
    first, second = _digest(zoo["itm"].parent), _digest(again["itm"].parent)
    assert first == second  # every file, weights and tokenizers included, is byte-identical


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_zoo(tmp_path / "z")
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------
# BLIP: ITM and captioner


def test_blip_tokenizer_layout(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["itm"])
    n = len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [n - 2, n - 1]
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == n - 2
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    vocab_lines = (zoo["itm"] / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab_lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab_lines) == n - 2
    text = "what is the color of the dog? is it one, two or three?"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert (
        tokenizer.decode(ids, skip_special_tokens=True)
        == "what is the color of the dog? is it one, two or three?"
    )
    # [ENC] is one token and survives a round trip, as PNP-VQA writes it in place of [CLS].
    enc_ids = tokenizer("[ENC] a dog").input_ids
    assert enc_ids[1] == n - 1


def test_itm_forward(zoo, images):
    processor = AutoProcessor.from_pretrained(zoo["itm"])
    assert isinstance(processor, BlipProcessor)
    assert type(processor.image_processor).__name__ in {"BlipImageProcessor", "BlipImageProcessorPil"}
    assert BlipProcessor.from_pretrained(zoo["itm"]).image_processor.size == {"height": 64, "width": 64}
    model = BlipForImageTextRetrieval.from_pretrained(zoo["itm"])
    text_config = model.config.text_config
    tokenizer = processor.tokenizer
    assert text_config.vocab_size == len(tokenizer)
    assert text_config.bos_token_id == tokenizer.bos_token_id
    assert (
        text_config.sep_token_id == tokenizer.sep_token_id
        and text_config.pad_token_id == tokenizer.pad_token_id
    )
    assert text_config.num_hidden_layers == 12 and text_config.num_attention_heads == 4
    assert model.text_encoder.encoder.layer[7].crossattention is not None  # GradCAM's default block

    inputs = processor(images=images, text=["a cat on a bed", "what color is the dog"], padding=True,
                       return_tensors="pt")  # fmt: skip
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    inputs["input_ids"][:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        itm = model(**inputs, use_itm_head=True).itm_score
        sim = model(**inputs, use_itm_head=False).itm_score
    assert itm.shape == (2, 2) and torch.isfinite(itm).all()
    assert sim.shape == (2, 2)
    vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert vision.shape == (2, 1 + 16, 32)  # CLS + 4x4 patches


def test_captioner_generate(zoo, images):
    processor = AutoProcessor.from_pretrained(zoo["captioner"])
    model = AutoModelForImageTextToText.from_pretrained(zoo["captioner"])
    assert type(model).__name__ == "BlipForConditionalGeneration"
    inputs = processor(images=images, text=["a picture of "] * 2, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, top_k=50, top_p=1.0, min_length=10, max_length=20)
    assert out.shape[0] == 2 and 10 <= out.shape[1] <= 20
    dec_id = processor.tokenizer.bos_token_id
    assert out[:, 0].tolist() == [dec_id, dec_id]
    captions = processor.batch_decode(out, skip_special_tokens=True)
    assert all(caption.startswith("a picture of") for caption in captions)


# ---------------------------------------------------------------------------------------------------
# T5 reader and question generator


@pytest.mark.parametrize("role", ["reader", "qg"])
def test_t5_generate(zoo, role):
    tokenizer = AutoTokenizer.from_pretrained(zoo[role])
    model = AutoModelForSeq2SeqLM.from_pretrained(zoo[role])
    assert isinstance(tokenizer, T5Tokenizer)
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id == 0
    assert model.config.eos_token_id == tokenizer.eos_token_id == 1
    assert model.config.feed_forward_proj == ("gated-gelu" if role == "qg" else "relu")
    texts = [PASSAGE, "answer: cat  context: A black cat on a bed."]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, num_beams=3 if role == "qg" else 1, max_new_tokens=8, min_length=0)
    assert out.shape[0] == 2 and out.shape[1] <= 9
    assert all(isinstance(s, str) for s in tokenizer.batch_decode(out, skip_special_tokens=True))


def test_t5_tokenizer_round_trip(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["reader"])
    assert len(tokenizer) == tiny_zoo.T5_SP_VOCAB + tiny_zoo.T5_EXTRA_IDS
    ids = tokenizer(PASSAGE).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert "\\" in tokenizer.convert_ids_to_tokens(ids)  # the backslash of UnifiedQA's "\n" is a real piece
    assert tokenizer.decode(ids, skip_special_tokens=True) == PASSAGE
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1


# ---------------------------------------------------------------------------------------------------
# OPT


def test_opt_left_padded_generate(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["causal_lm"])
    model = AutoModelForCausalLM.from_pretrained(zoo["causal_lm"])
    assert isinstance(tokenizer, GPT2Tokenizer) and tokenizer.padding_side == "left"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>", "<pad>")
    config = model.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )  # fmt: skip
    assert config.vocab_size >= len(tokenizer) and config.max_position_embeddings == 2048
    prompts = ["Question: what is it?\nAnswer:", "Context: a dog on a bed.\n===\nQ: what animal is this?\nA:"]
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.pad_token_id and inputs["attention_mask"][0, 0] == 0
    assert inputs["input_ids"][1, 0] == tokenizer.bos_token_id  # OPT prepends </s>
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        logits = model(**inputs).logits
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 5
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert logits.shape == (2, prompt_len, config.vocab_size)


def test_opt_tokenizer_stop_tokens_and_round_trip(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["causal_lm"])
    for stop in ("\n", "."):
        assert len(tokenizer(stop, add_special_tokens=False).input_ids) == 1
    text = "Please answer the question.\n===\nQ: How many dogs?\nA: 2 dogs, {odd} chars ~ é"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless


# ---------------------------------------------------------------------------------------------------
# CLIP


def test_clip_features(zoo, images):
    processor = AutoProcessor.from_pretrained(zoo["clip"])
    model = AutoModel.from_pretrained(zoo["clip"])
    assert isinstance(model, CLIPModel)
    tokenizer = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.model_max_length == 77
    text = processor(text=["what is the cat doing?", "a dog"], padding=True, return_tensors="pt")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    with torch.no_grad():
        # transformers v5: get_*_features return a ModelOutput; the projected features are pooler_output.
        text_features = model.get_text_features(**text).pooler_output
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
    assert text_features.shape == (2, 16) and image_features.shape == (2, 16)
    long = processor(text=["cat " * 200], truncation=True, return_tensors="pt")
    assert long["input_ids"].shape[1] == 77


# ---------------------------------------------------------------------------------------------------
# End-to-end vision-language models


@pytest.mark.parametrize(("role", "model_name", "processor_name"), [
    ("blip2", "Blip2ForConditionalGeneration", "Blip2Processor"),
    ("blip2_opt", "Blip2ForConditionalGeneration", "Blip2Processor"),
    ("instructblip", "InstructBlipForConditionalGeneration", "InstructBlipProcessor"),
    ("llava", "LlavaForConditionalGeneration", "LlavaProcessor"),
])
def test_vision_language_models_generate(zoo, images, role, model_name, processor_name):
    processor = AutoProcessor.from_pretrained(zoo[role])
    model = AutoModelForImageTextToText.from_pretrained(zoo[role])
    assert type(model).__name__ == model_name and type(processor).__name__ == processor_name
    image_token = model.config.image_token_index if hasattr(model.config, "image_token_index") else None
    assert image_token == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.get_text_config().vocab_size > image_token
    text = ["Question: what is it? Short answer:"] * 2
    if role == "llava":
        text = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}],
            add_generation_prompt=True, tokenize=False)] * 2
        assert text[0] == "USER: <image>\nwhat is it? ASSISTANT:"
    inputs = processor(images=[image.convert("RGB") for image in images], text=text, padding=True,
                       return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[0] == 2


def test_idefics3_reads_several_images_per_prompt_without_torchvision(zoo, images):
    processor = AutoProcessor.from_pretrained(zoo["idefics"])
    model = AutoModelForImageTextToText.from_pretrained(zoo["idefics"])
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.get_text_config().vocab_size >= len(tokenizer)
    user = [{"type": "image"}, {"type": "text", "text": "what is it?"}]
    two_shot = processor.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
         {"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
    assert two_shot.startswith("<|begin_of_text|>User:<image>what is it?<end_of_utterance>\nAssistant: a cat")
    rgb = [image.convert("RGB") for image in images]
    tokenizer.padding_side = "left"
    assert processor.image_processor.do_image_splitting  # as Idefics3's: tiles plus a global view
    inputs = processor(images=[rgb, rgb[:1]], text=[two_shot, two_shot.split("Assistant: a cat")[0]],
                       padding=True, do_image_splitting=False, return_tensors="pt")
    per_image = tiny_zoo.idefics3_image_seq_len()  # one view per image
    assert (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [2 * per_image, per_image]
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[0] == 2


def _torchvision_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def test_qwen2_vl_loads_without_torchvision_through_the_image_only_processor(zoo, images):
    from capvqa.models.qwen2_vl_image_processor import Qwen2VLImageOnlyProcessor

    folder = zoo["qwen2_vl"]
    assert {"preprocessor_config.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}  # as the hub's
    if not _torchvision_installed():
        with pytest.raises(ImportError, match="[Tt]orchvision"):  # the video processor; what users hit too
            AutoProcessor.from_pretrained(folder)
    processor = Qwen2VLImageOnlyProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor.image_processor).__name__ in {"Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor"}
    tokenizer = processor.tokenizer
    config = model.config
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id,
            config.vision_end_token_id) == tuple(tokenizer.convert_tokens_to_ids(
                ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    assert processor.image_token_id == config.image_token_id
    assert config.get_text_config().vocab_size >= len(tokenizer)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n<|im_start|>assistant\n")
    rgb = [image.convert("RGB") for image in images]
    inputs = processor(images=rgb, text=[text] * 2, padding=True, return_tensors="pt")
    # dynamic resolution: 90x120 px -> 32x64 px -> 2x4 patches, 48x64 px -> 64x64 px -> 4x4 patches
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 4], [1, 4, 4]]
    assert inputs["pixel_values"].shape == (8 + 16, 3 * 2 * tiny_zoo.PATCH_SIZE**2)
    # one <|image_pad|> per 2x2 merged patches
    assert (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist() == [2, 4]
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 2
    with pytest.raises(ValueError, match="video"):
        processor(videos=[np.zeros((2, 64, 64, 3), dtype=np.uint8)], text=["<|vision_start|><|video_pad|>"])


def test_the_image_only_qwen2_vl_processor_encodes_images_as_transformers_processor(zoo, images, monkeypatch):
    """The same images and texts through transformers' Qwen2VLProcessor, built here without its video
    processor by skipping its constructor's class check (its video path is never taken for images)."""
    from transformers import AutoImageProcessor, Qwen2VLProcessor

    from capvqa.models.qwen2_vl_image_processor import Qwen2VLImageOnlyProcessor

    folder = zoo["qwen2_vl"]
    ours = Qwen2VLImageOnlyProcessor.from_pretrained(folder)
    monkeypatch.setattr(Qwen2VLProcessor, "check_argument_for_proper_class", lambda self, name, value: None)
    theirs = Qwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                              tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=object(),
                              chat_template=(folder / "chat_template.jinja").read_text())
    rgb = [image.convert("RGB") for image in images]
    texts = ["<|vision_start|><|image_pad|><|vision_end|>what is it?", "a <|vision_start|><|image_pad|><|vision_end|>"]
    mine = ours(images=rgb, text=texts, padding=True, return_tensors="pt")
    real = theirs(images=rgb, text=texts, padding=True, return_tensors="pt")
    assert sorted(mine) == sorted(real) == ["attention_mask", "image_grid_thw", "input_ids", "mm_token_type_ids",
                                            "pixel_values"]
    assert all(torch.equal(mine[key], real[key]) for key in real)
    assert ours.chat_template == theirs.chat_template


# ---------------------------------------------------------------------------------------------------
# Real-size tokenizer builders


def test_real_size_tokenizers():
    started = time.perf_counter()
    bert = offline_tokenizers.build_real_size_tokenizer("blip_bert")
    assert len(bert) == 30524
    assert bert.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]) == [
        0, 100, 101, 102, 103, 30522, 30523,
    ]  # fmt: skip
    t5 = offline_tokenizers.build_real_size_tokenizer("t5")
    assert len(t5) == 32100
    assert t5.convert_tokens_to_ids(["<pad>", "</s>", "<unk>", "<extra_id_99>", "<extra_id_0>"]) == [
        0, 1, 2, 32000, 32099,
    ]  # fmt: skip
    small_t5 = offline_tokenizers.build_t5_tokenizer()
    # Filler pieces never win a segmentation: the real-size tokenizer splits text like the small one.
    for line in offline_tokenizers.vqa_corpus()[:50]:
        assert t5(line).input_ids == small_t5(line).input_ids
    assert time.perf_counter() - started < 10.0


def test_real_size_bpe_tokenizers():
    opt = offline_tokenizers.build_real_size_tokenizer("opt")
    assert len(opt) == offline_tokenizers.REAL_TOKENIZER_SIZES["opt"] == 50265
    assert opt.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    clip = offline_tokenizers.build_real_size_tokenizer("clip")
    assert len(clip) == 49408
    assert clip.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    with pytest.raises(KeyError):
        offline_tokenizers.build_real_size_tokenizer("gpt5")


def test_whole_word_pieces_make_listed_words_one_token():
    plain = offline_tokenizers.build_t5_tokenizer(sp_vocab_size=2500, extra_ids=5)
    words = ["befibu", "bapevi", "zukomara"]
    whole = offline_tokenizers.build_t5_tokenizer(sp_vocab_size=2500, extra_ids=5, whole_words=words)
    assert len(whole) == len(plain) == 2505
    text = "what is befibu bapevi zukomara?"
    assert len(plain.tokenize(text)) > len(whole.tokenize(text))
    pieces = whole.tokenize(text)
    assert all(f"\u2581{w}" in pieces for w in words)
    assert whole.decode(whole(text).input_ids, skip_special_tokens=True) == text
    # words the trained pieces already segment are segmented as before
    for line in offline_tokenizers.vqa_corpus()[:50]:
        assert whole(line).input_ids == plain(line).input_ids


def test_exact_sizes_on_request():
    assert len(offline_tokenizers.build_blip_bert_tokenizer(total_size=1000)) == 1000
    assert len(offline_tokenizers.build_t5_tokenizer(sp_vocab_size=700, extra_ids=5)) == 705
    assert len(offline_tokenizers.build_opt_tokenizer(vocab_size=777)) == 777
    assert len(offline_tokenizers.build_clip_tokenizer(vocab_size=555)) == 555
    with pytest.raises(ValueError):
        offline_tokenizers.build_blip_bert_tokenizer(total_size=50)


# ---------------------------------------------------------------------------------------------------
# The shared cached copy


def test_ensure_builds_once_under_capvqa_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPVQA_HOME", str(tmp_path / "home"))
    expected_root = tmp_path / "home" / "tiny-zoo" / f"v{tiny_zoo.ZOO_VERSION}"
    assert tiny_zoo.default_zoo_dir() == expected_root
    paths = ensure_tiny_zoo()
    assert paths == {role: expected_root / role for role in ROLES}
    stamp = (expected_root / "itm" / "model.safetensors").stat().st_mtime_ns

    def fail(root):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(tiny_zoo, "build_tiny_zoo", fail)
    assert ensure_tiny_zoo() == paths
    assert (expected_root / "itm" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in expected_root.parent.iterdir()] == [expected_root.name]  # no staging left over


def test_ensure_lost_race_keeps_the_winner(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    real_build = tiny_zoo.build_tiny_zoo

    def build_while_another_process_finishes_first(staging):
        real_build(root)  # the "other process" renames its complete copy into place first
        (root / "winner").write_text("1")
        return real_build(staging)

    monkeypatch.setattr(tiny_zoo, "build_tiny_zoo", build_while_another_process_finishes_first)
    paths = ensure_tiny_zoo(root)
    assert paths["reader"] == root / "reader"
    assert (root / "winner").exists()  # the winner's copy was kept, ours discarded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_ensure_refuses_a_half_written_folder(tmp_path):
    root = tmp_path / "zoo"
    (root / "itm").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="not a complete tiny zoo"):
        ensure_tiny_zoo(root)
