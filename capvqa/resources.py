"""Where the bundled sample data and pipeline configs live, in a source checkout or an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PACKAGE_DIR.parent


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "capvqa's bundled files were not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "). Reinstall capvqa or run from a source checkout."
    )


def sample_dir() -> Path:
    """The bundled VQAv2-format sample (``data/sample`` in a checkout)."""
    return _first_existing(_REPO_DIR / "data" / "sample", _PACKAGE_DIR / "_bundled" / "sample")


def pipelines_dir() -> Path:
    """The declarative pipeline configs (``pipelines/`` in a checkout)."""
    return _first_existing(_REPO_DIR / "pipelines", _PACKAGE_DIR / "_bundled" / "pipelines")


def capvqa_home() -> Path:
    """Where capvqa keeps its own files (cache, tiny zoo, converted checkpoints): ``$CAPVQA_HOME``,
    default ``~/.cache/capvqa``."""
    return Path(os.environ.get("CAPVQA_HOME") or Path.home() / ".cache" / "capvqa").expanduser()
