"""Cache keys: a hash of canonical JSON, chained through the pipeline like dataset fingerprints.

key(stage, item) = sha256(canonical JSON of {schema, stage name + VERSION, semantic config, model
fingerprints, item fingerprint, keys of the upstream results used}). Changing one stage's parameter
changes its key and, through the chain, the keys of every later stage -- and of no earlier one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CACHE_SCHEMA_VERSION = 1


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, NaN rejected."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def item_fingerprint(image_hash: str, question: str) -> str:
    """The identity of an item as the stages see it: image content and question text.

    Question ids are deliberately left out, so the same image and question reached through another
    dataset copy (official files vs. a Hugging Face mirror) shares cached results.
    """
    return sha256_hex(canonical_json({"image": image_hash, "question": question}))


def stage_fingerprint(
    stage_name: str, stage_version: str, semantic_config: dict[str, Any], models: dict[str, str]
) -> str:
    """Everything about a stage that can change its output, except the item."""
    return sha256_hex(
        canonical_json(
            {
                "schema": CACHE_SCHEMA_VERSION,
                "stage": stage_name,
                "version": stage_version,
                "config": semantic_config,
                "models": models,
            }
        )
    )


def stage_item_key(stage_fp: str, item_fp: str, upstream_keys: dict[str, str]) -> str:
    """The cache key of one stage's result for one item."""
    return sha256_hex(canonical_json({"stage": stage_fp, "item": item_fp, "upstream": upstream_keys}))
