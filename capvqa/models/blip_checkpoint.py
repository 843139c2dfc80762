"""Original BLIP ``.pth`` checkpoints (Salesforce BLIP / LAVIS) as Hugging Face model folders.

PNP-VQA's published numbers come from the original BLIP checkpoints
(docs/methods.md#deviations-in-pnp-vqa), e.g.
``model_large_retrieval_coco.pth`` for image-question matching and ``model_large_caption.pth`` for
captioning, which are not the hub models. We convert such a checkpoint once into an ordinary folder
(config, ``model.safetensors``, the base model's processor) under ``$CAPVQA_HOME/models/converted/``, so
the stages load it through the same ``from_pretrained`` path as any hub model.

Key mapping (original -> Hugging Face), from transformers'
``src/transformers/models/blip/convert_blip_original_pytorch_to_hf.py`` (``rename_key``), checked against
salesforce/BLIP ``models/vit.py``, ``models/med.py``, ``models/blip.py``, ``models/blip_itm.py`` and LAVIS
``lavis/models/blip_models/blip_image_text_matching.py`` / ``blip_caption.py``:

- ``visual_encoder.cls_token`` -> ``vision_model.embeddings.class_embedding``
- ``visual_encoder.pos_embed`` -> ``vision_model.embeddings.position_embedding``
- ``visual_encoder.patch_embed.proj.*`` -> ``vision_model.embeddings.patch_embedding.*``
- ``visual_encoder.blocks.N.norm1.*`` -> ``vision_model.encoder.layers.N.layer_norm1.*``
- ``visual_encoder.blocks.N.attn.qkv.*`` -> ``vision_model.encoder.layers.N.self_attn.qkv.*`` (both fused,
  rows q;k;v, split per head the same way: no reshaping)
- ``visual_encoder.blocks.N.attn.proj.*`` -> ``vision_model.encoder.layers.N.self_attn.projection.*``
- ``visual_encoder.blocks.N.norm2.*`` -> ``vision_model.encoder.layers.N.layer_norm2.*``
- ``visual_encoder.blocks.N.mlp.fc{1,2}.*`` -> ``vision_model.encoder.layers.N.mlp.fc{1,2}.*``
- ``visual_encoder.norm.*`` -> ``vision_model.post_layernorm.*``
- unchanged: ``text_encoder.*``, ``vision_proj.*``, ``text_proj.*``, ``itm_head.*`` (ITM);
  ``text_decoder.bert.*``, ``text_decoder.cls.*`` (captioner) -- BLIP's ``med.py`` and transformers'
  ``modeling_blip_text.py`` use the same BERT module names.

Dropped (and listed in the folder's ``capvqa-conversion.json``): momentum copies (``*_m.*``: the
retrieval/pretrain checkpoints carry ``visual_encoder_m``, ``text_encoder_m``, ``vision_proj_m``,
``text_proj_m``), the contrastive queues (``image_queue``, ``text_queue``, ``idx_queue``, ``ptr_queue``),
the temperature ``temp``, the ``*.embeddings.position_ids`` buffers (persistent in BLIP's ``med.py``, not
in transformers), and the other head's weights when a checkpoint holds both (BLIP pretraining
checkpoints): ``text_decoder.*`` for ITM; ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``itm_head``
for the captioner. The captioner's ``cls.predictions.decoder.{weight,bias}`` are tied to the word
embeddings and ``cls.predictions.bias`` in both codebases: they are checked equal and stored once.
Anything else that does not map onto the Hugging Face model, anything missing, and any shape
mismatch is an error naming the keys.

Config: the base model's config (hub id or folder), with the facts of the original architecture that
the hub configs got wrong or that shapes cannot reveal: text encoder 12 attention heads (HF
default 8; transformers#22625), vision LayerNorm epsilon 1e-6 (HF default 1e-5; LAVIS#106), and the
vocabulary size read from the checkpoint (30524 in BLIP: ``[DEC]`` = 30522, ``[ENC]`` = 30523).

The checkpoint is read with ``torch.load(weights_only=True)``: tensors only, no pickled code. A URL is
downloaded once (resumable, with a progress bar) into ``$CAPVQA_HOME/checkpoints/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from capvqa.atomic import building_directory
from capvqa.errors import ModelLoadError
from capvqa.models.checkpoints import capvqa_home, resolve_checkpoint
from capvqa.models.loading import ModelRef, load_processor, model_fingerprint

log = logging.getLogger(__name__)

BlipKind = Literal["itm", "captioner"]
KINDS: tuple[str, ...] = ("itm", "captioner")
CONVERTER_VERSION = 1
MARKER = "capvqa-conversion.json"

# The original checkpoints PNP-VQA's LAVIS configs load (lavis/configs/models/pnp-vqa/pnp_vqa_*.yaml).
BLIP_ITM_LARGE_COCO_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_retrieval_coco.pth"
)
BLIP_CAPTION_LARGE_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_caption.pth"
)

# Facts of the original architecture (BLIP med_config.json / vit.py); docs/methods.md#deviations-in-pnp-vqa.
ORIGINAL_TEXT_ATTENTION_HEADS = 12
ORIGINAL_VISION_LAYER_NORM_EPS = 1e-6
ORIGINAL_VOCAB_SIZE = 30524
DEC_TOKEN_ID = 30522
ENC_TOKEN_ID = 30523

_WORD_EMBEDDINGS = {
    "itm": "text_encoder.embeddings.word_embeddings.weight",
    "captioner": "text_decoder.bert.embeddings.word_embeddings.weight",
}
_QUEUES = frozenset({"image_queue", "text_queue", "idx_queue", "ptr_queue"})
_OTHER_HEAD_PREFIXES = {
    "itm": ("text_decoder.",),
    "captioner": ("text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
}
# (pattern on the part after "visual_encoder.", replacement after "vision_model.")
_VISION_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^cls_token$", "embeddings.class_embedding"),
        (r"^pos_embed$", "embeddings.position_embedding"),
        (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
        (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layers.\1.layer_norm1.\2"),
        (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layers.\1.layer_norm2.\2"),
        (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.\1.self_attn.qkv.\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.projection.\2"),
        (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"encoder.layers.\1.mlp.\2.\3"),
        (r"^norm\.(weight|bias)$", r"post_layernorm.\1"),
    )
)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ModelLoadError(f"unknown BLIP checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")


def drop_reason(key: str, kind: str) -> str | None:
    """Why the original key ``key`` is deliberately not converted for ``kind``, or None if it is kept."""
    head = key.split(".", 1)[0]
    if head.endswith("_m"):
        return "momentum copy"
    if key in _QUEUES:
        return "queue"
    if key == "temp":
        return "temperature"
    if key.endswith("embeddings.position_ids"):
        return "position_ids buffer"
    if key.startswith(_OTHER_HEAD_PREFIXES[kind]):
        return "other head"
    return None


def hf_key(key: str, kind: str) -> str | None:
    """The Hugging Face name of the original key ``key`` (None: a documented drop, see :func:`drop_reason`).

    Keys outside the known layout come back unchanged, so the shape/key check reports them as
    unexpected.
    """
    _check_kind(kind)
    if drop_reason(key, kind) is not None:
        return None
    if key.startswith("visual_encoder."):
        rest = key.removeprefix("visual_encoder.")
        for pattern, replacement in _VISION_RULES:
            if pattern.match(rest):
                return "vision_model." + pattern.sub(replacement, rest)
    return key


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint


def resolve_blip_checkpoint(source: str | Path) -> Path:
    """A local path to the BLIP checkpoint ``source`` (a file path, or a URL downloaded on first use)."""
    return resolve_checkpoint(source, "BLIP checkpoint")


def load_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an original BLIP checkpoint: under ``"model"`` (as BLIP/LAVIS save it) or the
    file's top-level dict itself. Tensors only (``weights_only=True``); a ``module.`` prefix (saved from
    DistributedDataParallel) is removed."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have no common base class
        raise ModelLoadError(f"could not read the BLIP checkpoint {path} as tensors only: {error}") from error
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint.get("model") if isinstance(checkpoint.get("model"), dict) else checkpoint
    if not state or not all(isinstance(name, str) and torch.is_tensor(t) for name, t in state.items()):
        raise ModelLoadError(
            f"{path} holds no BLIP state dict (neither under 'model' nor at the top level; found "
            f"keys "
            f"{sorted(map(str, checkpoint))[:10]})"
        )
    if all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    return state


# --------------------------------------------------------------------------------------------------
# Config and tensors


def model_class(kind: str) -> Any:
    _check_kind(kind)
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    return BlipForImageTextRetrieval if kind == "itm" else BlipForConditionalGeneration


def _as_ref(base: str | Path | ModelRef) -> ModelRef:
    return base if isinstance(base, ModelRef) else ModelRef(str(base))


def base_config(base: str | Path | ModelRef) -> Any:
    from transformers import AutoConfig

    ref = _as_ref(base)
    try:
        config = AutoConfig.from_pretrained(ref.id, **ref.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the config of {ref.id!r}, the BLIP model the checkpoint is converted into: "
            f"{error}"
        ) from error
    if getattr(config, "model_type", None) != "blip":
        raise ModelLoadError(f"{ref.id!r} is a {config.model_type!r} model, not BLIP")
    return config


def converted_config(
    config: Any,
    state: dict[str, torch.Tensor],
    kind: str,
    *,
    text_attention_heads: int | None = ORIGINAL_TEXT_ATTENTION_HEADS,
    vision_layer_norm_eps: float | None = ORIGINAL_VISION_LAYER_NORM_EPS,
) -> Any:
    """A copy of the BLIP ``config`` fitted to the original checkpoint ``state`` (None keeps the base value).

    Sets the text encoder's attention heads and the ViT LayerNorm epsilon (shapes cannot reveal either)
    and the vocabulary size from the checkpoint's word embeddings.
    """
    _check_kind(kind)
    config = copy.deepcopy(config)
    text, vision = config.text_config, config.vision_config
    if text_attention_heads is not None:
        if text_attention_heads <= 0 or text.hidden_size % text_attention_heads:
            raise ModelLoadError(
                f"text_attention_heads={text_attention_heads} does not divide the text hidden size "
                f"{text.hidden_size} of the base model"
            )
        text.num_attention_heads = text_attention_heads
    if vision_layer_norm_eps is not None:
        vision.layer_norm_eps = vision_layer_norm_eps
    embeddings = state.get(_WORD_EMBEDDINGS[kind])
    if embeddings is not None and embeddings.dim() == 2:
        text.vocab_size = int(embeddings.shape[0])
    config.architectures = [model_class(kind).__name__]
    return config


@dataclass
class Conversion:
    """The converted tensors plus what was dropped on the way (for the marker file and logs)."""

    tensors: dict[str, torch.Tensor]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> original keys
    tied: list[str] = field(default_factory=list)  # HF keys stored once through a tie


def conversion_tensors(state: dict[str, torch.Tensor], kind: str, config: Any) -> Conversion:
    """The Hugging Face tensors for the original ``state`` in the architecture of ``config``.

    Every tensor's shape is checked against the model built on the meta device; missing, unexpected or
    mis-shaped weights raise :class:`ModelLoadError` naming them (a checkpoint of another kind or size).
    """
    _check_kind(kind)
    with torch.device("meta"):
        skeleton = model_class(kind)(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})  # target -> source

    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    dropped: dict[str, list[str]] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        reason = drop_reason(key, kind)
        if reason is not None:
            dropped.setdefault(reason, []).append(key)
            continue
        name = hf_key(key, kind)
        assert name is not None
        if name not in expected:
            unexpected.append(key if name == key else f"{key} (-> {name})")
            continue
        if name in mapped:
            raise ModelLoadError(f"the checkpoint keys {sources[name]!r} and {key!r} both map to {name!r}")
        mapped[name], sources[name] = tensor, key

    missing = sorted(set(expected) - set(mapped) - set(tied))
    wrong_shape = sorted(
        f"{sources[name]} {tuple(t.shape)} != {name} {expected[name]}"
        for name, t in mapped.items()
        if tuple(t.shape) != expected[name]
    )
    if missing or unexpected or wrong_shape:
        text, vision = config.text_config, config.vision_config
        raise ModelLoadError(
            f"the checkpoint does not fit {type(skeleton).__name__} (base {config.name_or_path or 'config'}: "
            f"ViT {vision.hidden_size}x{vision.num_hidden_layers} at {vision.image_size}px, text "
            f"{text.hidden_size}x{text.num_hidden_layers}): "
            f"missing {_listing(missing)}; unexpected {_listing(sorted(unexpected))}; "
            f"wrong shapes {_listing(wrong_shape)}.{_other_head_note(dropped.get('other head', []), kind)} "
            f"Is it a BLIP {kind!r} checkpoint of this size?"
        )

    stored_once: list[str] = []
    for target, source in tied.items():
        if target not in mapped:
            continue
        if source in mapped and not torch.equal(mapped[target], mapped[source]):
            raise ModelLoadError(
                f"the checkpoint's {sources[target]} differs from {sources[source]}, which "
                f"{type(skeleton).__name__} ties it to; such a checkpoint cannot be represented"
            )
        del mapped[target]
        stored_once.append(target)

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in mapped.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storage:  # safetensors refuses tensors sharing storage
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return Conversion(tensors=tensors, dropped=dropped, tied=sorted(stored_once))


def _other_head_note(keys: list[str], kind: str) -> str:
    if not keys:
        return ""
    prefixes = sorted({key.split(".", 1)[0] for key in keys})
    names = ", ".join(prefix + ".*" for prefix in prefixes)
    return f" The checkpoint's {names} ({len(keys)} tensors) belong to another head than {kind!r}: left out."


def _listing(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def _check_tokenizer(tokenizer: Any, vocab_size: int, base: ModelRef) -> dict[str, int | None]:
    """The tokenizer must not produce ids without an embedding row; returns its [DEC]/[ENC] ids."""
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"the tokenizer of {base.id!r} has {len(tokenizer)} tokens but the checkpoint's vocabulary only "
            f"{vocab_size}; use a BLIP base model (BERT WordPiece plus [DEC]/[ENC])"
        )
    ids: dict[str, int | None] = {}
    for token in ("[DEC]", "[ENC]"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        ids[token] = None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)
    return ids


# --------------------------------------------------------------------------------------------------
# Writing the folder


def convert_blip_checkpoint(
    checkpoint: Path,
    kind: BlipKind,
    base: str | Path | ModelRef,
    out_dir: Path,
    *,
    text_attention_heads: int | None = ORIGINAL_TEXT_ATTENTION_HEADS,
    vision_layer_norm_eps: float | None = ORIGINAL_VISION_LAYER_NORM_EPS,
) -> Path:
    """Write the original BLIP ``checkpoint`` as a ``kind`` model folder with the config and processor of
    ``base`` (a BLIP hub id or folder of the same size), adjusted as :func:`converted_config` says.

    Written into a temporary folder beside ``out_dir`` and renamed into place, so a half-written folder
    is never used; a finished conversion already at ``out_dir`` (another process won the race) is kept.
    Returns ``out_dir``.
    """
    from safetensors.torch import save_file
    from transformers import BlipProcessor

    _check_kind(kind)
    checkpoint, out_dir, ref = Path(checkpoint), Path(out_dir), _as_ref(base)
    state = load_original_state_dict(checkpoint)
    config = converted_config(
        base_config(ref), state, kind,
        text_attention_heads=text_attention_heads, vision_layer_norm_eps=vision_layer_norm_eps,
    )
    conversion = conversion_tensors(state, kind, config)
    del state
    processor = load_processor(BlipProcessor, ref)
    special_ids = _check_tokenizer(processor.tokenizer, config.text_config.vocab_size, ref)
    generation_config = _base_generation_config(ref) if kind == "captioner" else None

    with building_directory(out_dir, MARKER) as staging:
        config.save_pretrained(staging)
        save_file(conversion.tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        processor.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        marker = {
            "converter_version": CONVERTER_VERSION,
            "kind": kind,
            "checkpoint": str(checkpoint),
            "base": ref.id,
            "base_revision": ref.revision,
            "text_num_attention_heads": config.text_config.num_attention_heads,
            "vision_layer_norm_eps": config.vision_config.layer_norm_eps,
            "vocab_size": config.text_config.vocab_size,
            "tokenizer_special_ids": special_ids,
            "tensors": len(conversion.tensors),
            "tied": conversion.tied,
            "dropped": {reason: sorted(keys) for reason, keys in sorted(conversion.dropped.items())},
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    counts = Counter({reason: len(keys) for reason, keys in conversion.dropped.items()})
    log.info("converted %s into %s (%s, base %s); dropped %s", checkpoint, out_dir, kind, ref.id,
             dict(counts) or "nothing")
    return out_dir


def _base_generation_config(ref: ModelRef) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(ref.id, **ref.pretrained_kwargs())
    except (OSError, ValueError):
        return None  # the base has none: from_pretrained derives one from the model config


def converted_dir(
    checkpoint: Path,
    kind: str,
    base: str | Path | ModelRef,
    *,
    text_attention_heads: int | None = ORIGINAL_TEXT_ATTENTION_HEADS,
    vision_layer_norm_eps: float | None = ORIGINAL_VISION_LAYER_NORM_EPS,
) -> Path:
    """The cache folder for ``checkpoint`` converted as ``kind`` into ``base``: a new one whenever the
    file (path, size, modification time), the base model, the config overrides or the converter change."""
    stat = checkpoint.stat()
    identity = json.dumps([
        CONVERTER_VERSION, kind, str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns,
        model_fingerprint(_as_ref(base)), text_attention_heads, vision_layer_norm_eps,
    ])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return capvqa_home() / "models" / "converted" / f"{checkpoint.stem}-{kind}-{digest}"


def ensure_blip_model(
    checkpoint: str | Path,
    kind: BlipKind,
    base: str | Path | ModelRef,
    *,
    text_attention_heads: int | None = ORIGINAL_TEXT_ATTENTION_HEADS,
    vision_layer_norm_eps: float | None = ORIGINAL_VISION_LAYER_NORM_EPS,
) -> Path:
    """A local ``kind`` model folder with the weights of the original BLIP ``checkpoint`` (path or URL),
    converting once into ``$CAPVQA_HOME/models/converted/``."""
    _check_kind(kind)
    path = resolve_blip_checkpoint(checkpoint)
    overrides = {"text_attention_heads": text_attention_heads, "vision_layer_norm_eps": vision_layer_norm_eps}
    folder = converted_dir(path, kind, base, **overrides)
    if (folder / MARKER).is_file():
        return folder
    return convert_blip_checkpoint(path, kind, base, folder, **overrides)
