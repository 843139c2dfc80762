"""Deterministic reference weights: every parameter is a pure function of (name, shape).

The parity fixtures (tests/parity/fixtures/) come from the reference code (LAVIS 1.0.2, the authors'
scripts) run in an environment of its own. Committing the weights those runs used would cost hundreds
of MB; instead both sides fill every parameter with :func:`parameter_values` under the reference's own
parameter name, so the test side rebuilds the identical state dict from the fixture's manifest of
(name, shape) and maps it through capvqa's converters -- which are then tested on real reference state
dicts too.

This module is imported by the generator scripts (tests/parity/reference/, run in the reference venv)
and by the tests, so it depends on numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np

WEIGHTS_VERSION = "1"


def name_seed(name: str) -> int:
    """A 64-bit seed from the parameter's name (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(f"capvqa-parity-v{WEIGHTS_VERSION}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _is_norm_scale(name: str, shape: Sequence[int]) -> bool:
    lowered = name.lower()
    return len(shape) == 1 and name.endswith("weight") and ("norm" in lowered or "ln" in lowered.split("."))


def parameter_values(name: str, shape: Sequence[int]) -> np.ndarray:
    """float32 values for parameter ``name`` of ``shape``.

    Norm scales are ``1 + 0.1 z`` (so LayerNorm/RMSNorm keep their role), other vectors (biases, class
    tokens) ``0.02 z``, matrices ``z / sqrt(fan_in)`` capped at 0.05 so deep stacks stay well scaled;
    z ~ N(0, 1) from numpy's PCG64 seeded by :func:`name_seed`.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.Generator(np.random.PCG64(name_seed(name)))
    z = rng.standard_normal(size=shape, dtype=np.float64)
    if _is_norm_scale(name, shape):
        values = 1.0 + 0.1 * z
    elif len(shape) <= 1:
        values = 0.02 * z
    else:
        fan_in = math.prod(shape[1:])
        values = z * min(0.05, 1.0 / math.sqrt(max(fan_in, 1)))
    return values.astype(np.float32)


def state_dict_values(manifest: Iterable[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """``{name: parameter_values(name, shape)}`` for a manifest of (name, shape) pairs."""
    return {name: parameter_values(name, shape) for name, shape in manifest}


def relative_max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the parity tolerance's measure (<= 1e-4 in fp32)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {actual.shape} vs {expected.shape}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    return diff / scale if scale > 0 else diff
