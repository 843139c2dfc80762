"""The Img2LLM question-generation weights (``T5_large_QG.pth``) as a Hugging Face model folder.

The authors fine-tuned ``google/t5-large-lm-adapt`` for question generation and published only a
PyTorch checkpoint (``{"model": state_dict}``, saved from ``T5ForConditionalGeneration`` with
transformers 4.x), which LAVIS loads with a strict ``load_state_dict`` on top of the hub model. We
convert it once into an ordinary folder (the base model's config, ``model.safetensors``, the base
tokenizer) under ``$CAPVQA_HOME/models/``, so the stage then loads it through the same
``from_pretrained`` path as every other model.

Why a conversion and not ``load_state_dict``: transformers v5 always declares T5's ``lm_head`` tied to
the shared embedding (``T5Config`` forces ``tie_word_embeddings=True``; v1.1 models such as
t5-lm-adapt are told apart only by ``scale_decoder_outputs=False``). In a freshly built v5 model
``lm_head.weight`` *is* ``shared.weight``, so ``load_state_dict`` would write both checkpoint tensors
into one parameter and the last one would win. ``from_pretrained`` instead unties the two when a
checkpoint holds both with different values, which is what t5-lm-adapt needs (its head is untied).
The folder therefore stores ``lm_head.weight`` only when it differs from ``shared.weight``.

The checkpoint is read with ``torch.load(weights_only=True)``: tensors only, no pickled code. A URL is
downloaded once (resumable, with a progress bar) into ``$CAPVQA_HOME/checkpoints/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from capvqa.atomic import building_directory
from capvqa.errors import ModelLoadError
from capvqa.models.checkpoints import capvqa_home
from capvqa.models.checkpoints import resolve_checkpoint as resolve_shared_checkpoint
from capvqa.models.loading import ModelRef, model_fingerprint

log = logging.getLogger(__name__)

T5_LARGE_QG_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/projects/img2prompt/T5_large_QG.pth"
)
CONVERTER_VERSION = 1
STATE_DICT_KEY = "model"
_MARKER = "capvqa-conversion.json"
_TIED_TO_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_UNTIED_WARNING = "but both are present in the checkpoints with different values"


def resolve_checkpoint(source: str) -> Path:
    """A local path to the QG checkpoint ``source`` (a file path, or a URL downloaded on first use)."""
    return resolve_shared_checkpoint(source, "question-generation checkpoint")


def load_checkpoint_state_dict(path: Path, key: str = STATE_DICT_KEY) -> dict[str, torch.Tensor]:
    """The state dict stored under ``key`` (tensors only: ``weights_only=True``).

    A ``module.`` prefix (checkpoints saved from DistributedDataParallel) is removed.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have no common base class
        raise ModelLoadError(f"could not read the checkpoint {path} as tensors only: {error}") from error
    state = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ModelLoadError(f"{path} holds no state dict under {key!r} (found: {found})")
    if state and all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    return state


def _base_config(base: ModelRef) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base.id, **base.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the config of {base.id!r}, the architecture the question-generation checkpoint "
            f"is converted into: {error}"
        ) from error


def conversion_tensors(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The tensors to save for ``state`` in the architecture of ``config``, after checking they fit.

    Raises :class:`ModelLoadError` on missing, unexpected or mis-shaped weights (a checkpoint for
    another model). Embedding copies that v5 always ties to ``shared`` are dropped after checking they
    equal it; ``lm_head.weight`` is kept only when it differs from ``shared.weight``.
    """
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        skeleton = AutoModelForSeq2SeqLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    ignorable = set(getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or ())
    optional = {*_TIED_TO_SHARED, "lm_head.weight"}

    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected) - ignorable)
    wrong_shape = sorted(
        f"{name} {tuple(state[name].shape)} != {expected[name]}"
        for name in set(state) & set(expected)
        if tuple(state[name].shape) != expected[name]
    )
    if missing or unexpected or wrong_shape:
        raise ModelLoadError(
            f"the checkpoint does not fit {type(skeleton).__name__} "
            f"({config.name_or_path or 'base config'}): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong_shape[:5]}"
        )
    shared = state["shared.weight"]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in expected or name in _TIED_TO_SHARED:
            continue
        if name == "lm_head.weight" and torch.equal(tensor, shared):
            continue  # a tied head: from_pretrained ties it back to shared
        tensors[name] = tensor.detach().clone().contiguous()  # safetensors refuses shared storage
    for name in _TIED_TO_SHARED:
        if name in state and not torch.equal(state[name], shared):
            raise ModelLoadError(
                f"the checkpoint's {name} differs from shared.weight; transformers' T5 cannot represent that"
            )
    return tensors


def convert_qg_checkpoint(
    checkpoint: Path, base: ModelRef, out_dir: Path, *, key: str = STATE_DICT_KEY
) -> Path:
    """Write ``checkpoint`` as a model folder in the architecture (config) and tokenizer of ``base``.

    Written into a temporary folder beside ``out_dir`` and renamed into place, so a half-written
    folder is never used; a finished conversion already at ``out_dir`` (another process won the race)
    is kept. Returns ``out_dir``.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from capvqa.models.loading import load_processor

    config = _base_config(base)
    tensors = conversion_tensors(load_checkpoint_state_dict(checkpoint, key), config)
    out_dir = Path(out_dir)
    with building_directory(out_dir, _MARKER) as staging:
        config.save_pretrained(staging)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        load_processor(AutoTokenizer, base).save_pretrained(staging)
        marker = {
            "converter_version": CONVERTER_VERSION,
            "checkpoint": str(checkpoint),
            "base": base.id,
            "base_revision": base.revision,
            "untied_lm_head": "lm_head.weight" in tensors,
        }
        (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    log.info("converted %s into %s (%s)", checkpoint, out_dir, base.id)
    return out_dir


def converted_dir(checkpoint: Path, base: ModelRef) -> Path:
    """The cache folder for ``checkpoint`` converted into ``base``: a new one whenever the file (path,
    size, modification time), the base model or the converter changes."""
    stat = checkpoint.stat()
    identity = json.dumps([CONVERTER_VERSION, str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns,
                           model_fingerprint(base)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return capvqa_home() / "models" / "converted" / f"{checkpoint.stem}-{digest}"


def ensure_qg_model(checkpoint: str, base: ModelRef) -> Path:
    """A local model folder with the QG weights of ``checkpoint`` (path or URL), converting once."""
    path = resolve_checkpoint(checkpoint)
    folder = converted_dir(path, base)
    if (folder / _MARKER).is_file():
        return folder
    return convert_qg_checkpoint(path, base, folder)


class _DropUntiedHeadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _UNTIED_WARNING not in record.getMessage()


@contextlib.contextmanager
def untied_head_warning_silenced() -> Iterator[None]:
    """Hide transformers' warning that ``lm_head`` and ``shared`` differ and stay untied while loading:
    for T5 v1.1 checkpoints that is the intended outcome, not a problem."""
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropUntiedHeadWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
