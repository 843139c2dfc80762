"""PICa in-context example selection: pure ranking, self-exclusion, modes, and the cached example pool."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from capvqa.data.datasets import open_dataset
from capvqa.engine.keys import item_fingerprint
from capvqa.engine.stage import StageInput
from capvqa.errors import ConfigError
from capvqa.ops.patch_sampling import item_rng
from capvqa.stages.example_selection import (
    ExampleSelection,
    random_examples,
    similarity_scores,
    top_examples,
)

# ------------------------------------------------------------------------------------- pure ranking


def _unit(rows):
    tensor = torch.tensor(rows, dtype=torch.float32)
    return torch.nn.functional.normalize(tensor, dim=-1)


def test_question_and_image_scores_add_and_rank():
    pool_text = _unit([[1, 0], [0, 1], [1, 1]])
    pool_image = _unit([[1, 0], [0, 1]])
    image_index = torch.tensor([1, 0, 0])  # pool rows 1 and 2 share image 0
    query_text = _unit([[1, 0]])
    query_image = _unit([[0, 1]])
    scores = similarity_scores(
        query_text, pool_text, query_image=query_image, pool_image=pool_image, image_index=image_index
    )
    expected = torch.tensor([[1.0 + 1.0, 0.0 + 0.0, 0.70710678 + 0.0]])
    assert torch.allclose(scores, expected, atol=1e-6)
    ranked = top_examples(scores, 2)
    assert [row for row, _ in ranked[0]] == [0, 2]
    assert ranked[0][0][1] == pytest.approx(2.0)
    # question only: row 0 (identical question) first, then row 2
    question_only = top_examples(similarity_scores(query_text, pool_text), 3)
    assert [row for row, _ in question_only[0]] == [0, 2, 1]


def test_distinct_rows_are_gathered_by_index():
    distinct = _unit([[1, 0], [0, 1]])
    text_index = torch.tensor([1, 0, 1, 0])
    scores = similarity_scores(_unit([[0, 1]]), distinct, text_index=text_index)
    assert scores.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_ties_break_by_pool_row_and_exclusion_is_honoured():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[0, 1] = True
    ranked = top_examples(scores, 3, exclude)
    assert [r for r, _ in ranked[0]] == [3, 0, 2]
    assert [r for r, _ in ranked[1]] == [0, 1, 2]
    everything_excluded = top_examples(scores[:1], 10, torch.ones(1, 5, dtype=torch.bool))
    assert everything_excluded == [[]]
    assert len(top_examples(scores[:1], 10, exclude)[0]) == 4  # k larger than the pool: all valid rows


def test_random_examples_are_seeded_distinct_and_exclude():
    first = random_examples(50, 10, item_rng(42, "item-a", "pica-examples"), exclude=[3, 4])
    again = random_examples(50, 10, item_rng(42, "item-a", "pica-examples"), exclude=[3, 4])
    other = random_examples(50, 10, item_rng(42, "item-b", "pica-examples"), exclude=[3, 4])
    assert first == again != other
    assert len(set(first)) == 10 and not {3, 4} & set(first)
    assert sorted(random_examples(5, 10, np.random.default_rng(0), exclude=[0])) == [1, 2, 3, 4]


def test_config_is_checked_early():
    with pytest.raises(ConfigError, match="mode"):
        ExampleSelection(mode="nearest")
    with pytest.raises(ConfigError, match="n_shot"):
        ExampleSelection(n_shot=0)
    with pytest.raises(ConfigError, match="pool_captioner must name the pipeline's caption stage"):
        ExampleSelection(pool_captioner=3)


# ------------------------------------------------------------------------------- the stage, tiny zoo


def _runtime(cpu_runtime, cache_dir):
    return replace(cpu_runtime, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def sample_inputs():
    from capvqa.engine.runner import ImageHasher
    from capvqa.engine.store import CacheStore

    hasher = ImageHasher(CacheStore(None))
    inputs = []
    for item in list(open_dataset("sample"))[:6]:
        image_hash = hasher(item)
        inputs.append(
            StageInput(item=item, item_key=item_fingerprint(image_hash, item.question), image_hash=image_hash)
        )
    return inputs


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    """COCO-style captions for sample images 1..5 (two each); images 6..10 are left to the captioner."""
    annotations = []
    for image_id in range(1, 6):
        annotations.append(
            {"image_id": image_id, "id": 100 + image_id, "caption": f"first caption of {image_id}"}
        )
        annotations.append({"image_id": image_id, "id": image_id, "caption": f"second caption of {image_id}"})
    path = tmp_path_factory.mktemp("coco") / "captions_train2014.json"
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def selection_settings(tiny_zoo, captions_file):
    from capvqa.stages.image_captioning import ImageCaptioningConfig

    return {
        "clip_model": str(tiny_zoo["clip"]),
        "pool_captioner": ImageCaptioningConfig(model=str(tiny_zoo["captioner"])),
        "pool_dataset": "sample",
        "pool_captions": str(captions_file),
        "n_shot": 4,
        "n_ensemble": 2,
    }


@pytest.fixture(scope="module")
def selection(selection_settings, cpu_runtime, tmp_path_factory):
    stage = ExampleSelection(**selection_settings)
    stage.setup(_runtime(cpu_runtime, tmp_path_factory.mktemp("cache")))
    return stage


def test_pool_from_sample_with_file_and_generated_captions(selection):
    report = selection.report
    assert report.items == 37 and report.skipped == 0
    assert report.question_embeddings == "computed" and report.image_embeddings == "computed"
    by_image = {}
    for entry, caption in zip(selection.entries, selection.captions):
        by_image.setdefault(int(entry.image_id), set()).add(caption)
    for image_id, captions in by_image.items():
        assert len(captions) == 1  # one caption per image
        if image_id <= 5:
            assert captions == {f"first caption of {image_id}"}  # first in annotation order, not by id
        else:
            assert not next(iter(captions)).startswith(("first caption", "second caption"))
    assert report.captions_from_file == sum(1 for e in selection.entries if int(e.image_id) <= 5)
    assert report.captions_generated == report.items - report.captions_from_file


def test_examples_are_ranked_and_never_the_query(selection, sample_inputs):
    out = selection.run(sample_inputs)
    assert len(out) == len(sample_inputs)
    for entry, result in zip(sample_inputs, out):
        examples = result.examples
        assert len(examples) == 8
        assert set(examples[0]) == {"question_id", "question", "answer", "caption", "score"}
        assert entry.item.question_id not in {e["question_id"] for e in examples}
        assert len({e["question_id"] for e in examples}) == 8
        scores = [e["score"] for e in examples]
        assert scores == sorted(scores, reverse=True)
    # a batch of one gives the same examples as the batch (scores equal up to float noise)
    alone = selection.run(sample_inputs[2:3])[0].examples
    assert [e["question_id"] for e in alone] == [e["question_id"] for e in out[2].examples]
    assert [e["score"] for e in alone] == pytest.approx([e["score"] for e in out[2].examples], abs=1e-5)


def test_answers_are_the_first_annotated_answer(selection):
    items = {item.question_id: item for item in open_dataset("sample")}
    for entry in selection.entries:
        assert entry.answer == items[entry.question_id].answers[0].strip()


def test_same_image_and_question_is_excluded_under_another_id(selection, sample_inputs):
    query = sample_inputs[0]
    renamed = replace(query, item=replace(query.item, question_id="copy-of-a-pool-question"))
    examples = selection.run([renamed])[0].examples
    assert query.item.question_id not in {e["question_id"] for e in examples}


def test_second_setup_reads_the_cached_pool(selection_settings, cpu_runtime, tmp_path, sample_inputs):
    runtime = _runtime(cpu_runtime, tmp_path)
    first = ExampleSelection(**selection_settings)
    first.setup(runtime)
    arrays = sorted((tmp_path / "example-pools").glob("*.npy"))
    assert len(arrays) == 2
    mtimes = [p.stat().st_mtime_ns for p in arrays]
    second = ExampleSelection(**selection_settings)
    second.setup(runtime)
    assert second.report.question_embeddings == "cached" and second.report.image_embeddings == "cached"
    assert [p.stat().st_mtime_ns for p in arrays] == mtimes
    assert not list((tmp_path / "example-pools").glob("*.tmp"))
    assert [[e["question_id"] for e in r.examples] for r in second.run(sample_inputs[:2])] == [
        [e["question_id"] for e in r.examples] for r in first.run(sample_inputs[:2])
    ]


def test_pool_captions_from_the_captioner_are_cached(selection_settings, cpu_runtime, tmp_path):
    from capvqa.engine.store import CacheStore

    settings = dict(selection_settings, pool_captions=None)
    stage = ExampleSelection(**settings)
    stage.setup(_runtime(cpu_runtime, tmp_path))
    assert stage.report.captions_from_file == 0 and stage.report.captions_generated == 37
    usage = {u.stage: u.entries for u in CacheStore(tmp_path).usage()}
    assert usage == {"image_captioning": 10}  # one caption per distinct image, in the stage cache
    again = ExampleSelection(**settings)
    again.setup(_runtime(cpu_runtime, tmp_path))
    assert again.captions == stage.captions
    assert {u.stage: u.entries for u in CacheStore(tmp_path).usage()} == {"image_captioning": 10}


def test_question_mode_ignores_images(selection_settings, cpu_runtime, tmp_path, sample_inputs):
    stage = ExampleSelection(**dict(selection_settings, mode="question"))
    stage.setup(_runtime(cpu_runtime, tmp_path))
    assert stage.report.image_embeddings == "unused"
    query = sample_inputs[0]
    pool_twin = next(e for e in stage.entries if e.image_hash != query.image_hash)
    # the query's image with another image's question: question mode ranks that question first, score ~1
    probe = replace(query, item=replace(query.item, question_id="probe", question=pool_twin.question))
    best = stage.run([probe])[0].examples[0]
    assert best["question"] == pool_twin.question and best["score"] == pytest.approx(1.0, abs=1e-5)


def test_random_mode_is_seeded_per_item(selection_settings, cpu_runtime, tmp_path, sample_inputs):
    stage = ExampleSelection(**dict(selection_settings, mode="random"))
    stage.setup(_runtime(cpu_runtime, tmp_path))
    assert stage._encoder is None  # no CLIP needed
    assert stage.report.question_embeddings == stage.report.image_embeddings == "unused"
    together = stage.run(sample_inputs)
    alone = [stage.run([entry])[0] for entry in sample_inputs]
    assert together == alone
    for entry, result in zip(sample_inputs, together):
        ids = [e["question_id"] for e in result.examples]
        assert len(ids) == len(set(ids)) == 8 and entry.item.question_id not in ids
        assert all(e["score"] is None for e in result.examples)
    assert together[0].examples != together[1].examples
    reseeded = ExampleSelection(**dict(selection_settings, mode="random", seed=7))
    reseeded.setup(_runtime(cpu_runtime, tmp_path))
    assert reseeded.run(sample_inputs[:1])[0].examples != together[0].examples


def test_runs_through_the_engine_with_its_cache(selection_settings, cpu_runtime, tmp_path):
    from capvqa.engine.runner import BoundStage, PipelineRunner
    from capvqa.engine.store import CacheStore

    stage = ExampleSelection(**dict(selection_settings, mode="random"))
    bound = BoundStage.create("examples", stage, {})
    store = CacheStore(tmp_path)
    runner = PipelineRunner([bound], store, _runtime(cpu_runtime, tmp_path))
    items = list(open_dataset("sample", limit=3))
    stats = runner.run_stage(bound, items)
    assert stats.computed == 3
    assert runner.run_stage(bound, items).cached == 3
    results = [outputs["examples"] for _, outputs in runner.results(items)]
    assert all(len(r.examples) == 8 for r in results)


def test_an_edited_pool_is_never_served_from_the_cache(selection_settings, cpu_runtime, tmp_path):
    """The pool's content is in the stage's cache key: the same files give the same key (cached), an
    annotation or captions file edited in place gives a new one (computed again, with the new answer)."""
    import shutil

    from capvqa.engine.runner import BoundStage, PipelineRunner
    from capvqa.engine.store import CacheStore
    from capvqa.resources import sample_dir

    pool = shutil.copytree(sample_dir(), tmp_path / "pool")
    captions = tmp_path / "captions.json"
    shutil.copy(selection_settings["pool_captions"], captions)
    settings = dict(selection_settings, mode="random", pool_dataset=str(pool), pool_captions=str(captions),
                    pool_limit=4, n_shot=4, n_ensemble=1)
    store = CacheStore(tmp_path / "cache")
    items = list(open_dataset("sample"))[10:12]  # queries outside the 4-question pool: all 4 are picked

    def run():
        bound = BoundStage.create("examples", ExampleSelection(**settings), {})
        runner = PipelineRunner([bound], store, _runtime(cpu_runtime, tmp_path / "cache"))
        stats = runner.run_stage(bound, items)
        return bound.fingerprint, stats, [outputs["examples"] for _, outputs in runner.results(items)]

    first_key, first, _ = run()
    again_key, again, _ = run()
    assert first.computed == 2 and (again_key, again.cached) == (first_key, 2)

    annotations = json.loads((pool / "annotations.json").read_text())
    edited = annotations["annotations"][0]
    edited["answers"][0]["answer"] = "tangerine"
    (pool / "annotations.json").write_text(json.dumps(annotations))
    edited_key, rerun, results = run()
    assert edited_key != first_key and rerun.computed == 2
    answers = {str(example["question_id"]): example["answer"] for r in results for example in r.examples}
    assert answers[str(edited["question_id"])] == "tangerine"

    captions.write_text(captions.read_text().replace("first caption of 1", "a new first caption of 1"))
    captions_key, recaptioned, _ = run()
    assert captions_key != edited_key and recaptioned.computed == 2


def test_a_missing_pool_captions_file_is_a_clear_error_when_the_pipeline_is_built(selection_settings, tmp_path):
    from capvqa.engine.runner import BoundStage
    from capvqa.errors import DataError

    missing = tmp_path / "captions_train2014.json"
    stage = ExampleSelection(**dict(selection_settings, pool_captions=str(missing)))
    with pytest.raises(DataError, match=r"captions file for the example pool not found.*captions_train2014\.json"):
        BoundStage.create("examples", stage, {})


# ------------------------------------------------------------------ the pool, resolved from the run's dataset


@pytest.mark.parametrize(
    ("params", "run", "expected"),
    [
        # auto on the bundled sample: the sample itself, its split
        ({}, ("sample", "val2014", None), {"pool_dataset": "sample", "pool_split": "val2014"}),
        # auto on an official dataset: its train2014 under the run's data root
        ({"pool_dataset": "auto"}, ("okvqa", "val2014", "/data"),
         {"pool_dataset": "okvqa", "pool_split": "train2014", "pool_data_root": "/data"}),
        ({}, ("vqav2", "test-dev2015", "/data"),
         {"pool_dataset": "vqav2", "pool_split": "train2014", "pool_data_root": "/data"}),
        # an explicit pool wins; its own split and root too
        ({"pool_dataset": "vqav2"}, ("okvqa", "val2014", "/data"),
         {"pool_dataset": "vqav2", "pool_split": "train2014", "pool_data_root": "/data"}),
        ({"pool_dataset": "okvqa", "pool_split": "val2014", "pool_data_root": "/pools"}, ("okvqa", "val2014", "/data"),
         {"pool_dataset": "okvqa", "pool_split": "val2014", "pool_data_root": "/pools"}),
        ({"pool_dataset": "sample"}, ("okvqa", "val2014", "/data"), {"pool_dataset": "sample"}),
        ({"pool_dataset": "auto", "pool_split": "val2014"}, ("okvqa", "val2014", "/data"),
         {"pool_dataset": "okvqa", "pool_split": "val2014", "pool_data_root": "/data"}),
        # the run's dataset unknown (a plain list of items): left auto, building the stage then asks
        ({}, (None, None, None), {}),
    ],
)
def test_resolve_params(params, run, expected):
    from capvqa.engine.stage import DatasetContext

    resolved = ExampleSelection.resolve_params(dict(params, n_shot=3), DatasetContext(*run))
    assert resolved == {**params, "n_shot": 3, **expected}


def test_resolve_params_makes_local_paths_absolute(tmp_path, monkeypatch):
    import shutil

    from capvqa.engine.stage import DatasetContext
    from capvqa.resources import sample_dir

    shutil.copytree(sample_dir(), tmp_path / "mine")
    (tmp_path / "captions.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    folder_pool = ExampleSelection.resolve_params({"pool_dataset": "mine", "pool_captions": "captions.json"},
                                                  DatasetContext("okvqa", "val2014", None))
    assert folder_pool == {"pool_dataset": str(tmp_path / "mine"), "pool_captions": str(tmp_path / "captions.json")}
    official = ExampleSelection.resolve_params({}, DatasetContext("okvqa", "val2014", "data"))
    assert official["pool_data_root"] == str(tmp_path / "data")
    hf_path = ExampleSelection.resolve_params({"pool_dataset": "hf:mine"}, DatasetContext("okvqa", None, None))
    assert hf_path == {"pool_dataset": f"hf:{tmp_path / 'mine'}"}


@pytest.mark.parametrize("run", [("hf:lmms-lab/OK-VQA", "val2014", None), ("/data/my-vqa-folder", "val2014", None)])
def test_auto_never_takes_an_evaluated_split_as_its_own_pool(run):
    """Only the bundled sample is its own pool: any other split's examples would carry its own answers."""
    from capvqa.engine.stage import DatasetContext

    with pytest.raises(ConfigError, match="examples.pool_dataset"):
        ExampleSelection.resolve_params({"pool_dataset": "auto"}, DatasetContext(*run))


def test_an_unresolved_auto_pool_is_a_clear_error(selection_settings):
    from capvqa.engine.runner import BoundStage

    stage = ExampleSelection(**dict(selection_settings, pool_dataset="auto"))
    with pytest.raises(ConfigError, match=r"pool_dataset is 'auto'.*set pool_dataset \(okvqa"):
        BoundStage.create("examples", stage, {})


def test_pool_captioner_must_be_resolved_or_unneeded(selection_settings, cpu_runtime, tmp_path):
    from capvqa.engine.runner import BoundStage
    from capvqa.errors import DataError

    named = ExampleSelection(**dict(selection_settings, pool_captioner="caption"))
    with pytest.raises(ConfigError, match=r"names the pipeline stage 'caption'.*ImageCaptioningConfig"):
        BoundStage.create("examples", named, {})
    nothing = ExampleSelection(**dict(selection_settings, pool_captioner=None, pool_captions=None))
    with pytest.raises(ConfigError, match="need captions: set pool_captioner"):
        BoundStage.create("examples", nothing, {})
    # a captions file alone is fine when it covers the pool; the sample's images 6..10 are not in it
    partial = ExampleSelection(**dict(selection_settings, pool_captioner=None, mode="random"))
    BoundStage.create("examples", partial, {})
    with pytest.raises(DataError, match=r"without a caption in .*captions_train2014\.json.*pool_captioner"):
        partial.setup(_runtime(cpu_runtime, tmp_path))


# ------------------------------------------------------------- the pool fingerprint, memoised by file identity


def test_a_second_build_does_not_read_the_pool_again(selection_settings, tmp_path, monkeypatch):
    import shutil

    from capvqa.data import datasets
    from capvqa.engine.runner import BoundStage
    from capvqa.resources import sample_dir

    pool = shutil.copytree(sample_dir(), tmp_path / "pool")
    captions = shutil.copy(selection_settings["pool_captions"], tmp_path / "captions.json")
    settings = dict(selection_settings, pool_dataset=str(pool), pool_captions=str(captions), mode="random")
    opened = []
    real_open = datasets.open_dataset
    monkeypatch.setattr(datasets, "open_dataset", lambda *a, **k: opened.append(a) or real_open(*a, **k))

    def fingerprint():  # what building a pipeline does: the stage's key, pool fingerprint included
        return BoundStage.create("examples", ExampleSelection(**settings), {}, "float32").fingerprint

    first = fingerprint()
    assert len(opened) == 1
    assert fingerprint() == first and len(opened) == 1  # memo hit: the pool was not read again

    annotations = pool / "annotations.json"
    document = json.loads(annotations.read_text())
    document["annotations"][0]["answers"][0]["answer"] = "tangerine"
    annotations.write_text(json.dumps(document))  # another size and mtime: a new identity
    edited = fingerprint()
    assert edited != first and len(opened) == 2
    assert fingerprint() == edited and len(opened) == 2

    captions.write_text(captions.read_text().replace("first caption of 1", "a new first caption of 1"))
    assert fingerprint() not in (first, edited) and len(opened) == 3

    # same content under a new identity (rewritten in place): read again, same fingerprint
    text = annotations.read_text()
    annotations.unlink()
    annotations.write_text(text)
    recaptioned = fingerprint()
    assert len(opened) == 4 and fingerprint() == recaptioned and len(opened) == 4


def test_the_pool_fingerprint_memo_is_only_a_memo(selection_settings, tmp_path, monkeypatch):
    """An unreadable memo is recomputed, an unwritable memo directory only logs; the value is the same."""
    import shutil

    from capvqa.data.example_pool import memoised_pool_fingerprint, pool_content_fingerprint
    from capvqa.resources import sample_dir

    pool = shutil.copytree(sample_dir(), tmp_path / "pool")
    expected = pool_content_fingerprint(open_dataset(str(pool)))

    def memoised(memo_dir):
        return memoised_pool_fingerprint(dataset=str(pool), split=None, data_root=None, limit=None,
                                         captions_file=None, open_pool=lambda: open_dataset(str(pool)),
                                         memo_dir=memo_dir)

    assert memoised(tmp_path / "memo") == expected
    (memo,) = (tmp_path / "memo").glob("fingerprint-*.json")
    memo.write_text("{not json")
    assert memoised(tmp_path / "memo") == expected
    assert json.loads(memo.read_text())["fingerprint"] == expected
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the memo directory should be")
    assert memoised(blocked) == expected


def test_an_official_pool_is_keyed_by_content_not_by_its_root(selection_settings, tmp_path):
    """The run's --data-root reaches the pool, but the root's path is not in the key: two copies of the same
    okvqa train2014 give the same selection key."""
    import shutil

    from capvqa.engine.runner import BoundStage
    from capvqa.engine.stage import DatasetContext
    from capvqa.resources import sample_dir

    def okvqa_root(root):
        questions = json.loads((sample_dir() / "questions.json").read_text())
        annotations = json.loads((sample_dir() / "annotations.json").read_text())
        (root / "okvqa").mkdir(parents=True)
        (root / "okvqa" / "OpenEnded_mscoco_train2014_questions.json").write_text(
            json.dumps({**questions, "data_subtype": "train2014"}))
        (root / "okvqa" / "mscoco_train2014_annotations.json").write_text(
            json.dumps({**annotations, "data_subtype": "train2014"}))
        (root / "coco" / "train2014").mkdir(parents=True)
        for image in (sample_dir() / "images").iterdir():
            shutil.copy(image, root / "coco" / "train2014" / image.name.replace("val2014", "train2014"))
        return root

    keys = []
    for root in (okvqa_root(tmp_path / "a"), okvqa_root(tmp_path / "b")):
        params = ExampleSelection.resolve_params({}, DatasetContext("okvqa", "val2014", str(root)))
        assert (params["pool_dataset"], params["pool_split"], params["pool_data_root"]) == (
            "okvqa", "train2014", str(root))
        stage = ExampleSelection(**dict(selection_settings, pool_captions=None, **params))
        keys.append(BoundStage.create("examples", stage, {}).fingerprint)
    assert keys[0] == keys[1]


# ------------------------------------------------------------------------ pool captions: the run's dtype, closed


@pytest.mark.slow  # the tiny captioner runs twice, once in bf16 on the CPU
def test_pool_captions_are_keyed_with_the_runs_dtype(selection_settings, cpu_runtime, tmp_path):
    """fp32 and bf16 pool captions are separate cache entries, as the engine keys every stage."""
    import torch

    from capvqa.engine.store import CacheStore

    settings = dict(selection_settings, pool_captions=None, mode="random", pool_limit=8)  # images 1 and 2
    ExampleSelection(**settings).setup(_runtime(cpu_runtime, tmp_path))
    assert {u.stage: u.entries for u in CacheStore(tmp_path).usage()} == {"image_captioning": 2}
    ExampleSelection(**settings).setup(replace(_runtime(cpu_runtime, tmp_path), dtype=torch.bfloat16))
    assert {u.stage: u.entries for u in CacheStore(tmp_path).usage()} == {"image_captioning": 4}


def test_setup_closes_the_cache_store_it_opens(selection_settings, cpu_runtime, tmp_path, monkeypatch):
    from capvqa.engine.store import CacheStore

    closed = []
    real_close = CacheStore.close
    monkeypatch.setattr(CacheStore, "close", lambda self: closed.append(self.directory) or real_close(self))
    # the first 20 questions show images 1..5, all in the captions file: no captioner is needed
    settings = dict(selection_settings, mode="random", pool_limit=20, pool_captioner=None)
    ExampleSelection(**settings).setup(_runtime(cpu_runtime, tmp_path))
    assert closed == [tmp_path]


def test_an_unannotated_pool_is_refused(selection_settings, cpu_runtime, tmp_path):
    """A pool without answers cannot give examples; the error says to set pool_dataset instead."""
    import shutil

    from capvqa.engine.stage import DatasetContext
    from capvqa.errors import DataError
    from capvqa.resources import sample_dir

    folder = shutil.copytree(sample_dir(), tmp_path / "questions-only")
    (folder / "annotations.json").unlink()
    params = ExampleSelection.resolve_params({"pool_dataset": str(folder), "pool_split": "val2014"},
                                             DatasetContext("sample", "val2014", None))
    stage = ExampleSelection(**dict(selection_settings, mode="random", **params))
    with pytest.raises(DataError, match=r"questions-only val2014 has no annotations.*set examples\.pool_dataset"):
        stage.setup(_runtime(cpu_runtime, tmp_path / "cache"))
