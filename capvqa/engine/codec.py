"""Safe (pickle-free) encoding of stage output records for the cache.

A record is a dataclass whose fields are JSON values or numpy arrays. Arrays are stored as raw bytes
with their dtype and shape in the JSON header, so decoding never executes code and large relevance maps
do not bloat into JSON number lists.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

import numpy as np

R = TypeVar("R")

_ARRAYS_KEY = "__arrays__"


def encode_record(record: Any) -> tuple[bytes, bytes]:
    """Split a dataclass record into (JSON header, concatenated raw array bytes)."""
    if not dataclasses.is_dataclass(record):
        raise TypeError(f"stage outputs must be dataclasses, got {type(record).__name__}")
    fields: dict[str, Any] = {}
    arrays: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, np.ndarray):
            contiguous = np.ascontiguousarray(value)
            raw = contiguous.tobytes()
            arrays[field.name] = {
                "dtype": contiguous.dtype.str,
                "shape": list(contiguous.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
            chunks.append(raw)
            offset += len(raw)
        else:
            fields[field.name] = value
    if arrays:
        fields[_ARRAYS_KEY] = arrays
    header = json.dumps(fields, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return header, b"".join(chunks)


def decode_record(record_type: type[R], header: bytes, blob: bytes | None) -> R:
    """Rebuild a record of ``record_type`` from :func:`encode_record`'s output."""
    fields = json.loads(header)
    arrays = fields.pop(_ARRAYS_KEY, {})
    for name, meta in arrays.items():
        start = meta["offset"]
        raw = (blob or b"")[start : start + meta["nbytes"]]
        fields[name] = np.frombuffer(raw, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"]).copy()
    known = {f.name for f in dataclasses.fields(record_type)}  # type: ignore[arg-type]
    return record_type(**{k: v for k, v in fields.items() if k in known})


def encoding_problem(header: bytes, blob: bytes | None) -> str | None:
    """Why ``(header, blob)`` is not something :func:`encode_record` could have written, or ``None``.

    A structural check only (the header is a JSON object, every array's dtype, shape and byte range fit
    the blob): the cache applies it to entries stored before entries carried checksums, which cannot
    be verified byte for byte.
    """
    if not isinstance(header, bytes) or not (blob is None or isinstance(blob, bytes)):
        return "stored values are not bytes"
    try:
        fields = json.loads(header)
    except (UnicodeDecodeError, ValueError):
        return "header is not valid JSON"
    if not isinstance(fields, dict):
        return "header is not a JSON object"
    arrays = fields.get(_ARRAYS_KEY, {})
    if not isinstance(arrays, dict):
        return "array table is malformed"
    size = len(blob or b"")
    for name, meta in arrays.items():
        try:
            dtype = np.dtype(meta["dtype"])
            count = int(np.prod(meta["shape"], dtype=np.int64))
            start, nbytes = int(meta["offset"]), int(meta["nbytes"])
        except (KeyError, TypeError, ValueError):
            return f"array {name!r} has a malformed description"
        if dtype.hasobject or start < 0 or nbytes != count * dtype.itemsize or start + nbytes > size:
            return f"array {name!r} does not fit the stored bytes"
    return None


def record_to_json(record: Any, significant_digits: int = 6) -> dict[str, Any]:
    """A JSON-ready dict of a record for records.jsonl: arrays become lists, floats keep
    ``significant_digits`` significant digits (relevance values can be tiny; decimals would zero them)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, np.ndarray):
            if np.issubdtype(value.dtype, np.floating):
                value = [float(f"{x:.{significant_digits}g}") for x in value.astype(np.float64).ravel()]
            else:
                value = value.ravel().tolist()
        out[field.name] = value
    return out
