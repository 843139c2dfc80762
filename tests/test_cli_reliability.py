"""The command line under stress: interrupts, data that looks like Rich markup, bad output paths, and the
settings `capvqa bench` must refuse before it builds a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing

import pytest

from capvqa.bench.run import BENCH_PIPELINES, resolve_bench_config
from capvqa.errors import ConfigError, UserError
from capvqa.resources import sample_dir

MARKUP_NAMES = ["a[/]b", "runs[exp1]", "[bold]x[/bold]"]


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``capvqa ARGS`` in this process: (exit status, stdout, stderr)."""
    from capvqa.cli import main

    monkeypatch.setattr(sys, "argv", ["capvqa", *args])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------
# interrupts


def interrupted_evaluate(monkeypatch, capsys, tmp_path) -> tuple[int, str]:
    """``capvqa evaluate`` with a KeyboardInterrupt while it reads the predictions: (status, stderr)."""
    import capvqa.eval.predictions

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(capvqa.eval.predictions, "load_predictions", interrupted)
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample",
                            "--predictions", str(tmp_path / "p.json"))
    return code, err


def test_interrupted_evaluate_exits_130_with_a_message(monkeypatch, capsys, tmp_path):
    code, err = interrupted_evaluate(monkeypatch, capsys, tmp_path)
    assert code == 130 and "Traceback" not in err
    assert err == "interrupted (Ctrl-C): stopped before the command finished\n"


def test_interrupted_download_says_what_is_kept_and_how_to_resume(monkeypatch, capsys, tmp_path):
    import capvqa.data.download

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(capvqa.data.download, "download_target", interrupted)
    root = tmp_path / "data[x]"
    code, _, err = run_main(monkeypatch, capsys, "data", "download", "okvqa", "--root", str(root))
    assert code == 130
    assert err.count("\n") == 1 and f"kept under {root}" in err
    assert f"rerun the same command to resume: capvqa data download okvqa --root '{root}'" in err


def test_the_interrupt_note_of_one_command_does_not_leak_into_the_next(monkeypatch, capsys, tmp_path):
    from capvqa.cli.console import interrupt_message, note_resumable_run, on_interrupt

    note_resumable_run(tmp_path / "cache", command=["capvqa", "run", "pnp-vqa", "--dataset", "my data"])
    assert interrupt_message() == (f"interrupted: finished batches are kept in the stage cache ({tmp_path / 'cache'}); "
                                   "rerun the same command to resume: capvqa run pnp-vqa --dataset 'my data'")
    monkeypatch.setenv("CAPVQA_CACHE_DIR", str(tmp_path / "default"))
    note_resumable_run(None)
    assert f"stage cache ({tmp_path / 'default'})" in interrupt_message()
    try:
        code, err = interrupted_evaluate(monkeypatch, capsys, tmp_path)  # main() starts with no note
    finally:
        on_interrupt(None)
    assert code == 130 and err.startswith("interrupted (Ctrl-C)")


@pytest.mark.slow
def test_sigint_during_a_run_exits_130_and_says_how_to_resume(tmp_path, tiny_zoo):
    cache_dir, out_dir = tmp_path / "cache", tmp_path / "run"
    command = [sys.executable, "-m", "capvqa", "run", "pnp-vqa", "--dataset", "sample", "--models", "tiny",
               "--limit", "8", "--batch-size", "1", "--out", str(out_dir), "--cache-dir", str(cache_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        while cached_entries(cache_dir) == 0:  # the first batch is committed: the run is computing
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run committed no batch in time"
            time.sleep(0.1)
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(message) == 1, f"no one-line interrupt message in: {err}"
    assert f"stage cache ({cache_dir})" in message[0] and "rerun the same command to resume" in message[0], (
        "capvqa run must call capvqa.cli.console.note_resumable_run(<its cache dir>) before computing")
    assert "--cache-dir" in message[0] and not (out_dir / "predictions.json").exists()
    assert cached_entries(cache_dir) > 0  # what the message says is kept is there


def cached_entries(cache_dir) -> int:
    """Committed entries in a stage cache another process is writing (0 while it does not exist yet)."""
    import sqlite3

    path = cache_dir / "capvqa-cache.sqlite3"
    if not path.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as connection:
            return connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.OperationalError:  # created but its tables not yet
        return 0


# ----------------------------------------------------------------------------------------------------
# user data is never read as Rich markup


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_paths_that_look_like_markup_are_printed_exactly(monkeypatch, capsys, tmp_path, name):
    predictions = tmp_path / name / "p.json"
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--predictions", str(predictions))
    assert code == 2 and "Traceback" not in err
    assert f"predictions file not found: {predictions}\n" in err

    folder = tmp_path / name / "dataset"
    folder.mkdir(parents=True)
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", str(folder), "--predictions", "p.json")
    assert code == 2 and f"the folder {folder} has no questions.json" in err


def test_question_types_that_look_like_markup_are_printed_exactly(monkeypatch, capsys, tmp_path):
    annotations = json.loads((sample_dir() / "annotations.json").read_text())
    for annotation in annotations["annotations"]:
        annotation["question_type"] = "what [/] is [exp1]"
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"question_id": a["question_id"], "answer": "x"}
                                       for a in annotations["annotations"]]))
    code, out, err = run_main(monkeypatch, capsys, "evaluate", "--questions", str(sample_dir() / "questions.json"),
                              "--annotations", str(tmp_path / "annotations.json"), "--predictions", str(predictions))
    assert code == 0, err
    assert "question type: what [/] is [exp1]" in out


def test_error_messages_are_not_rewrapped(monkeypatch, capsys, tmp_path):
    predictions = tmp_path / ("long-folder-name-" * 8) / "p.json"  # longer than any terminal line
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--predictions", str(predictions))
    assert code == 2 and str(predictions) in err


def test_usage_errors_exit_2_without_a_traceback(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--no-such-flag")
    assert code == 2 and "No such option: --no-such-flag" in err and "Traceback" not in err
    code, out, err = run_main(monkeypatch, capsys)  # no command: the help, as a usage error
    assert code == 2 and "Usage" in out + err and "Traceback" not in err
    code, out, _ = run_main(monkeypatch, capsys, "--help")
    assert code == 0 and "evaluate" in out


# ----------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_json_to_a_folder_or_an_impossible_path_is_refused(monkeypatch, capsys, tmp_path):
    annotations = json.loads((sample_dir() / "annotations.json").read_text())["annotations"]
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"question_id": a["question_id"], "answer": "x"} for a in annotations]))
    folder = tmp_path / "metrics[1]"
    folder.mkdir()
    code, out, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--predictions",
                              str(predictions), "--json", str(folder))
    assert code == 2 and "Traceback" not in err
    assert f"--json {folder} is a folder" in err and "scored" not in out  # refused before scoring

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--predictions",
                              str(predictions), "--json", str(blocker / "sub" / "m.json"))
    assert code == 2 and f"{blocker} is a file, not a folder" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_evaluate_json_into_a_read_only_folder_is_refused(monkeypatch, capsys, tmp_path):
    annotations = json.loads((sample_dir() / "annotations.json").read_text())["annotations"]
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"question_id": a["question_id"], "answer": "x"} for a in annotations]))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--predictions",
                                str(predictions), "--json", str(locked / "m.json"))
    finally:
        locked.chmod(0o700)
    assert code == 2 and "no permission to write" in err and "Traceback" not in err


def test_write_failure_is_a_user_error(tmp_path, monkeypatch):
    import capvqa.atomic
    from capvqa.cli.console import write_output_file

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(capvqa.atomic, "atomic_write_text", full_disk)
    with pytest.raises(UserError, match="cannot write --json .*m.json: No space left on device"):
        write_output_file(tmp_path / "m.json", "{}", "--json")


def test_a_null_answer_is_reported_as_null(monkeypatch, capsys, tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text('[{"question_id": 1, "answer": null}]')
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--predictions", str(predictions))
    assert code == 2
    assert "item 0 (question_id 1): 'answer' must be a string, got null\n" in err and "None" not in err


# ----------------------------------------------------------------------------------------------------
# bench: which size is measured, and what is refused before a model is built


@pytest.mark.parametrize(("pipeline", "size", "expected"), [
    ("pnp-vqa", None, ("pnp-vqa-base", "base")),
    ("pnp-vqa", "large", ("pnp-vqa-large", "large")),
    ("pnp-vqa", "3b", ("pnp-vqa-3b", "3b")),
    ("pnp-vqa-base", None, ("pnp-vqa-base", "base")),
    ("pnp-vqa-large", None, ("pnp-vqa-large", "large")),
    ("pnp-vqa-large", "large", ("pnp-vqa-large", "large")),
    ("pnp-vqa-3b", None, ("pnp-vqa-3b", "3b")),
])
def test_bench_size_follows_the_pipeline_name(pipeline, size, expected):
    assert resolve_bench_config(pipeline, size) == expected


@pytest.mark.parametrize(("pipeline", "size", "message"), [
    ("pnp-vqa-large", "base", "pnp-vqa-large is the large size but --size base was given"),
    ("pnp-vqa-base", "3b", "pnp-vqa-base is the base size but --size 3b was given"),
    ("pnp-vqa", "bogus", "unknown --size 'bogus'; valid: base, large, 3b"),
    ("img2llm", "base", "unknown --size 'base'"),
    ("blip2", None, "cannot measure 'blip2'"),
    ("pnp-vqa-xl", None, "cannot measure 'pnp-vqa-xl'"),
])
def test_bench_refuses_sizes_and_pipelines_it_cannot_build(pipeline, size, message):
    with pytest.raises(ConfigError) as refused:
        resolve_bench_config(pipeline, size)
    assert message in str(refused.value)
    if "cannot measure" in message:
        assert "pnp-vqa, pnp-vqa-base, pnp-vqa-large, pnp-vqa-3b" in str(refused.value)
        assert "img2llm" in str(refused.value) and "pica" in str(refused.value)


def test_every_bench_pipeline_has_a_config_and_an_architecture():
    from capvqa.bench.run import bench_method
    from capvqa.engine.config import locate_config

    for pipeline in BENCH_PIPELINES:
        config, size = resolve_bench_config(pipeline)
        assert locate_config(config).is_file() and size in bench_method(pipeline).sizes


@pytest.fixture
def no_model_builds(monkeypatch):
    """Fail the test if bench builds real-size models or any pipeline."""
    import capvqa.bench.run
    import capvqa.engine.pipeline
    import capvqa.synthetic.bench_models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr(capvqa.synthetic.bench_models, "ensure_pnp_vqa_models", forbidden)
    monkeypatch.setattr(capvqa.engine.pipeline.Pipeline, "from_yaml", forbidden)
    monkeypatch.setattr(capvqa.bench.run, "build_models", forbidden)


@pytest.mark.parametrize(("args", "message"), [
    (["pnp-vqa", "--size", "bogus"], "unknown --size 'bogus'; valid: base, large, 3b"),
    (["pnp-vqa", "--questions", "0"], "--questions must be at least 1, got 0"),
    (["pnp-vqa", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["pnp-vqa", "--caption-tokens", "-1"], "--caption-tokens must be at least 1, got -1"),
    (["pnp-vqa-large", "--size", "base"], "pnp-vqa-large is the large size but --size base was given"),
    (["blip2"], "cannot measure 'blip2'"),
    (["pica", "--num-captions", "5"], "does not apply to pica"),
])
def test_bench_cli_refuses_before_any_model_is_built(monkeypatch, capsys, no_model_builds, args, message):
    code, out, err = run_main(monkeypatch, capsys, "bench", *args, "--random-weights")
    assert code == 2 and message in one_line(err) and "Traceback" not in err
    assert "matching" not in out


def test_bench_api_checks_counts_before_building(no_model_builds):
    from capvqa.bench.run import run_benchmark

    with pytest.raises(ConfigError, match="--questions must be at least 1"):
        run_benchmark("pnp-vqa", questions=0)
    with pytest.raises(ConfigError, match="cannot measure 'blip2'"):
        run_benchmark("blip2")


def test_bench_of_the_large_pipeline_builds_the_large_reader(monkeypatch, capsys):
    import capvqa.synthetic.bench_models

    sizes = []

    def record(size, root=None):
        sizes.append(size)
        raise UserError("stopped after choosing the size")

    monkeypatch.setattr(capvqa.synthetic.bench_models, "ensure_pnp_vqa_models", record)
    code, _, err = run_main(monkeypatch, capsys, "bench", "pnp-vqa-large", "--random-weights")
    assert code == 2 and "stopped after choosing the size" in err
    assert sizes == ["large"]


def test_bench_json_to_a_folder_is_refused_before_the_run(monkeypatch, capsys, no_model_builds, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "bench", "pnp-vqa", "--random-weights", "--json", str(tmp_path))
    assert code == 2 and f"--json {tmp_path} is a folder" in err


# --------------------------------------------------------------------------------------------------- run


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
    (["--batch-size", "-5"], "--batch-size must be a whole number >= 1, got -5"),
    (["--limit", "0"], "--limit must be a whole number >= 1, got 0"),
    (["--question-ids", ","], "--question-ids names no question"),
    (["--lemmatize", "bogus"], "unknown lemmatizer 'bogus'"),
    (["--on-bad-image", "ignore"], "--on-bad-image must be one of error, skip"),
])
def test_run_options_are_refused_before_anything_runs(monkeypatch, capsys, tmp_path, args, message):
    """Before: --batch-size 0 was ignored, -5 saved into config.yaml, --limit 0 exited 0 without a word,
    and --lemmatize was checked only after every stage had run."""
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "run", "pnp-vqa", "--dataset", "sample", "--models", "tiny",
                            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *args)
    assert code == 2 and message in one_line(err) and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_cache_clear_also_removes_the_example_pool_arrays_and_memos(monkeypatch, capsys, tmp_path):
    from capvqa.data.example_pool import POOL_CACHE_SUBDIR
    from capvqa.engine.store import CacheStore

    store = CacheStore(tmp_path)
    store.put_many("x", [])
    store.close()
    pools = tmp_path / POOL_CACHE_SUBDIR
    pools.mkdir()
    (pools / "fingerprint-abc.json").write_text("{}")
    code, out, _ = run_main(monkeypatch, capsys, "cache", "clear", "--yes", "--cache-dir", str(tmp_path))
    assert code in (0, None) and not pools.exists() and "example-pool" in out
