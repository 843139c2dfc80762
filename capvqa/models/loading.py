"""Loading frozen Hugging Face models by hub id or local folder, and fingerprinting them for the cache.

Models load through ``from_pretrained`` exactly as users would (hub id with the HF cache, or a local
folder), put in eval mode with gradients off. The fingerprint that enters cache keys is computed without
loading anything: a pinned commit, else the commit the HF cache resolved ``revision`` to, else a digest of
a local folder's files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capvqa.errors import ModelLoadError

log = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelRef:
    """A model to load: hub id or local folder, plus an optional hub revision (branch, tag or commit)."""

    id: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.id).expanduser().is_dir()

    def pretrained_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision} if self.revision and not self.is_local else {}


def model_fingerprint(ref: ModelRef) -> str:
    """A string that changes whenever the weights behind ``ref`` may have changed."""
    if ref.is_local:
        return "local:" + _folder_digest(Path(ref.id).expanduser())
    revision = ref.revision or "main"
    if _COMMIT_RE.match(revision):
        return f"hub:{ref.id}@{revision}"
    commit = _cached_commit(ref.id, revision) or _remote_commit(ref.id, revision)
    if commit is None:
        log.warning("the revision %r of %s could not be resolved to a commit (offline and not in the HF "
                    "cache): its cache keys will change once it is downloaded", revision, ref.id)
    return f"hub:{ref.id}@{commit}" if commit else f"hub:{ref.id}@{revision}(unresolved)"


def _remote_commit(repo_id: str, revision: str) -> str | None:
    """Ask the hub which commit ``revision`` is, so even a first run's cache keys name the commit that
    ``from_pretrained`` will then download (a first run must not write keys a second run cannot find)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import HfApi

        commit = HfApi().model_info(repo_id, revision=revision, timeout=15).sha
    except Exception:  # noqa: BLE001 - any failure means "unknown"; loading will report real problems
        return None
    return commit if commit and _COMMIT_RE.match(commit) else None


def _cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit the local HF cache maps ``revision`` to, read from its refs file (no network)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    refs = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        commit = refs.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT_RE.match(commit) else None


def _folder_digest(folder: Path) -> str:
    """Digest of a local model folder: config/tokenizer files in full, weight files by size + head/tail.

    Hashing whole multi-GB weight files on every run would cost seconds; size plus the first and last
    MiB (safetensors headers hold every tensor's name, shape and offset) changes whenever the weights do
    in practice.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        relative = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with path.open("rb") as handle:
            if size <= 2 * _HEAD_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_HEAD_BYTES))
                handle.seek(-_HEAD_BYTES, os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:32]


def _load_error(ref: ModelRef, what: str, error: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        f"To use it offline, download it once where the hub is reachable (`hf download {ref.id}`, then "
        "copy the HF cache) or point the model at a local folder, e.g. --set models.ROLE=/path/to/model."
    )
    if not ref.is_local and "/" not in ref.id and not Path(ref.id).exists():
        hint = f"{ref.id!r} is neither an existing folder nor a hub id (org/name). " + hint
    mode = " (HF_HUB_OFFLINE=1)" if offline else ""
    return ModelLoadError(f"could not load the {what} {ref.id!r}{mode}: {error}. {hint}")


def load_model(model_class: Any, ref: ModelRef, *, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` in eval mode, frozen, on ``device`` in ``dtype``."""
    try:
        model = model_class.from_pretrained(ref.id, dtype=dtype, **ref.pretrained_kwargs(), **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(ref, "model", error) from error
    model.eval().requires_grad_(False)
    if "device_map" not in kwargs:
        model.to(device)
    log.info("loaded %s from %s on %s (%s)", type(model).__name__, ref.id, device, dtype)
    return model


def load_processor(processor_class: Any, ref: ModelRef, **kwargs: Any) -> Any:
    """A tokenizer or processor from the same place as the model."""
    try:
        return processor_class.from_pretrained(ref.id, **ref.pretrained_kwargs(), **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(ref, "processor/tokenizer", error) from error
