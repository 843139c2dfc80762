"""Data-parallel runs: `torchrun --nproc_per_node=2 -m capvqa run ...` on CPU (gloo)."""

import json
import os
import subprocess
import sys


def test_two_processes_equal_one(tmp_path, tiny_zoo):
    common = ["run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "9", "--quiet",
              "--batch-size", "2", "--set", "captioning.num_captions=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAPVQA_COMMIT_LOG": str(tmp_path / "commits.jsonl"),
           "OMP_NUM_THREADS": "1"}
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
    assert (tmp_path / "ddp" / "records.jsonl").read_text() == (tmp_path / "single" / "records.jsonl").read_text()
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
