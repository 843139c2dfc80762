"""The Python API is the recipe the CLI follows: top-level imports, saved-run settings, batch size for every
stage, options checked before any model loads, one run per folder, no process-wide side effects."""

import json
import subprocess
import sys

import pytest

from capvqa.errors import ConfigError

FAST = ["captioning.num_captions=2", "captioning.num_patches=4"]


def test_top_level_imports_are_lazy_and_work():
    script = ("import sys, capvqa; assert 'torch' not in sys.modules, 'import capvqa loaded torch'; "
              "from capvqa import Pipeline, RunSettings, open_dataset, register_stage; "
              "print(Pipeline.__module__, open_dataset.__module__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["capvqa.engine.pipeline", "capvqa.data.datasets"]


def test_batch_size_reaches_every_stage_unless_a_stage_sets_its_own(tiny_zoo):
    from capvqa import Pipeline

    pipeline = Pipeline.from_yaml("pnp-vqa", ["reader.batch_size=3"], models="tiny", batch_size=5)
    sizes = {s.name: s.params["batch_size"] for s in pipeline.spec.stages}
    assert sizes == {"matching": 5, "captioning": 5, "reader": 3}
    for bad in (0, -5, True):
        with pytest.raises(ConfigError, match="batch-size"):
            Pipeline.from_yaml("pnp-vqa", models="tiny", batch_size=bad)


def test_a_saved_run_restores_its_settings(tmp_path, tiny_zoo):
    from capvqa import Pipeline, RunSettings

    out = tmp_path / "first"
    first = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny", batch_size=2).run_with(
        RunSettings(dataset="sample", limit=3, cache_dir=str(tmp_path / "c")), out_dir=out)
    saved = Pipeline.from_yaml(out)  # a run folder loads its config.yaml
    again = saved.run_with(RunSettings(), out_dir=tmp_path / "again")
    assert again.predictions == first.predictions and len(again.predictions) == 3
    assert all(s.computed == 0 for s in again.stage_stats)  # same cache dir restored: all cached
    run = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "again" / "config.yaml").read_text())["run"]))
    assert run["dataset"] == "sample" and run["limit"] == 3 and run["cache_dir"] == str(tmp_path / "c")
    narrower = saved.run_with(RunSettings(limit=1), out_dir=tmp_path / "narrow")  # explicit values win
    assert len(narrower.predictions) == 1


@pytest.mark.parametrize("settings, message", [
    ({"limit": 0}, "--limit"), ({"batch_size": -5}, "--batch-size"), ({"lemmatize": "bogus"}, "lemmatizer"),
    ({"on_bad_image": "ignore"}, "--on-bad-image"), ({"dtype": "float8"}, "dtype"), ({"question_ids": ()}, "question"),
])
def test_every_option_is_checked_before_any_model_loads(tmp_path, tiny_zoo, monkeypatch, settings, message):
    from capvqa import Pipeline, RunSettings
    from capvqa.stages.gradcam_matching import GradCamMatching

    def no_model(self, runtime):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(GradCamMatching, "setup", no_model)
    with pytest.raises(ConfigError, match=message):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run_with(
            RunSettings(dataset="sample", cache_dir=str(tmp_path / "c"), **settings), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lemmatize_is_checked_before_the_stages_run_in_run(tmp_path, tiny_zoo, monkeypatch):
    from capvqa import Pipeline, open_dataset
    from capvqa.stages.gradcam_matching import GradCamMatching

    monkeypatch.setattr(GradCamMatching, "setup", lambda self, runtime: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ConfigError, match="lemmatizer"):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset("sample", limit=1), lemmatize="nope",
                                                               cache_dir=tmp_path)


def test_a_reused_folder_holds_only_the_new_run(tmp_path, tiny_zoo):
    """An unannotated rerun into an annotated run's folder must not leave the old metrics.json behind."""
    import shutil

    from capvqa import Pipeline, open_dataset
    from capvqa.report.runs import load_run
    from capvqa.resources import sample_dir

    out, cache = tmp_path / "run", tmp_path / "c"
    pipeline = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny")
    pipeline.run(open_dataset("sample", limit=2), out_dir=out, cache_dir=cache)
    assert (out / "metrics.json").is_file()
    (out / "notes.txt").write_text("mine")  # not a run file: left alone
    unannotated = tmp_path / "unannotated"
    shutil.copytree(sample_dir(), unannotated)
    (unannotated / "annotations.json").unlink()
    pipeline.run(open_dataset(str(unannotated), limit=2), out_dir=out, cache_dir=cache)
    assert not (out / "metrics.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert load_run(out).metrics is None


def test_a_failed_run_leaves_a_marker_the_report_shows_instead_of_numbers(tmp_path, tiny_zoo, monkeypatch):
    from capvqa import Pipeline, open_dataset
    from capvqa.report.build import collect_report
    from capvqa.report.runs import load_run
    from capvqa.stages.fid_reader import FiDReader

    out, cache = tmp_path / "run", tmp_path / "c"
    pipeline = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny")
    pipeline.run(open_dataset("sample", limit=2), out_dir=out, cache_dir=cache)
    assert load_run(out).metrics is not None

    def broken(self, batch):
        raise RuntimeError("reader exploded")

    monkeypatch.setattr(FiDReader, "run", broken)
    with pytest.raises(RuntimeError):
        Pipeline.from_yaml("pnp-vqa", [*FAST, "reader.max_new_tokens=3"], models="tiny").run(
            open_dataset("sample", limit=2), out_dir=out, cache_dir=cache)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "reader exploded" in status["error"]
    assert not (out / "metrics.json").exists() and not (out / "predictions.json").exists()
    run = load_run(out)
    assert run.status == "failed" and run.metrics is None and run.records == []
    report = collect_report([run], thumbnails=False)
    assert any("failed" in note and "reader exploded" in note for note in report.notes)


def test_a_process_group_is_destroyed_only_by_its_creator(monkeypatch):
    from capvqa.engine import pipeline as pipeline_module
    from capvqa.engine.distributed import DistributedContext

    calls = []
    monkeypatch.setattr(DistributedContext, "from_env", classmethod(lambda cls: cls(rank=0, world_size=2)))
    monkeypatch.setattr(DistributedContext, "init", lambda self: calls.append("init"))
    monkeypatch.setattr(DistributedContext, "shutdown", lambda self: calls.append("shutdown"))
    monkeypatch.setattr(pipeline_module, "_group_exists", lambda: True)  # the caller made the group
    with pipeline_module._process_group():
        pass
    assert calls == ["init"]
    monkeypatch.setattr(pipeline_module, "_group_exists", lambda: False)
    with pipeline_module._process_group():
        pass
    assert calls == ["init", "init", "shutdown"]


def test_a_mix_of_annotated_and_unannotated_items_is_an_error_not_a_silent_subset(tmp_path, tiny_zoo):
    """Loaders refuse such data; a caller's own item list gets the same answer instead of no scoring."""
    from dataclasses import replace

    from capvqa import Pipeline, open_dataset
    from capvqa.errors import DataError

    items = list(open_dataset("sample", limit=3))
    items[1] = replace(items[1], answers=())
    with pytest.raises(DataError, match=r"1 of 3 questions have no human answers \(e.g. question ids "
                                        + str(items[1].question_id)):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(items, cache_dir=tmp_path / "c")


def test_a_folder_that_is_not_a_run_folder_keeps_its_files(tmp_path, tiny_zoo):
    """`--out .` in a project must not delete the project's own config.yaml or report.md."""
    from capvqa import Pipeline, open_dataset

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: settings\n")
    with pytest.raises(ConfigError.__mro__[1], match="not a capvqa run folder.*config.yaml"):
        Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset("sample", limit=1), out_dir=project,
                                                               cache_dir=tmp_path / "c")
    assert (project / "config.yaml").read_text() == "my: settings\n"


def test_run_records_the_selection_and_reruns_exactly_it(tmp_path, tiny_zoo):
    """A run from Python on open_dataset(..., limit=2) reruns on those 2 questions, not the whole split."""
    from capvqa import Pipeline, RunSettings, open_dataset

    out = tmp_path / "api"
    first = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny").run(open_dataset("sample", limit=2), out_dir=out,
                                                                   cache_dir=tmp_path / "c")
    again = Pipeline.from_yaml(out).run_with(RunSettings(), out_dir=tmp_path / "again")
    assert again.predictions == first.predictions and len(again.predictions) == 2


def test_a_given_batch_size_reaches_the_stages_and_a_given_default_beats_a_saved_value(tmp_path, tiny_zoo):
    import yaml

    from capvqa import Pipeline, RunSettings

    out = tmp_path / "run"
    Pipeline.from_yaml("pnp-vqa", [*FAST, "reader.batch_size=3"], models="tiny").run_with(
        RunSettings(dataset="sample", limit=2, batch_size=1, on_bad_image="skip", cache_dir=str(tmp_path / "c")),
        out_dir=out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert {name: node["batch_size"] for name, node in saved["stages"].items()} == {
        "matching": 1, "captioning": 1, "reader": 3}
    assert saved["run"]["on_bad_image"] == "skip"
    Pipeline.from_yaml(out).run_with(RunSettings(on_bad_image="error"), out_dir=tmp_path / "again")
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["run"]["on_bad_image"] == "error"


def test_a_damaged_cache_stops_the_run_before_it_clears_the_previous_results(tmp_path, tiny_zoo):
    from capvqa import Pipeline, open_dataset
    from capvqa.engine.store import DB_FILENAME, CacheCorruptError

    out, cache = tmp_path / "run", tmp_path / "c"
    pipeline = Pipeline.from_yaml("pnp-vqa", FAST, models="tiny")
    pipeline.run(open_dataset("sample", limit=1), out_dir=out, cache_dir=cache)
    before = sorted(p.name for p in out.iterdir())
    (cache / DB_FILENAME).write_bytes(b"this is not a database" * 100)
    for companion in cache.glob(f"{DB_FILENAME}-*"):
        companion.unlink()
    with pytest.raises(CacheCorruptError):
        pipeline.run(open_dataset("sample", limit=1), out_dir=out, cache_dir=cache)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "metrics.json").is_file()
