"""Data-parallel runs: `torchrun --nproc_per_node=2 -m capvqa run ...` on CPU (gloo).

What is guaranteed (see capvqa/ops/patch_sampling.py): on one machine, with the same software, batch
layout and thread count, results are bit-identical. Where the batches differ (two ranks batch other items
together than one process does) or the machine does, float results agree within a relative tolerance and
sampled results (captions, predictions) are equal except for rare, documented flips. The test checks
exactly that, not byte equality of records.jsonl: on some CPUs (e.g. AVX2-only AMD EPYC) an item
batched with other items gets relevance values that differ by 1e-7 to 1e-6 (relative).
"""

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from record_matching import assert_records_match


def _record(relevance: list[float], logit: float, captions: list[str], answer: str = "red") -> dict[str, Any]:
    return {"question_id": 1, "answer": answer, "accuracy": 30.0, "stages": {
        "matching": {"relevance": relevance, "grid": [1, 3], "match_logit": logit},
        "captioning": {"captions": captions, "rounds": 1, "draws": 2}}}


def test_records_match_tolerates_float_noise_and_nothing_else():
    want = _record([2.58768e-08, 8.17436e-08, 0.0], -0.17905935645103455, ["a cat", "a dog"])
    # relative noise of 1e-6, a 6th-digit rounding step, a near-zero value leaving 0: all tolerated
    assert_records_match([_record([2.58769e-08, 8.174361e-08, 1e-15], -0.17905932664871216, ["a cat", "a dog"])],
                         [want])
    for bad in (
        _record([2.59e-08, 8.17436e-08, 0.0], -0.17905935645103455, ["a cat", "a dog"]),  # 1e-3 relative
        _record([2.58768e-08, 8.17436e-08, 0.0], -0.1791, ["a cat", "a dog"]),
        _record([2.58768e-08, 8.17436e-08, 0.0], -0.17905935645103455, ["a cat", "a bird"]),
        _record([2.58768e-08, 8.17436e-08, 0.0], -0.17905935645103455, ["a cat", "a dog"], answer="blue"),
        _record([2.58768e-08, 8.17436e-08], -0.17905935645103455, ["a cat", "a dog"]),
        _record([2.58768e-08, 8.17436e-08, 0.0], float("inf"), ["a cat", "a dog"]),
    ):
        with pytest.raises(AssertionError, match="records differ"):
            assert_records_match([bad], [want])


def test_shards_deal_an_images_questions_to_one_rank():
    """Runs of consecutive questions about one image are dealt round-robin, so each image is encoded by
    one rank only; the shards partition the items in dataset order."""
    from capvqa.data.items import ImageRef, VQAItem
    from capvqa.engine.distributed import Shard

    image_ids = [1, 1, 2, 2, 2, 3, 4, 4, 1]  # image 1 comes back later: a run of its own
    items = [VQAItem(question_id=i, image_id=image, question="q?", image=ImageRef(data=b""))
             for i, image in enumerate(image_ids)]
    shards = [Shard(items, rank, 2) for rank in (0, 1)]
    assert [[item.question_id for item in shard] for shard in shards] == [[0, 1, 5, 8], [2, 3, 4, 6, 7]]
    assert [len(shard) for shard in shards] == [4, 5]
    three = [[item.image_id for item in Shard(items, rank, 3)] for rank in (0, 1, 2)]
    assert three == [[1, 1, 4, 4], [2, 2, 2, 1], [3]]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_zoo):
    common = ["run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "9", "--quiet",
              "--batch-size", "2", "--set", "captioning.num_captions=4"]
    # The ranks also run other CPU kernels where the machine has AVX-512 (the variable is ignored where
    # it does not apply), so the float tolerance is exercised here, not only on AVX2-only CI machines.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAPVQA_COMMIT_LOG": str(tmp_path / "commits.jsonl"),
           "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "capvqa",
         *common, "--cache-dir", str(tmp_path / "shared-cache"), "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=600, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "capvqa", *common, "--cache-dir", str(tmp_path / "own-cache"), "--out",
         str(tmp_path / "single")], capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert single.returncode == 0, single.stderr

    ddp = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert ddp == json.loads((tmp_path / "single" / "predictions.json").read_text())

    def records(run: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / run / "records.jsonl").read_text().splitlines()]

    assert len(records("single")) == 9
    assert_records_match(records("ddp"), records("single"))  # captions equal, floats within tolerance
    timings = json.loads((tmp_path / "ddp" / "timings.json").read_text())
    assert timings["world_size"] == 2
    assert all(stage["computed"] == 9 for stage in timings["stages"].values())

    # both ranks worked, on disjoint items, and every item was computed exactly once per stage
    by_stage: dict[str, dict[int, list[str]]] = {}
    for line in (tmp_path / "commits.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_stage.setdefault(entry["stage"], {}).setdefault(entry["pid"], []).extend(entry["keys"])
    for stage, per_pid in by_stage.items():
        assert len(per_pid) == 2, stage
        keys = [k for ks in per_pid.values() for k in ks]
        assert len(keys) == len(set(keys)) == 9, stage
