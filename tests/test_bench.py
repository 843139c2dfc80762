"""`capvqa bench` on the tiny zoo: the JSON contract and forced generation lengths."""

import json
import os
import subprocess
import sys

import pytest

from capvqa.bench.memory import PeakMemory, current_rss_bytes


@pytest.mark.slow
def test_bench_json_contract(tmp_path, tiny_zoo):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "capvqa", "bench", "pnp-vqa", "--models", "tiny", "--questions", "3", "--batch-size",
         "2", "--num-captions", "5", "--caption-tokens", "7", "--answer-tokens", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert result["settings"]["questions"] == 3 and result["settings"]["caption_new_tokens"] == 7
    assert set(result["stages"]) == {"matching", "captioning", "reader"}
    for stage in result["stages"].values():
        assert stage["seconds_per_question"] > 0 and stage["peak_memory_bytes"] > 0
    # forced lengths: every caption draw is exactly 7 new tokens, every answer exactly 4
    captioning = result["stages"]["captioning"]
    assert captioning["generated_tokens"] % 7 == 0 and captioning["generated_tokens"] >= 3 * 5 * 7
    assert result["stages"]["reader"]["generated_tokens"] == 3 * 4
    assert result["stages"]["reader"]["mean_passage_tokens"] > 5  # question + caption tokens
    assert result["settings"]["host_allocator"]
    assert abs(result["total_seconds_per_question"]
               - sum(s["seconds_per_question"] for s in result["stages"].values())) < 1e-3
    assert result["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in result["stages"].values())
    assert "random weights" in result["note"]


def test_bench_needs_an_explicit_weight_choice():
    done = subprocess.run([sys.executable, "-m", "capvqa", "bench", "pnp-vqa"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--random-weights" in done.stderr


def test_peak_memory_sees_a_temporary_allocation():
    import numpy as np

    with PeakMemory("cpu", interval=0.005) as peak:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        block.sum()
        before_free = current_rss_bytes()
        del block
    assert peak.bytes >= before_free - 8 * 2**20
