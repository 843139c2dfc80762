"""capvqa: zero-shot visual question answering through captions.

A frozen vision-language model turns an image into text and a frozen language model answers from that
text. PNP-VQA, Img2LLM and PICa are compositions of the stages in :mod:`capvqa.stages`, run by the cached
engine in :mod:`capvqa.engine`::

    from capvqa import Pipeline, open_dataset
    result = Pipeline.from_yaml("pnp-vqa", models="tiny").run(open_dataset("sample", limit=8), out_dir="runs/x")

Importing this package loads no model, imports no torch and configures no logging: the names below are
imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "capvqa.engine.pipeline",
    "RunResult": "capvqa.engine.pipeline",
    "RunSettings": "capvqa.engine.run_settings",
    "open_dataset": "capvqa.data.datasets",
    "register_stage": "capvqa.engine.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'capvqa' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
