"""Allocator tuning for CPU runs: applied once, opt-out honoured, reported (checked in fresh processes,
since mallopt changes the whole process)."""

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import torch
from capvqa.engine.host_memory import host_allocator
from capvqa.engine.runtime import make_runtime
before = host_allocator()
make_runtime("cpu")  # a library call: leaves the process's allocator alone
untouched = host_allocator()
make_runtime("cpu", keep_freed_host_memory=True)  # what the CLI and the benchmark ask for
print(before, "|", untouched, "|", host_allocator())
# large tensors still allocate, fill and free correctly from the tuned heap
for _ in range(5):
    y = torch.ones(400, 30524) * 2
    assert float(y.sum()) == 2 * 400 * 30524
"""


def run(env_extra):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env_extra}, check=True)
    return [s.strip() for s in done.stdout.strip().split("|")]


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc malloc only")
def test_cpu_runtime_keeps_freed_memory_and_the_opt_out_leaves_malloc_alone():
    before, untouched, after = run({})
    assert before == untouched == "default allocator"
    assert after.startswith("glibc malloc keeps freed memory")
    assert run({"CAPVQA_KEEP_HOST_MEMORY": "0"}) == ["default allocator"] * 3


def test_timings_record_the_allocator(tmp_path, tiny_zoo):
    import json

    from capvqa.data.datasets import open_dataset
    from capvqa.engine.pipeline import Pipeline

    Pipeline.from_yaml("pnp-vqa", ["captioning.num_captions=2"], models="tiny").run(
        open_dataset("sample", limit=1), cache_dir=tmp_path / "c", out_dir=tmp_path / "run")
    from capvqa.engine.host_memory import host_allocator

    assert json.loads((tmp_path / "run" / "timings.json").read_text())["host_allocator"] == host_allocator()
