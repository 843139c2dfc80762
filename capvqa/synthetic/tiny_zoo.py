"""The tiny zoo: small random-weight models for every model role, built offline and deterministically.

Each role gets a folder written with ``save_pretrained`` that loads back through the ordinary
``Auto*.from_pretrained(folder)`` path with the hub unreachable, so tests and demos run the same loading
and inference code as the real checkpoints, in seconds, on a CPU.

- ``itm``: BlipForImageTextRetrieval + BlipProcessor (BERT WordPiece with ``[DEC]``/``[ENC]`` as the last
  two ids); stands in for Salesforce/blip-itm-large-coco.
- ``captioner``: BlipForConditionalGeneration, same processor; for Salesforce/blip-image-captioning-large.
- ``reader``: T5ForConditionalGeneration, T5 v1.0 flavour (relu, decoder output scaled) + T5Tokenizer
  (sentencepiece unigram, 10 sentinels); for allenai/unifiedqa-v2-t5-*-1363200.
- ``qg``: T5ForConditionalGeneration, T5 v1.1 flavour (gated-gelu, no output scaling), same tokenizer;
  for google/t5-large-lm-adapt with the Img2LLM QG weights.
- ``causal_lm``: OPTForCausalLM + GPT2Tokenizer (byte-level BPE, ``</s>`` prepended, left padding);
  for facebook/opt-*.
- ``clip``: CLIPModel + CLIPProcessor (CLIP BPE, 77 positions); for openai/clip-vit-base-patch16.
- ``blip2``: Blip2ForConditionalGeneration with a T5 v1.1 LM + Blip2Processor (BLIP image processor, the
  T5 tokenizer with ``<image>`` added); for Salesforce/blip2-flan-t5-xl.
- ``blip2_opt``: the same with an OPT LM and OPT's tokenizer; for Salesforce/blip2-opt-2.7b.
- ``instructblip``: InstructBlipForConditionalGeneration, T5 LM + InstructBlipProcessor (the T5 tokenizer
  for the LM, BLIP's BERT tokenizer for the Q-Former); for Salesforce/instructblip-flan-t5-xl.
- ``llava``: LlavaForConditionalGeneration (CLIP vision tower, Llama LM) + LlavaProcessor with llava-hf's
  chat template (``USER: <image>\n... ASSISTANT:``); for llava-hf/llava-1.5-7b-hf. The tokenizer is
  OPT's byte-level BPE with Llama's ``<s>``/``</s>`` and ``<image>``, not Llama's SentencePiece BPE.
- ``idefics``: Idefics3ForConditionalGeneration (SigLIP-style vision tower, pixel shuffle by 2, Llama LM)
  + Idefics3Processor with Idefics3-8B-Llama3's chat template and its PIL image processor (no
  torchvision), splitting images into tiles as Idefics3 does; for HuggingFaceM4/Idefics3-8B-Llama3. The
  tokenizer is the same byte-level BPE with Llama 3's ``<|begin_of_text|>``/``<|end_of_text|>`` and
  Idefics3's image tokens.
- ``qwen2_vl``: Qwen2VLForConditionalGeneration (Qwen2-VL vision tower with 2D rotary positions, 2x2
  patch merger, Qwen2 LM with multimodal rotary positions) + Qwen2-VL-7B-Instruct's chat template and its
  PIL image processor (dynamic resolution: images resized to multiples of 32 px, up to 64x64 px here),
  written as the hub folder is (``preprocessor_config.json``, tokenizer, chat template; no video processor,
  which needs torchvision); for Qwen/Qwen2-VL-7B-Instruct. The tokenizer is the same byte-level BPE with
  Qwen2's ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` and the vision tokens.

The weights are random: outputs have the right shapes and types, not meaning. Two builds write
byte-identical files (fixed seed per role, single-threaded tokenizer training), so a folder's hash can
serve as a model fingerprint. Bump :data:`ZOO_VERSION` whenever anything written here changes.

Two tiers, as elsewhere in capvqa: ``tiny_*_config`` builders take every size as an argument; the zoo
itself (:func:`build_tiny_zoo`, :func:`ensure_tiny_zoo`) fixes the numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    GPT2Tokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from capvqa.atomic import building_directory
from capvqa.errors import ModelLoadError
from capvqa.resources import capvqa_home
from capvqa.synthetic import offline_tokenizers

logger = logging.getLogger(__name__)

# 2: the ITM head is centred (centre_itm_head), OPT has 2048 positions as the real ones
# 3: end-to-end vision-language models (blip2, blip2_opt, instructblip, llava)
# 4: idefics (Idefics3) for few-shot prompts with interleaved images
# 5: qwen2_vl (Qwen2-VL), loaded without torchvision through capvqa's image-only processor
ZOO_VERSION = 5
ZOO_SEED = 1234
MANIFEST_NAME = "manifest.json"
ROLES: tuple[str, ...] = (
    "itm", "captioner", "reader", "qg", "causal_lm", "clip", "blip2", "blip2_opt", "instructblip", "llava",
    "idefics", "qwen2_vl",
)

# Sizes shared by the roles (kept small: the whole zoo is ~8 MB and builds in a few seconds).
IMAGE_SIZE = 64  # 64 / 16 = 4x4 patches (+ CLS): same code paths as 384 px / 24x24, 36x less work
PATCH_SIZE = 16
T5_SP_VOCAB = 500
T5_EXTRA_IDS = 10
OPT_VOCAB = 600
CLIP_VOCAB = 1000
NUM_QUERY_TOKENS = 4  # BLIP-2 / InstructBLIP Q-Former queries (real: 32)


@dataclass(frozen=True)
class TinyModelEntry:
    """One role of the zoo, as recorded in ``manifest.json``."""

    role: str
    model_class: str
    processor_class: str
    stands_in_for: str
    seed: int  # torch seed the random weights are drawn with


_ENTRIES = (
    ("itm", "BlipForImageTextRetrieval", "BlipProcessor", "Salesforce/blip-itm-large-coco"),
    ("captioner", "BlipForConditionalGeneration", "BlipProcessor", "Salesforce/blip-image-captioning-large"),
    ("reader", "T5ForConditionalGeneration", "T5Tokenizer", "allenai/unifiedqa-v2-t5-large-1363200"),
    ("qg", "T5ForConditionalGeneration", "T5Tokenizer", "google/t5-large-lm-adapt"),
    ("causal_lm", "OPTForCausalLM", "GPT2Tokenizer", "facebook/opt-6.7b"),
    ("clip", "CLIPModel", "CLIPProcessor", "openai/clip-vit-base-patch16"),
    ("blip2", "Blip2ForConditionalGeneration", "Blip2Processor", "Salesforce/blip2-flan-t5-xl"),
    ("blip2_opt", "Blip2ForConditionalGeneration", "Blip2Processor", "Salesforce/blip2-opt-2.7b"),
    ("instructblip", "InstructBlipForConditionalGeneration", "InstructBlipProcessor",
     "Salesforce/instructblip-flan-t5-xl"),
    ("llava", "LlavaForConditionalGeneration", "LlavaProcessor", "llava-hf/llava-1.5-7b-hf"),
    ("idefics", "Idefics3ForConditionalGeneration", "Idefics3Processor", "HuggingFaceM4/Idefics3-8B-Llama3"),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen/Qwen2-VL-7B-Instruct"),
)


def tiny_zoo_manifest() -> dict:
    """What the zoo holds: version and one entry per role (also written to ``root/manifest.json``)."""
    entries = [TinyModelEntry(*fields, seed=ZOO_SEED + i) for i, fields in enumerate(_ENTRIES)]
    assert tuple(entry.role for entry in entries) == ROLES
    return {"zoo_version": ZOO_VERSION, "roles": {entry.role: asdict(entry) for entry in entries}}


# ---------------------------------------------------------------------------------------------------
# Parameterised config builders


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tiny_blip_config(
    *,
    vocab_size: int,
    bos_token_id: int,
    sep_token_id: int,
    pad_token_id: int = 0,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    text_hidden: int = 32,
    text_layers: int = 12,
    text_heads: int = 4,
    text_intermediate: int = 64,
    max_position_embeddings: int = 64,
    embed_dim: int = 16,
) -> BlipConfig:
    """A small BLIP config (ITM and captioner). 12 text layers like the real model: GradCAM uses layer 7."""
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_hidden,
        "encoder_hidden_size": vision_hidden,
        "intermediate_size": text_intermediate,
        "projection_dim": embed_dim,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": bos_token_id,
        "sep_token_id": sep_token_id,
        "eos_token_id": sep_token_id,  # BLIP's generate stops at [SEP]; keep both ids the same
        "pad_token_id": pad_token_id,
    }
    vision_config = {
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate,
        "projection_dim": embed_dim,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "layer_norm_eps": 1e-6,  # as the original BLIP checkpoints
        # HF's default (1e-10) leaves position and class embeddings at ~0: patches would all look alike.
        "initializer_range": 0.02,
    }
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        image_text_hidden_size=embed_dim,
    )


def tiny_t5_config(
    *,
    vocab_size: int,
    d_model: int = 32,
    d_ff: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    d_kv: int = 16,
    v1_1: bool = False,
) -> T5Config:
    """A small T5 config; pad = decoder start = 0, eos = 1.

    ``v1_1`` selects the T5 v1.1 flavour of t5-lm-adapt (gated-gelu, decoder output not rescaled) instead
    of v1.0 as in UnifiedQA (relu, rescaled). transformers v5 turns ``tie_word_embeddings=False`` into
    ``scale_decoder_outputs=False`` and ties the head anyway; a checkpoint that stores its own
    ``lm_head.weight`` (the real v1.1 ones) is still loaded untied.
    """
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu" if v1_1 else "relu",
        tie_word_embeddings=not v1_1,
        pad_token_id=offline_tokenizers.T5_PAD_ID,
        eos_token_id=offline_tokenizers.T5_EOS_ID,
        decoder_start_token_id=offline_tokenizers.T5_PAD_ID,
    )


def tiny_opt_config(
    *,
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    ffn_dim: int = 64,
    max_position_embeddings: int = 2048,  # as every OPT size: Img2LLM's prompts need the room
) -> OPTConfig:
    """A small OPT config with OPT's special ids (pad 1, bos = eos = ``</s>`` 2)."""
    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        word_embed_proj_dim=hidden_size,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def tiny_clip_config(
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    projection_dim: int = 16,
    max_position_embeddings: int = 77,
) -> CLIPConfig:
    """A small CLIP config. The text eos id must be the tokenizer's: the pooled text feature is read there."""
    shared = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
    }
    return CLIPConfig(
        text_config=dict(
            shared,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        ),
        vision_config=dict(shared, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )


def _tiny_vision_tower(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, hidden: int = 32) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}


def _tiny_qformer(vision_hidden: int = 32, **extra: Any) -> dict:
    return {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "encoder_hidden_size": vision_hidden, **extra}


def tiny_blip2_config(
    text_config: T5Config | OPTConfig, *, image_token_index: int, num_query_tokens: int = NUM_QUERY_TOKENS
) -> Blip2Config:
    """A small BLIP-2: ViT, Q-Former with ``num_query_tokens`` queries, and ``text_config``'s LM."""
    return Blip2Config(vision_config=_tiny_vision_tower(), qformer_config=_tiny_qformer(),
                       text_config=text_config.to_dict(), num_query_tokens=num_query_tokens,
                       image_token_index=image_token_index)


def tiny_instructblip_config(
    text_config: T5Config, *, qformer_vocab_size: int, image_token_index: int,
    num_query_tokens: int = NUM_QUERY_TOKENS,
) -> InstructBlipConfig:
    """A small InstructBLIP: as BLIP-2, with a Q-Former that also reads the instruction (BERT vocab)."""
    return InstructBlipConfig(vision_config=_tiny_vision_tower(),
                              qformer_config=_tiny_qformer(vocab_size=qformer_vocab_size),
                              text_config=text_config.to_dict(), num_query_tokens=num_query_tokens,
                              image_token_index=image_token_index)


def tiny_llava_config(
    *, vocab_size: int, image_token_index: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
    hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, max_position_embeddings: int = 4096,
) -> LlavaConfig:
    """A small LLaVA-1.5: CLIP vision tower (features of its second-to-last layer, CLS dropped), a
    two-layer MLP projector and a Llama LM."""
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    vision = dict(_tiny_vision_tower(), model_type="clip_vision_model", projection_dim=16)
    text = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
            "max_position_embeddings": max_position_embeddings, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       image_seq_length=patches, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def tiny_idefics3_config(
    *, vocab_size: int, image_token_id: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
    hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, max_position_embeddings: int = 4096,
    scale_factor: int = 2,
) -> Idefics3Config:
    """A small Idefics3: an Idefics3 (SigLIP-style) vision tower, the connector's pixel shuffle by
    ``scale_factor`` and a Llama LM. Each image becomes (IMAGE_SIZE / PATCH_SIZE)^2 / scale_factor^2
    ``<image>`` tokens (:func:`idefics3_image_seq_len`)."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
    text = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
            "max_position_embeddings": max_position_embeddings, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale_factor,
                          image_token_id=image_token_id, pad_token_id=pad_token_id)


def idefics3_image_seq_len(scale_factor: int = 2) -> int:
    """``<image>`` tokens per image: the patches after the connector's pixel shuffle."""
    return (IMAGE_SIZE // PATCH_SIZE) ** 2 // scale_factor**2


# HuggingFaceM4/Idefics3-8B-Llama3's chat template (chat_template.json), verbatim
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3_tokenizer(vocab_size: int = OPT_VOCAB, model_max_length: int = 4096) -> GPT2Tokenizer:
    """Byte-level BPE with Llama 3's ``<|begin_of_text|>``/``<|end_of_text|>`` (the chat template writes
    the former itself, so the tokenizer adds none), a pad token, and the image tokens Idefics3's processor
    looks up (``<fake_token_around_image>``, ``<global-img>``; it adds ``<image>`` and
    ``<end_of_utterance>`` itself); left padding."""
    vocab, merges = offline_tokenizers.opt_bpe_vocab(vocab_size=vocab_size)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<|begin_of_text|>",
                              eos_token="<|end_of_text|>", unk_token="<unk>", pad_token="<pad>",
                              add_bos_token=False, add_prefix_space=False, padding_side="left",
                              model_max_length=model_max_length)
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)
                          for token in ("<fake_token_around_image>", "<global-img>")], special_tokens=True)
    return tokenizer


def idefics3_image_processor():
    # transformers v5 without torchvision has the PIL backend only. Idefics3's layout scaled down: images
    # resized to a longest edge of 2 tiles and split into IMAGE_SIZE tiles plus a global view (the real
    # one: 4 x 364 px, tiles of 364 px), so image splitting has something to split
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE},
                                     max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True)


def tiny_qwen2_vl_config(
    *, vocab_size: int, image_token_id: int, video_token_id: int, vision_start_token_id: int,
    vision_end_token_id: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, hidden_size: int = 32,
    num_layers: int = 2, num_heads: int = 2, max_position_embeddings: int = 4096,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
) -> Qwen2VLConfig:
    """A small Qwen2-VL: its vision tower on PATCH_SIZE patches (real: 14 px) with the 2x2 patch merger,
    and a Qwen2 LM whose rotary dimensions are split over (time, height, width) by ``mrope_section``
    (sums to half the head size, as [16, 24, 24] for the real 128)."""
    head_dim = hidden_size // num_heads
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to half the head size {head_dim}")
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": hidden_size, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": PATCH_SIZE, "spatial_merge_size": 2, "temporal_patch_size": 2}
    text = {"vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(mrope_section),
                                "rope_theta": 1000000.0},
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                         video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
                         vision_end_token_id=vision_end_token_id)


# Qwen/Qwen2-VL-7B-Instruct's chat template (chat_template.json), verbatim
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_VL_SPECIAL_TOKENS = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_qwen2_vl_tokenizer(vocab_size: int = OPT_VOCAB, model_max_length: int = 4096) -> GPT2Tokenizer:
    """Byte-level BPE with Qwen2-VL-Instruct's special tokens: ``<|endoftext|>`` pads, ``<|im_end|>`` ends
    a turn (the eos), no bos (the chat template writes ``<|im_start|>``), and the vision tokens; left
    padding."""
    vocab, merges = offline_tokenizers.opt_bpe_vocab(vocab_size=vocab_size)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=None, eos_token="<|im_end|>",
                              unk_token="<unk>", pad_token="<|endoftext|>", add_bos_token=False,
                              add_prefix_space=False, padding_side="left", model_max_length=model_max_length)
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN2_VL_SPECIAL_TOKENS],
                         special_tokens=True)
    return tokenizer


def qwen2_vl_image_processor():
    # the PIL backend (no torchvision); Qwen2-VL's dynamic resolution scaled down: each side a multiple of
    # patch x merge = 32 px, between 32x32 and 64x64 px in area (the real one: 28 px, 56x56 to 28x28x1280)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=(2 * PATCH_SIZE) ** 2, max_pixels=IMAGE_SIZE**2,
                                    patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2)


# llava-hf/llava-1.5-*-hf's chat template, in effect: "USER: <image>\n{text} ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava_tokenizer(vocab_size: int = OPT_VOCAB, model_max_length: int = 4096) -> GPT2Tokenizer:
    """Byte-level BPE with Llama's special tokens (``<s>`` prepended, ``</s>``, ``<unk>``), a pad token
    and ``<image>`` as llava-hf adds them; left padding."""
    vocab, merges = offline_tokenizers.opt_bpe_vocab(vocab_size=vocab_size)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<pad>", add_bos_token=True, add_prefix_space=False, padding_side="left",
                              model_max_length=model_max_length)
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _progress_bars_off():
    """Silence transformers' per-save "Writing model shards" bars for the build, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_random_model(model_class: type[PreTrainedModel], config, folder: Path, seed: int, prepare=None) -> None:
    """Initialise ``model_class(config)`` under ``seed`` and save it, leaving the global RNG untouched.
    ``prepare(model)``, when given, adjusts the random model before it is saved (still under the seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        model.eval()
        if prepare is not None:
            prepare(model)
    with _progress_bars_off():
        model.save_pretrained(folder)


def centre_itm_head(model: Any, rows: int = 64, length: int = 12, patches: int = 5) -> None:
    """Shift the random ITM head's "match" bias so that half of a fixed batch of random texts over random
    image memories score above 0.5.

    Img2LLM keeps a caption when the ITM gives it at least 0.5; a random head puts nearly every caption on
    one side of that line (the tiny zoo's first build scored them all about 0.45), so a tiny pipeline
    would keep no caption or all of them and the filter's code paths would go untested. Centring keeps
    the model random (its scores mean nothing) but the filter's decisions mixed.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, vocab - 2, (rows, length), generator=generator)
    ids[:, 0] = vocab - 1  # [ENC], the ITM text's first token
    memory = torch.randn(rows, patches, model.config.vision_config.hidden_size, generator=generator)
    with torch.no_grad():
        hidden = model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    encoder_hidden_states=memory)[0][:, 0]
        logits = model.itm_head(hidden)
        model.itm_head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()


def blip_image_processor(image_size: int = IMAGE_SIZE):
    # Without torchvision transformers v5 only has the PIL backend; both save as "BlipImageProcessor" and
    # AutoProcessor picks whichever backend is installed when loading.
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def _clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def build_tiny_zoo(root: Path) -> dict[str, Path]:
    """Build every role into ``root/<role>`` (``root`` is created) and write ``root/manifest.json``.

    Deterministic: two builds give byte-identical files. Returns ``{role: folder}``. Overwrites
    existing files; use :func:`ensure_tiny_zoo` for the shared cached copy.
    """
    root = Path(root)
    manifest = tiny_zoo_manifest()
    seeds = {role: entry["seed"] for role, entry in manifest["roles"].items()}
    paths = {role: root / role for role in ROLES}
    for folder in paths.values():
        folder.mkdir(parents=True, exist_ok=True)

    # BLIP: one tokenizer + processor shared by the ITM model and the captioner, as on the hub.
    blip_tokenizer = offline_tokenizers.build_blip_bert_tokenizer()
    blip_processor = BlipProcessor(image_processor=blip_image_processor(), tokenizer=blip_tokenizer)
    blip_config = tiny_blip_config(
        vocab_size=len(blip_tokenizer),
        bos_token_id=blip_tokenizer.bos_token_id,
        sep_token_id=blip_tokenizer.sep_token_id,
        pad_token_id=blip_tokenizer.pad_token_id,
    )
    vocab_tokens = offline_tokenizers.wordpiece_vocab()
    for role, model_class in (
        ("itm", BlipForImageTextRetrieval),
        ("captioner", BlipForConditionalGeneration),
    ):
        save_random_model(model_class, blip_config, paths[role], seeds[role],
                          prepare=centre_itm_head if role == "itm" else None)
        blip_processor.save_pretrained(paths[role])
        # The hub folders carry the WordPiece vocab too; transformers reads tokenizer.json first.
        offline_tokenizers.write_wordpiece_vocab(paths[role] / "vocab.txt", vocab_tokens)

    # T5 reader (UnifiedQA, T5 v1.0) and question generator (t5-lm-adapt, v1.1) share one tokenizer.
    t5_tokenizer = offline_tokenizers.build_t5_tokenizer(sp_vocab_size=T5_SP_VOCAB, extra_ids=T5_EXTRA_IDS)
    t5_vocab = _round_up(len(t5_tokenizer), 64)  # as 32,100 -> 32,128: the table outgrows the tokenizer
    for role, v1_1 in (("reader", False), ("qg", True)):
        t5_config = tiny_t5_config(vocab_size=t5_vocab, v1_1=v1_1)
        save_random_model(T5ForConditionalGeneration, t5_config, paths[role], seeds[role])
        t5_tokenizer.save_pretrained(paths[role])

    opt_tokenizer = offline_tokenizers.build_opt_tokenizer(vocab_size=OPT_VOCAB, model_max_length=2048)
    opt_config = tiny_opt_config(vocab_size=_round_up(len(opt_tokenizer) + 1, 16))  # like 50,265 -> 50,272
    save_random_model(OPTForCausalLM, opt_config, paths["causal_lm"], seeds["causal_lm"])
    opt_tokenizer.save_pretrained(paths["causal_lm"])

    clip_tokenizer = offline_tokenizers.build_clip_tokenizer(vocab_size=CLIP_VOCAB)
    clip_config = tiny_clip_config(
        vocab_size=len(clip_tokenizer),
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    save_random_model(CLIPModel, clip_config, paths["clip"], seeds["clip"])
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=clip_tokenizer).save_pretrained(
        paths["clip"]
    )

    _build_vision_language_models(paths, seeds)

    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def _build_vision_language_models(paths: dict[str, Path], seeds: dict[str, int]) -> None:
    """The end-to-end VLM roles. Each processor adds its image placeholder token to its tokenizer, so
    every role gets a fresh tokenizer and the LM's vocabulary is sized after that."""
    t5_size = _round_up(T5_SP_VOCAB + T5_EXTRA_IDS + 1, 64)
    for role, lm in (("blip2", "t5"), ("blip2_opt", "opt")):
        if lm == "t5":
            tokenizer = offline_tokenizers.build_t5_tokenizer(sp_vocab_size=T5_SP_VOCAB, extra_ids=T5_EXTRA_IDS)
        else:
            tokenizer = offline_tokenizers.build_opt_tokenizer(vocab_size=OPT_VOCAB, model_max_length=2048)
        processor = Blip2Processor(image_processor=blip_image_processor(), tokenizer=tokenizer,
                                   num_query_tokens=NUM_QUERY_TOKENS)
        text_config = (tiny_t5_config(vocab_size=t5_size, v1_1=True) if lm == "t5"
                       else tiny_opt_config(vocab_size=_round_up(len(tokenizer) + 1, 16)))
        config = tiny_blip2_config(text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
        save_random_model(Blip2ForConditionalGeneration, config, paths[role], seeds[role])
        processor.save_pretrained(paths[role])

    tokenizer = offline_tokenizers.build_t5_tokenizer(sp_vocab_size=T5_SP_VOCAB, extra_ids=T5_EXTRA_IDS)
    qformer_tokenizer = offline_tokenizers.build_blip_bert_tokenizer()
    processor = InstructBlipProcessor(image_processor=blip_image_processor(), tokenizer=tokenizer,
                                      qformer_tokenizer=qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = tiny_instructblip_config(tiny_t5_config(vocab_size=t5_size, v1_1=True),
                                      qformer_vocab_size=len(qformer_tokenizer),
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    save_random_model(InstructBlipForConditionalGeneration, config, paths["instructblip"], seeds["instructblip"])
    processor.save_pretrained(paths["instructblip"])

    tokenizer = build_llava_tokenizer()
    processor = LlavaProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = tiny_llava_config(vocab_size=_round_up(len(tokenizer), 16),
                               image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    save_random_model(LlavaForConditionalGeneration, config, paths["llava"], seeds["llava"])
    processor.save_pretrained(paths["llava"])

    tokenizer = build_idefics3_tokenizer()
    processor = Idefics3Processor(image_processor=idefics3_image_processor(), tokenizer=tokenizer,
                                  image_seq_len=idefics3_image_seq_len(), chat_template=IDEFICS3_CHAT_TEMPLATE)
    config = tiny_idefics3_config(vocab_size=_round_up(len(tokenizer), 16),
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    save_random_model(Idefics3ForConditionalGeneration, config, paths["idefics"], seeds["idefics"])
    processor.save_pretrained(paths["idefics"])

    # Qwen2VLProcessor cannot be built without torchvision (its video processor), so the folder is written
    # part by part, as the hub's Qwen2-VL folders are; AutoProcessor reads them back where torchvision is
    # installed, capvqa's image-only processor where it is not (capvqa.models.qwen2_vl_image_processor).
    tokenizer = build_qwen2_vl_tokenizer()
    ids = dict(zip(QWEN2_VL_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS))))
    config = tiny_qwen2_vl_config(vocab_size=_round_up(len(tokenizer), 16), image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"], bos_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_random_model(Qwen2VLForConditionalGeneration, config, paths["qwen2_vl"], seeds["qwen2_vl"])
    qwen2_vl_image_processor().save_pretrained(paths["qwen2_vl"])
    tokenizer.save_pretrained(paths["qwen2_vl"])
    (paths["qwen2_vl"] / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE, encoding="utf-8")


def default_zoo_dir() -> Path:
    """``$CAPVQA_HOME/tiny-zoo/v{ZOO_VERSION}`` (``CAPVQA_HOME`` defaults to ``~/.cache/capvqa``)."""
    return capvqa_home() / "tiny-zoo" / f"v{ZOO_VERSION}"


def _zoo_paths(root: Path) -> dict[str, Path]:
    return {role: root / role for role in ROLES}


def ensure_tiny_zoo(root: Path | None = None) -> dict[str, Path]:
    """Return ``{role: folder}`` of the zoo at ``root`` (default :func:`default_zoo_dir`), building it once.

    The build goes to a temporary folder next to ``root`` and is renamed into place, so a reader never
    sees a half-written zoo. If two processes race, the first rename wins and the other discards its copy.
    """
    root = Path(root) if root is not None else default_zoo_dir()
    if (root / MANIFEST_NAME).is_file():
        return _zoo_paths(root)
    if root.exists() and any(root.iterdir()):
        raise ModelLoadError(
            f"{root} exists but holds no {MANIFEST_NAME}: it is not a complete tiny zoo. Delete it and retry."
        )
    logger.info("building the tiny model zoo v%d in %s", ZOO_VERSION, root)
    with building_directory(root, MANIFEST_NAME) as staging:
        build_tiny_zoo(staging)
    return _zoo_paths(root)
