"""Fine-tuned checkpoints given as a file path or a URL (downloaded once, then used offline).

Both checkpoint converters (the authors' QG T5 and the original BLIP models) take such a source; the
file is cached under ``$CAPVQA_HOME/checkpoints/<url digest>/`` and honours the download mirror
(``CAPVQA_DOWNLOAD_MIRROR``), like dataset downloads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from capvqa.errors import ModelLoadError
from capvqa.resources import capvqa_home

log = logging.getLogger(__name__)


def is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


def checkpoint_download_path(url: str) -> Path:
    """Where a downloaded checkpoint lives: one folder per URL, the file keeps its name."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = PurePosixPath(urlsplit(url).path).name or "checkpoint.pth"
    return capvqa_home() / "checkpoints" / digest / name


def resolve_checkpoint(source: str | Path, what: str = "checkpoint") -> Path:
    """A local path to ``source`` (a file, or a URL downloaded on first use); ``what`` names it in errors."""
    source = str(source)
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{what} {source!r} is not a file")
        return path
    target = checkpoint_download_path(source)
    if target.is_file():
        return target
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(
            f"the {what} {source} is not downloaded yet and HF_HUB_OFFLINE=1. Download it once where the "
            f"network is reachable (it is cached as {target}), or give a local .pth file."
        )
    from capvqa.data.download import RetryPolicy, _fetch, _make_progress, resolve_mirror, resolve_url

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    url = resolve_url(source, resolve_mirror(None))
    log.info("downloading %s -> %s", url, target)
    with _make_progress(None) as progress:
        _fetch(url, part, None, RetryPolicy(), progress, target.name)
    part.replace(target)
    return target
