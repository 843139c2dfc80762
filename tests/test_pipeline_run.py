"""PNP-VQA end to end on the bundled sample with the tiny models: run folder, cache, resume, concurrency."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capvqa.data.datasets import open_dataset
from capvqa.engine.pipeline import Pipeline

FAST = ["captioning.num_captions=4", "captioning.num_patches=6"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "capvqa", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_exact_issue_command_writes_the_run_folder(tmp_path, tiny_zoo):
    out = tmp_path / "run"
    done = run_cli("run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "8", "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "meaningless" in done.stderr
    for name in ("config.yaml", "predictions.json", "records.jsonl", "metrics.json", "timings.json"):
        assert (out / name).is_file(), name
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 8 and all(set(p) == {"question_id", "answer"} for p in predictions)
    assert all(isinstance(p["question_id"], int) and isinstance(p["answer"], str) for p in predictions)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == [p["question_id"] for p in predictions]
    first = records[0]
    grid = first["stages"]["matching"]["grid"]
    assert len(first["stages"]["matching"]["relevance"]) == grid[0] * grid[1]
    assert len(first["stages"]["captioning"]["captions"]) == 100  # the default (docs/methods.md#question-guided-captioning)
    assert len(first["stages"]["reader"]["passages"]) == 100
    assert first["stages"]["reader"]["passages"][0].startswith(first["question"].lower())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"overall", "per_answer_type", "per_question_type", "per_question", "num_questions",
                            "missing"}
    assert metrics["num_questions"] == 8 and metrics["missing"] == []
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["stages"]) == {"matching", "captioning", "reader"}
    assert all(s["computed"] == 8 for s in timings["stages"].values())
    config = (out / "config.yaml").read_text()
    assert "models_preset: tiny" in config and "num_captions: 100" in config

    # the saved config reruns the same job; everything comes from the cache
    again = run_cli("run", str(out / "config.yaml"), "--out", str(tmp_path / "rerun"),
                    "--cache-dir", str(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr
    rerun_timings = json.loads((tmp_path / "rerun" / "timings.json").read_text())
    assert all(s["computed"] == 0 and s["cached"] == 8 for s in rerun_timings["stages"].values())
    assert json.loads((tmp_path / "rerun" / "predictions.json").read_text()) == predictions

    info = run_cli("cache", "info", "--cache-dir", str(tmp_path / "cache"))
    assert info.returncode == 0 and "patch_captioning" in info.stdout and "gradcam_matching" in info.stdout
    cleared = run_cli("cache", "clear", "--stage", "fid_reader", "--yes", "--cache-dir", str(tmp_path / "cache"))
    assert cleared.returncode == 0 and "removed 8" in cleared.stdout
    assert "fid_reader" not in run_cli("cache", "info", "--cache-dir", str(tmp_path / "cache")).stdout


@pytest.mark.slow
def test_cli_user_errors_have_no_traceback(tmp_path):
    done = run_cli("run", "pnp-vqa", "--dataset", "sample", "--set", "captioning.nope=1")
    assert done.returncode == 2
    assert "captioning.num_captions" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("run", "pnp-vqa", "--dataset", "no/such/folder", "--models", "tiny")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def _stage_stats(result):
    return {s.name: (s.computed, s.cached) for s in result.stage_stats}


def test_changing_a_parameter_recomputes_that_stage_and_later_only(tmp_path, tiny_zoo):
    data = open_dataset("sample", limit=5)
    Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(data, cache_dir=tmp_path)
    changed = Pipeline.from_yaml("pnp-vqa", [*FAST, "captioning.top_k=10"], models="tiny").run(data, cache_dir=tmp_path)
    assert _stage_stats(changed) == {"matching": (0, 5), "captioning": (5, 0), "reader": (5, 0)}
    reader_only = Pipeline.from_yaml("pnp-vqa", [*FAST, "captioning.top_k=10", "reader.max_new_tokens=5"],
                                     models="tiny").run(data, cache_dir=tmp_path)
    assert _stage_stats(reader_only) == {"matching": (0, 5), "captioning": (0, 5), "reader": (5, 0)}
    batch_only = Pipeline.from_yaml("pnp-vqa", [*FAST, "captioning.top_k=10", "reader.max_new_tokens=5",
                                                "captioning.batch_size=2"], models="tiny").run(data, cache_dir=tmp_path)
    assert _stage_stats(batch_only) == {"matching": (0, 5), "captioning": (0, 5), "reader": (0, 5)}


@pytest.mark.slow
def test_batch_size_does_not_change_results(tmp_path, tiny_zoo):
    data = open_dataset("sample", limit=6)
    one = Pipeline.from_yaml("pnp-vqa", [*FAST, "captioning.batch_size=1", "reader.batch_size=1"], models="tiny")
    four = Pipeline.from_yaml("pnp-vqa", [*FAST, "captioning.batch_size=4", "reader.batch_size=4"], models="tiny")
    out_one, out_four = tmp_path / "one", tmp_path / "four"
    one.run(data, cache_dir=tmp_path / "c1", out_dir=out_one)
    four.run(data, cache_dir=tmp_path / "c4", out_dir=out_four)
    captions = lambda out: [json.loads(l)["stages"]["captioning"]["captions"]  # noqa: E731
                            for l in (out / "records.jsonl").read_text().splitlines()]
    assert captions(out_one) == captions(out_four)
    assert (out_one / "predictions.json").read_text() == (out_four / "predictions.json").read_text()


def test_resume_after_interruption_recomputes_nothing_finished(tmp_path, tiny_zoo, monkeypatch):
    from capvqa.stages.fid_reader import FiDReader

    data = open_dataset("sample", limit=6)
    pipeline = Pipeline.from_yaml("pnp-vqa", [*FAST, "reader.batch_size=2"], models="tiny")
    original = FiDReader.run
    calls = {"n": 0}

    def crash_on_second_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(FiDReader, "run", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(data, cache_dir=tmp_path, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "predictions.json").exists()
    monkeypatch.setattr(FiDReader, "run", original)
    resumed = pipeline.run(data, cache_dir=tmp_path, out_dir=tmp_path / "out")
    assert _stage_stats(resumed) == {"matching": (0, 6), "captioning": (0, 6), "reader": (4, 2)}
    fresh = Pipeline.from_yaml("pnp-vqa", [*FAST, "reader.batch_size=2"], models="tiny").run(
        data, cache_dir=tmp_path / "fresh")
    assert resumed.predictions == fresh.predictions


@pytest.mark.slow
def test_two_concurrent_runs_share_one_cache(tmp_path, tiny_zoo):
    cache = tmp_path / "cache"
    common = ["run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--limit", "6", "--quiet",
              "--cache-dir", str(cache), "--set", "captioning.num_captions=4", "--set", "captioning.batch_size=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "capvqa", *common, "--out", str(tmp_path / f"r{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    first = json.loads((tmp_path / "r0" / "predictions.json").read_text())
    assert first == json.loads((tmp_path / "r1" / "predictions.json").read_text())
    from capvqa.engine.store import CacheStore

    usage = {u.stage: u.entries for u in CacheStore(cache).usage()}
    assert usage == {"gradcam_matching": 6, "patch_captioning": 6, "fid_reader": 6}


def test_python_api_and_stage_alone(tmp_path, tiny_zoo, cpu_runtime):
    """Each stage is usable on your own images and questions, without the engine."""
    from PIL import Image

    from capvqa.data.items import ImageRef, VQAItem
    from capvqa.engine.stage import StageInput
    from capvqa.stages.gradcam_matching import GradCamMatching

    path = tmp_path / "mine.png"
    Image.new("RGB", (50, 40), "red").save(path)
    item = VQAItem(question_id="q1", image_id="mine", question="What color is it?", image=ImageRef(path=path))
    matcher = GradCamMatching(model=str(tiny_zoo["itm"]))
    matcher.setup(cpu_runtime)
    (relevance,) = matcher.run([StageInput(item=item, item_key="q1", image_hash="mine")])
    assert relevance.relevance.shape == (relevance.grid[0] * relevance.grid[1],)

    result = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run([item], cache_dir=tmp_path / "c")
    assert set(result.predictions) == {"q1"} and result.metrics is None
