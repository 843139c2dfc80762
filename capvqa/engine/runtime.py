"""Device and dtype, chosen once per run: cuda > mps > cpu; bf16/fp16 on GPU, fp32 on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from capvqa.errors import ConfigError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision models run. Not part of any cache key (results are meant to be
    device-independent up to floating-point noise)."""

    device: torch.device
    dtype: torch.dtype
    cache_dir: Path | None = None  # for stages that keep dataset-level arrays (e.g. example-pool embeddings)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(requested: str | None = None) -> torch.device:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} was asked for but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    if requested not in (None, "", "auto"):
        if requested not in _DTYPES:
            raise ConfigError(f"unknown dtype {requested!r}: use one of auto, {', '.join(sorted(_DTYPES))}")
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def check_device_and_dtype(device: str | None, dtype: str | None) -> None:
    """Raise :class:`ConfigError` for a device or dtype that cannot be used here (nothing is allocated)."""
    resolve_dtype(resolve_device(device), dtype)


def make_runtime(
    device: str | None = None, dtype: str | None = None, cache_dir: Path | None = None, *,
    keep_freed_host_memory: bool = False,
) -> Runtime:
    """The run's device and dtype.

    ``keep_freed_host_memory=True`` also tunes this process's allocator for CPU runs
    (:mod:`capvqa.engine.host_memory`: large tensors reuse freed memory instead of fresh pages). It
    changes process-wide state, so library callers opt in; the CLI does by default.
    """
    resolved = resolve_device(device)
    if keep_freed_host_memory and resolved.type == "cpu":
        from capvqa.engine.host_memory import keep_freed_host_memory as tune_allocator

        tune_allocator()
    return Runtime(device=resolved, dtype=resolve_dtype(resolved, dtype), cache_dir=cache_dir)
