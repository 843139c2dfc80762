"""The real PNP-VQA architectures, built from their configs with random weights (no download).

Random weights are for cost measurement only: the shapes, vocabulary sizes (offline tokenizers of the
real lengths) and code paths are the published models', so time and memory are representative, and the
answers are meaningless. Models are saved once under ``$CAPVQA_HOME/bench-models`` and then loaded through
the normal ``from_pretrained`` path, like any user model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from capvqa.atomic import building_directory
from capvqa.resources import capvqa_home

log = logging.getLogger(__name__)

BENCH_MODELS_VERSION = 3
SEED = 20221

# UnifiedQA-v2 readers are T5 v1.0 (relu feed-forward)
UNIFIEDQA_SIZES = {
    "base": {"d_model": 768, "d_ff": 3072, "d_kv": 64, "num_layers": 12, "num_heads": 12},
    "large": {"d_model": 1024, "d_ff": 4096, "d_kv": 64, "num_layers": 24, "num_heads": 16},
    "3b": {"d_model": 1024, "d_ff": 16384, "d_kv": 128, "num_layers": 24, "num_heads": 32},
}
T5_MODEL_VOCAB = 32128  # the embedding table outgrows the 32,100-entry tokenizer, as on the hub

# BLIP ViT-L/16 at 384 px with a BERT-base text encoder/decoder (Salesforce/blip-*-large*)
BLIP_LARGE = {
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
               "num_attention_heads": 16, "image_size": 384, "patch_size": 16},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "max_position_embeddings": 512},
}


_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def pseudo_words(count: int) -> list[str]:
    """``count`` distinct pronounceable words (2-3 consonant-vowel syllables), deterministic.

    A real-size vocabulary padded with ``[unusedN]`` entries makes random-weight captions decode into
    strings that the T5 tokenizer splits into ~14 pieces per word, so reader passages come out ~5x longer
    than real ones and the benchmark would misstate the reader's cost. Word-like filler keeps passage
    lengths realistic (a few T5 pieces per word, as with BERT's real vocabulary).
    """
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = [a + b for a in syllables for b in syllables]
    words += [a + b + c for a in syllables for b in syllables for c in syllables]
    if count > len(words):
        raise ValueError(f"at most {len(words)} pseudo-words")
    return words[:count]


def bench_tokenizers() -> tuple:
    """(BLIP BERT tokenizer of 30,524 entries, T5 tokenizer of 32,100) with word-like vocabularies."""
    import random

    from capvqa.synthetic.offline_tokenizers import (
        REAL_TOKENIZER_SIZES,
        VQA_WORDS,
        build_blip_bert_tokenizer,
        build_t5_tokenizer,
        vqa_corpus,
        wordpiece_vocab,
    )

    blip_size = REAL_TOKENIZER_SIZES["blip_bert"]
    base = len(wordpiece_vocab(VQA_WORDS, num_leading_unused=99))
    words = list(VQA_WORDS) + pseudo_words(blip_size - 2 - base)
    blip = build_blip_bert_tokenizer(words=words, total_size=blip_size, num_leading_unused=99)
    rng = random.Random(0)
    extra = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    # every caption word one T5 piece, as common words are with T5's real vocabulary: reader passages
    # then have the real token counts (~16 caption pieces for 16 BERT tokens), not twice as many
    t5 = build_t5_tokenizer(vqa_corpus() + extra, sp_vocab_size=REAL_TOKENIZER_SIZES["t5"] - 100, extra_ids=100,
                            whole_words=words)
    return blip, t5


def bench_models_dir() -> Path:
    return capvqa_home() / "bench-models" / f"v{BENCH_MODELS_VERSION}"


def ensure_pnp_vqa_models(size: str, root: Path | None = None) -> dict[str, Path]:
    """``{itm, captioner, reader}`` folders of random-weight real-size models, built once."""
    if size not in UNIFIEDQA_SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {sorted(UNIFIEDQA_SIZES)}")
    root = Path(root) if root is not None else bench_models_dir()
    wanted = {"itm": root / "blip-itm-large", "captioner": root / "blip-captioning-large",
              "reader": root / f"unifiedqa-v2-t5-{size}"}
    builders = {"itm": _build_blip, "captioner": _build_blip, "reader": _build_reader}
    for role, folder in wanted.items():
        if not (folder / "bench.json").is_file():
            _build_atomically(folder, lambda tmp, role=role: builders[role](role, size, tmp))
    return wanted


def _build_atomically(folder: Path, build) -> None:
    log.info("building random-weight %s (once)", folder.name)
    with building_directory(folder, "bench.json") as staging:
        build(staging)
        (staging / "bench.json").write_text(json.dumps({"random_weights": True, "seed": SEED}))


def _build_blip(role: str, size: str, folder: Path) -> None:
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipProcessor,
    )

    from capvqa.synthetic.tiny_zoo import blip_image_processor, save_random_model

    tokenizer, _ = bench_tokenizers()
    text = {**BLIP_LARGE["text"], "vocab_size": len(tokenizer), "encoder_hidden_size": 1024,
            "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {**BLIP_LARGE["vision"], "layer_norm_eps": 1e-6, "initializer_range": 0.02}
    config = BlipConfig(text_config=text, vision_config=vision)
    model_class = BlipForImageTextRetrieval if role == "itm" else BlipForConditionalGeneration
    save_random_model(model_class, config, folder, SEED)
    BlipProcessor(image_processor=blip_image_processor(384), tokenizer=tokenizer).save_pretrained(folder)


def _build_reader(role: str, size: str, folder: Path) -> None:
    from transformers import T5ForConditionalGeneration

    from capvqa.synthetic.tiny_zoo import save_random_model, tiny_t5_config

    _, tokenizer = bench_tokenizers()
    config = tiny_t5_config(vocab_size=T5_MODEL_VOCAB, **UNIFIEDQA_SIZES[size])
    save_random_model(T5ForConditionalGeneration, config, folder, SEED)
    tokenizer.save_pretrained(folder)
