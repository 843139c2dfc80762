"""The real PNP-VQA, Img2LLM and PICa architectures, built from their configs with random weights (no download).

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

BENCH_MODELS_VERSION = 3  # the folders of every model; a new model under a new name needs no new version
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


# Img2LLM's question generator: google/t5-large-lm-adapt, T5 v1.1 (gated-gelu, untied head)
T5_LARGE_LM_ADAPT = {"d_model": 1024, "d_ff": 2816, "d_kv": 64, "num_layers": 24, "num_heads": 16}

# the LLM of Img2LLM and PICa: OPT (Zhang et al., 2022, table 1) at every published size; 2,048 positions
OPT_SIZES = {
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072},
    "350m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "ffn_dim": 4096,
             "word_embed_proj_dim": 512, "do_layer_norm_before": False},
    "1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192},
    "2.7b": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240},
    "6.7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 16384},
    "13b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "ffn_dim": 20480},
    "30b": {"hidden_size": 7168, "num_hidden_layers": 48, "num_attention_heads": 56, "ffn_dim": 28672},
    "66b": {"hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72, "ffn_dim": 36864},
}
OPT_MODEL_VOCAB = 50272  # the embedding table outgrows the 50,265-entry tokenizer, as on the hub

# PICa's example selection and tags: openai/clip-vit-base-patch16
CLIP_B16 = {
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
             "max_position_embeddings": 77},
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16},
    "projection_dim": 512,
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


def bench_words() -> list[str]:
    """The words of the bench BLIP vocabulary (real VQA words, then pseudo-words), as the captions use them."""
    blip, _ = bench_tokenizers()
    return [w for w in blip.get_vocab() if w.isalpha() and w.islower()]


def bench_opt_tokenizer(model_max_length: int = 2048):
    """An OPT byte-level BPE tokenizer of the real 50,265 entries in which every pseudo-word after a space
    is one piece, as common words are with GPT-2's real vocabulary.

    Learned merges alone split a pseudo-word into about two pieces, so Img2LLM's and PICa's prompts (random
    captions and questions of pseudo-words) would come out twice the real token count and the LLM's cost
    with them. Merges build syllables, then " syllable", then whole words; the corpus merges follow.
    """
    from transformers import GPT2Tokenizer

    from capvqa.synthetic.offline_tokenizers import REAL_TOKENIZER_SIZES, _bpe_vocab, opt_bpe_vocab

    size = REAL_TOKENIZER_SIZES["opt"]
    space = "\u0120"  # byte-level BPE's visible space
    learned_vocab, learned = opt_bpe_vocab(vocab_size=size)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    merges = [(c, v) for c in _CONSONANTS for v in _VOWELS] + [(space, s) for s in syllables]
    stems: dict[str, None] = {}
    whole: dict[str, None] = {}
    for word in bench_words():
        parts = [word[i:i + 2] for i in range(0, len(word), 2)]
        if len(parts) not in (2, 3) or any(p not in syllables for p in parts):
            continue
        stems[parts[0] + parts[1]] = None
        if len(parts) == 3:
            whole[word] = None
    merges += [(space + w[:2], w[2:]) for w in stems]
    merges += [(space + w[:4], w[4:]) for w in whole]
    # real words (the prompts' fixed text, the bench questions) would now split at every syllable: each
    # gets a chain of merges that joins its pieces back into one, with and without a leading space
    for word in _real_words():
        for form in (word, space + word):
            pieces = _apply_merges(list(form), merges)
            merges += [("".join(pieces[:i]), pieces[i]) for i in range(1, len(pieces))]
    front = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = [t for t, i in sorted(learned_vocab.items(), key=lambda kv: kv[1]) if i >= 4][:256]
    merges = list(dict.fromkeys([*merges, *learned]))  # a pair once, at its first rank
    vocab, kept = _bpe_vocab(front, alphabet, merges, [], size, "madeupword{:04d}")
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=kept, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<pad>", add_bos_token=True, add_prefix_space=False, padding_side="left",
                              model_max_length=model_max_length)
    if len(tokenizer) != size:
        raise AssertionError(f"OPT tokenizer has {len(tokenizer)} entries, wanted {size}")
    return tokenizer


# the fixed words of the Img2LLM and PICa prompts (docs/methods.md#the-img2llm-prompt, #pica)
_PROMPT_TEXT = ("Please reason the answer of the questions according to the given contexts. Contexts: Question: "
                "Answer: Please answer the question according to the above context. Q: A: === yes no")


def _real_words() -> list[str]:
    import re

    from capvqa.bench.run import QUESTIONS
    from capvqa.synthetic.offline_tokenizers import vqa_corpus

    text = " ".join([_PROMPT_TEXT, *QUESTIONS, *vqa_corpus()])
    words = dict.fromkeys(re.findall(r"[A-Za-z]+", text))
    return list(dict.fromkeys([*words, *(w.capitalize() for w in words)]))


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """BPE: merge the adjacent pair of lowest rank until none is in ``merges``."""
    ranks = {pair: i for i, pair in reversed(list(enumerate(merges)))}
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2:]]
    return symbols


def ensure_img2llm_models(llm_size: str, root: Path | None = None) -> dict[str, Path]:
    """``{itm, captioner, qg, llm}`` folders of random-weight real-size models (BLIP ViT-L ITM and
    captioner, T5-large lm-adapt, OPT of ``llm_size``), built once."""
    return _ensure(root, {**_blip_roles(), "qg": ("t5-large-lm-adapt", _build_qg), **_llm_role(llm_size)})


def ensure_pica_models(llm_size: str, root: Path | None = None) -> dict[str, Path]:
    """``{captioner, clip, llm}`` folders of random-weight real-size models (BLIP ViT-L captioner, CLIP
    ViT-B/16, OPT of ``llm_size``), built once."""
    captioner = {"captioner": _blip_roles()["captioner"]}
    return _ensure(root, {**captioner, "clip": ("clip-vit-base-patch16", _build_clip), **_llm_role(llm_size)})


def _blip_roles() -> dict:
    return {"itm": ("blip-itm-large", lambda tmp: _build_blip("itm", "", tmp)),
            "captioner": ("blip-captioning-large", lambda tmp: _build_blip("captioner", "", tmp))}


def _llm_role(size: str) -> dict:
    if size not in OPT_SIZES:
        raise ValueError(f"unknown OPT size {size!r}; valid: {list(OPT_SIZES)}")
    return {"llm": (f"opt-{size}", lambda tmp: _build_opt(size, tmp))}


def _ensure(root: Path | None, roles: dict) -> dict[str, Path]:
    root = Path(root) if root is not None else bench_models_dir()
    wanted = {role: root / name for role, (name, _) in roles.items()}
    for role, (_, build) in roles.items():
        if not (wanted[role] / "bench.json").is_file():
            _build_atomically(wanted[role], build)
    return wanted


def _build_qg(folder: Path) -> None:
    from transformers import T5ForConditionalGeneration

    from capvqa.synthetic.tiny_zoo import save_random_model, tiny_t5_config

    _, tokenizer = bench_tokenizers()
    config = tiny_t5_config(vocab_size=T5_MODEL_VOCAB, v1_1=True, **T5_LARGE_LM_ADAPT)
    save_random_model(T5ForConditionalGeneration, config, folder, SEED)
    tokenizer.save_pretrained(folder)


def _build_opt(size: str, folder: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    from capvqa.synthetic.tiny_zoo import save_random_model

    tokenizer = bench_opt_tokenizer()
    shape = {"word_embed_proj_dim": OPT_SIZES[size]["hidden_size"], **OPT_SIZES[size]}
    config = OPTConfig(vocab_size=OPT_MODEL_VOCAB, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
                       eos_token_id=2, **shape)
    save_random_model(OPTForCausalLM, config, folder, SEED)
    tokenizer.save_pretrained(folder)


def _build_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from capvqa.synthetic.offline_tokenizers import build_real_size_tokenizer
    from capvqa.synthetic.tiny_zoo import save_random_model

    tokenizer = build_real_size_tokenizer("clip")
    text = {**CLIP_B16["text"], "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config=CLIP_B16["vision"], projection_dim=CLIP_B16["projection_dim"])
    save_random_model(CLIPModel, config, folder, SEED)
    size = CLIP_B16["vision"]["image_size"]
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
