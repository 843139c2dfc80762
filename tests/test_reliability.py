"""Fault injection: bad inputs, out-of-memory, unwritable folders, unloadable models, SIGKILL + resume."""

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from record_matching import assert_records_match

from capvqa.data.datasets import open_dataset
from capvqa.engine.pipeline import Pipeline
from capvqa.errors import DataError, UserError

FAST = ["captioning.num_captions=3", "captioning.num_patches=4"]


def _answers(text="yes"):
    return [{"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]


def write_folder(root: Path, images: dict[int, object], questions: dict[int, str] | None = None) -> Path:
    """A dataset folder like data/sample: image id -> PIL image, raw bytes, or None (missing file)."""
    (root / "images").mkdir(parents=True)
    qs, anns = [], []
    for image_id, content in images.items():
        name = root / "images" / f"COCO_val2014_{image_id:012d}.jpg"
        if isinstance(content, Image.Image):
            content.save(name, format="PNG" if content.mode in ("I;16", "I", "P", "RGBA") else "JPEG")
        elif isinstance(content, bytes):
            name.write_bytes(content)
        question = (questions or {}).get(image_id, "What is in the picture?")
        qid = image_id * 10
        qs.append({"image_id": image_id, "question": question, "question_id": qid})
        anns.append({"question_id": qid, "image_id": image_id, "question_type": "what is",
                     "answer_type": "other", "multiple_choice_answer": "yes", "answers": _answers()})
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    (root / "questions.json").write_text(json.dumps({**meta, "questions": qs}))
    (root / "annotations.json").write_text(json.dumps({**meta, "annotations": anns}))
    return root


def _good(mode="RGB", size=(48, 40)):
    array = (np.random.default_rng(size[0]).random((size[1], size[0], 3)) * 255).astype("uint8")
    return Image.fromarray(array).convert(mode)


@pytest.fixture()
def mixed_folder(tmp_path):
    jpeg = tmp_path / "t.jpg"
    _good().save(jpeg, format="JPEG")
    truncated = jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2]
    sixteen = Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 20).astype("uint16"))
    return write_folder(tmp_path / "data", {
        1: _good(), 2: None, 3: b"", 4: truncated, 5: b"this is not an image at all",
        6: _good("L"), 7: _good("CMYK"), 8: _good("RGBA"), 9: _good("P"), 10: _good(size=(1, 1)), 11: sixteen,
    })


def test_bad_images_skip_policy_records_and_scores_them_as_missing(mixed_folder, tmp_path, tiny_zoo):
    result = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(
        open_dataset(str(mixed_folder)), cache_dir=tmp_path / "c", out_dir=tmp_path / "out", on_bad_image="skip")
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert sorted(s["question_id"] for s in skipped) == [20, 30, 40, 50]
    assert all(s["reason"] for s in skipped)
    assert sorted(result.predictions) == [10, 60, 70, 80, 90, 100, 110]  # every readable mode works
    assert sorted(result.metrics["missing"]) == [20, 30, 40, 50]
    assert result.metrics["num_questions"] == 11
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["num_skipped"] == 4


@pytest.mark.slow
def test_bad_images_error_policy_names_the_file(mixed_folder, tmp_path, tiny_zoo):
    with pytest.raises(DataError, match="COCO_val2014_000000000002"):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(
            open_dataset(str(mixed_folder), limit=2), cache_dir=tmp_path / "c")
    done = subprocess.run([sys.executable, "-m", "capvqa", "run", "pnp-vqa", "--dataset", str(mixed_folder),
                           "--models", "tiny", "--limit", "4", "--set", "captioning.num_captions=2",
                           "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "000000000002" in done.stderr and "--on-bad-image" not in done.stdout


def test_decompression_bomb_is_refused(tmp_path, tiny_zoo):
    folder = write_folder(tmp_path / "d", {1: _good()})
    bomb = folder / "images" / "COCO_val2014_000000000001.jpg"
    Image.new("1", (12000, 9000)).save(bomb, format="PNG")  # 108 Mpx in a few kB
    with pytest.raises(DataError, match="pixels|bomb"):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset(str(folder)), cache_dir=tmp_path / "c")


def test_odd_questions_run(tmp_path, tiny_zoo):
    folder = write_folder(tmp_path / "d", {1: _good(), 2: _good(), 3: _good()}, questions={
        1: "Qu'est-ce que c'est? 你好 🐶🚌?", 2: " ".join(["word"] * 1000) + "?", 3: "<b>bold</b> & 'quotes'?"})
    result = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset(str(folder)),
                                                                    cache_dir=tmp_path / "c", out_dir=tmp_path / "o")
    assert sorted(result.predictions) == [10, 20, 30]
    lines = (tmp_path / "o" / "records.jsonl").read_text(encoding="utf-8")
    assert "🐶" in lines


def test_empty_question_is_an_error_naming_it(tmp_path):
    folder = write_folder(tmp_path / "d", {1: _good(), 2: _good()}, questions={2: "   "})
    with pytest.raises(DataError, match=r"question_id 20.*empty|empty.*20"):
        list(open_dataset(str(folder)))


def test_duplicate_question_ids_are_an_error(tmp_path):
    folder = write_folder(tmp_path / "d", {1: _good()})
    doc = json.loads((folder / "questions.json").read_text())
    doc["questions"].append(dict(doc["questions"][0]))
    (folder / "questions.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="10"):
        open_dataset(str(folder))


@pytest.mark.slow
def test_out_of_memory_retries_at_half_batch(tmp_path, tiny_zoo, monkeypatch):
    import torch

    from capvqa.stages.fid_reader import FiDReader

    data = open_dataset("sample", limit=6)
    expected = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(data, cache_dir=tmp_path / "a").predictions
    original = FiDReader.run

    def small_memory(self, batch):
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch)

    monkeypatch.setattr(FiDReader, "run", small_memory)
    result = Pipeline.from_yaml("pnp-vqa", [*FAST, "reader.batch_size=6"], models="tiny").run(
        data, cache_dir=tmp_path / "b", out_dir=tmp_path / "o")
    assert result.predictions == expected
    reader = json.loads((tmp_path / "o" / "timings.json").read_text())["stages"]["reader"]
    assert reader["oom_splits"] >= 1 and reader["computed"] == 6


def test_unwritable_output_fails_before_any_work(tmp_path, tiny_zoo):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="--out"):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset("sample", limit=1),
                                                                cache_dir=tmp_path / "c", out_dir=blocker / "run")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


@pytest.mark.slow
def test_model_that_cannot_load_offline_says_what_to_do(tmp_path):
    done = subprocess.run([sys.executable, "-m", "capvqa", "run", "pnp-vqa", "--dataset", "sample", "--limit", "1",
                           "--set", "models.itm=nobody/not-downloaded-model", "--cache-dir", str(tmp_path / "c"),
                           "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "nobody/not-downloaded-model" in message and "models.ROLE" in message


def test_no_pickle_anywhere_in_the_package():
    package = Path(__file__).resolve().parents[1] / "capvqa"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            assert "trust_remote_code=True" not in line, f"{path}: {line.strip()}"


def _count_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_zoo):
    """Per-item random streams (docs/methods.md#shared-deviations) make a killed-and-resumed run equal an
    uninterrupted one."""
    cache, log = tmp_path / "cache", tmp_path / "commits.jsonl"
    args = [sys.executable, "-m", "capvqa", "run", "pnp-vqa", "--dataset", "sample", "--models", "tiny", "--quiet",
            "--batch-size", "2", "--set", "captioning.num_captions=6", "--set", "captioning.num_patches=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAPVQA_COMMIT_LOG": str(log)}
    rng = random.Random(1234)
    total_commits = 3 * 19  # 37 questions, batches of 2, three stages
    targets = sorted(rng.sample(range(1, total_commits - 2), 12))
    kills = 0
    for target in targets:
        proc = subprocess.Popen([*args, "--cache-dir", str(cache), "--out", str(tmp_path / "killed")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and _count_lines(log) < target and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
    assert kills >= 10

    final = subprocess.run([*args, "--cache-dir", str(cache), "--out", str(tmp_path / "resumed")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    clean = subprocess.run([*args, "--cache-dir", str(tmp_path / "clean-cache"), "--out", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert clean.returncode == 0, clean.stderr
    resumed_predictions = json.loads((tmp_path / "resumed" / "predictions.json").read_text())
    assert resumed_predictions == json.loads((tmp_path / "clean" / "predictions.json").read_text())
    # resumed items were batched with other items than in the clean run: equal up to float noise
    read_records = lambda run: [json.loads(line) for line in (tmp_path / run / "records.jsonl").read_text().splitlines()]  # noqa: E731
    assert_records_match(read_records("resumed"), read_records("clean"))

    # no finished item was ever computed twice, and nothing is left half-written
    seen: dict[str, set] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        stage_keys = seen.setdefault(entry["stage"], set())
        assert not stage_keys & set(entry["keys"]), "a committed item was recomputed"
        stage_keys.update(entry["keys"])
    assert set(seen) == {"matching", "captioning", "reader"}
    connection = sqlite3.connect(cache / "capvqa-cache.sqlite3")
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {key for (key,) in connection.execute("SELECT key FROM entries")}
    connection.close()
    assert len(stored) == 3 * 37
    logged = set().union(*seen.values())
    assert logged <= stored
    # The commit log line is written just after the store's commit, so a kill landing between the two
    # leaves one committed batch unlogged (never a logged batch uncommitted): at most one batch per kill.
    assert len(stored - logged) <= 2 * kills
    shutil.rmtree(tmp_path / "killed", ignore_errors=True)
