"""Hugging Face loaders on small local datasets with the exact lmms-lab schemas; nothing is downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from capvqa.data.huggingface import load_huggingface
from capvqa.data.images import load_image
from capvqa.errors import DataError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """``load_dataset("parquet")`` writes Arrow files to the datasets cache; keep them in tmp."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


VQAV2_FEATURES = {
    "question_type": datasets.Value("string"),
    "multiple_choice_answer": datasets.Value("string"),
    "answers": datasets.List(
        {
            "answer": datasets.Value("string"),
            "answer_confidence": datasets.Value("string"),
            "answer_id": datasets.Value("int64"),
        }
    ),
    "image_id": datasets.Value("int64"),
    "answer_type": datasets.Value("string"),
    "question_id": datasets.Value("int64"),
    "question": datasets.Value("string"),
    "image": datasets.Image(),
}

OKVQA_FEATURES = {
    "question_id": datasets.Value("string"),
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answers": datasets.List(datasets.Value("string")),
    "question_type": datasets.Value("string"),
    "answer_type": datasets.Value("string"),
}


def vqav2_dataset(annotated: bool = True) -> datasets.Dataset:
    rows = {
        "question_type": ["what color is the", "is this", "how many"],
        "multiple_choice_answer": ["red", "yes", "2"],
        "answers": [
            [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
            for answers in (["red"] * 9 + ["maroon"], ["yes"] * 10, ["2"] * 7 + ["two"] * 3)
        ],
        "image_id": [10, 10, 20],
        "answer_type": ["other", "yes/no", "number"],
        "question_id": [10000, 10001, 20000],
        "question": ["What color is the car?", "Is this a street?", "How many cats?"],
        "image": [{"bytes": _png((255, 0, 0)), "path": None}] * 2
        + [{"bytes": _png((0, 0, 255)), "path": None}],
    }
    if not annotated:  # how test splits look: no answers, no types
        rows["answers"] = [[], [], []]
        rows["multiple_choice_answer"] = rows["question_type"] = rows["answer_type"] = [None] * 3
    return datasets.Dataset.from_dict(rows, features=datasets.Features(VQAV2_FEATURES))


def okvqa_dataset() -> datasets.Dataset:
    rows = {
        "question_id": ["2971475", "1181035"],
        "image": [{"bytes": _png((0, 255, 0)), "path": None}, {"bytes": _png((9, 9, 9)), "path": None}],
        "question": ["What sport can you use this for?", "What is the hairstyle called?"],
        "answers": [["race"] * 8 + ["motocross"] * 2, ["ponytail"] * 6 + ["braid"] * 4],
        "question_type": ["sports", "other"],
        "answer_type": ["other", "other"],
    }
    return datasets.Dataset.from_dict(rows, features=datasets.Features(OKVQA_FEATURES))


def test_vqav2_from_save_to_disk_dataset_dict(tmp_path):
    path = tmp_path / "vqav2"
    datasets.DatasetDict(
        {"validation": vqav2_dataset(), "testdev": vqav2_dataset(annotated=False)}
    ).save_to_disk(str(path))
    source = load_huggingface(str(path))
    assert source.schema == "vqav2" and source.split == "validation"
    assert source.has_annotations and len(source) == 3
    items = list(source)
    assert [i.question_id for i in items] == [10000, 10001, 20000]
    first = items[0]
    assert first.image_id == 10 and first.question == "What color is the car?"
    assert first.answers == ("red",) * 9 + ("maroon",)
    assert first.answer_type == "other" and first.question_type == "what color is the"
    assert first.image.data is not None and first.image.path is None  # encoded bytes, not decoded
    assert load_image(first.image).getpixel((0, 0)) == (255, 0, 0)
    assert list(source) == items  # re-iterable

    testdev = load_huggingface(str(path), split="testdev")
    assert testdev.split == "testdev" and not testdev.has_annotations
    assert all(i.answers == () and i.answer_type is None for i in testdev)

    with pytest.raises(DataError, match=r"no split 'test'.*testdev.*validation"):
        load_huggingface(str(path), split="test")


def test_okvqa_from_save_to_disk_single_dataset(tmp_path):
    path = tmp_path / "okvqa"
    okvqa_dataset().save_to_disk(str(path))
    source = load_huggingface(str(path), split="val2014")
    assert source.schema == "okvqa" and source.split == "val2014"
    items = list(source)
    assert [i.question_id for i in items] == ["2971475", "1181035"]  # string ids kept as stored
    assert items[0].image_id == 297147  # OK-VQA question ids are image_id * 10 + k
    assert items[0].answers == ("race",) * 8 + ("motocross",) * 2
    assert items[0].question_type == "sports"
    assert load_image(items[0].image).getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.parametrize("make, schema", [(vqav2_dataset, "vqav2"), (okvqa_dataset, "okvqa")])
def test_parquet_file(tmp_path, make, schema):
    path = tmp_path / "one.parquet"
    make().to_parquet(str(path))
    source = load_huggingface(str(path))
    assert source.schema == schema
    assert len(source) == len(make())
    assert all(load_image(item.image).size == (6, 4) for item in source)


def test_parquet_folder_picks_split_by_shard_name(tmp_path):
    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    vqav2_dataset().to_parquet(str(data / "validation-00000-of-00001.parquet"))
    vqav2_dataset(annotated=False).to_parquet(str(data / "testdev-00000-of-00001.parquet"))
    validation = load_huggingface(str(tmp_path / "snapshot"))
    assert validation.split == "validation" and validation.has_annotations and len(validation) == 3
    testdev = load_huggingface(str(tmp_path / "snapshot"), split="testdev")
    assert testdev.split == "testdev" and not testdev.has_annotations


def test_okvqa_parquet_string_ids_and_subset(tmp_path):
    path = tmp_path / "data" / "val2014-00000-of-00001.parquet"
    path.parent.mkdir()
    okvqa_dataset().to_parquet(str(path))
    source = load_huggingface(str(tmp_path), question_ids=[1181035])
    assert source.split == "val2014"
    assert [i.question_id for i in source] == ["1181035"]


def test_limit_and_subset_keep_dataset_order(tmp_path):
    path = tmp_path / "vqav2"
    vqav2_dataset().save_to_disk(str(path))
    assert [i.question_id for i in load_huggingface(str(path), limit=2)] == [10000, 10001]
    subset = load_huggingface(str(path), question_ids=["20000", 10000])
    assert [i.question_id for i in subset] == [10000, 20000]
    assert len(load_huggingface(str(path), question_ids=[20000, 10001], limit=1)) == 1
    with pytest.raises(DataError, match=r"no question ids 5, 6"):
        load_huggingface(str(path), question_ids=[10000, 5, 6])


def _with_answers(make, answers_by_row: dict[int, object]) -> datasets.Dataset:
    table = make()
    rows = table.to_dict()
    for index, answers in answers_by_row.items():
        rows["answers"][index] = answers
    return datasets.Dataset.from_dict(rows, features=table.features)


@pytest.mark.parametrize("row", [1, 0])  # the first row used to decide has_annotations alone
def test_rows_without_answers_in_an_annotated_split_are_rejected_at_load(tmp_path, row):
    """An empty ``answers`` would make the item unannotated and silently turn scoring off for the run."""
    path = tmp_path / "vqav2"
    _with_answers(vqav2_dataset, {row: []}).save_to_disk(str(path))
    question_id = [10000, 10001, 20000][row]
    with pytest.raises(DataError, match=rf"1 question\(s\) have no answers.*question ids {question_id}, "
                                        r"while 2 other\(s\) have"):
        load_huggingface(str(path))
    with pytest.raises(DataError, match=str(question_id)):  # the whole split is checked, not the selection
        load_huggingface(str(path), question_ids=[20000])


def test_okvqa_missing_and_blank_answers(tmp_path):
    missing = tmp_path / "missing.parquet"
    _with_answers(okvqa_dataset, {1: None}).to_parquet(str(missing))
    with pytest.raises(DataError, match=r"question ids 1181035, while 1 other"):
        load_huggingface(str(missing))
    blank = tmp_path / "blank.parquet"
    _with_answers(okvqa_dataset, {0: ["", " "] * 5}).to_parquet(str(blank))
    with pytest.raises(DataError, match=r"question 2971475: every answer is an empty string"):
        load_huggingface(str(blank))
    partly = tmp_path / "partly.parquet"  # one blank answer among real ones is kept: still scorable
    _with_answers(okvqa_dataset, {0: [""] + ["race"] * 9}).to_parquet(str(partly))
    assert next(iter(load_huggingface(str(partly)))).answers == ("",) + ("race",) * 9


def test_streamed_rows_are_checked_at_load(monkeypatch):
    broken = _with_answers(vqav2_dataset, {1: []})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, streaming=False, **kw: (
        broken.to_iterable_dataset() if streaming else broken))
    with pytest.raises(DataError, match=r"question ids 10001, while 1 other"):
        load_huggingface("lmms-lab/VQAv2", split="validation", limit=2)


def test_not_a_vqa_dataset(tmp_path):
    path = tmp_path / "other"
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['question_id', 'question', 'image'\]"):
        load_huggingface(str(path))


def test_not_a_dataset_path(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no parquet files"):
        load_huggingface(str(tmp_path))
    with pytest.raises(DataError, match="expected a .parquet file"):
        load_huggingface(str(tmp_path / "readme.txt"))
    with pytest.raises(DataError, match="neither an existing local path nor a hub name"):
        load_huggingface(str(tmp_path / "missing" / "deep" / "dataset"))


def test_hub_name_goes_through_load_dataset_without_network(monkeypatch):
    """The hub path is the real code; only the download is replaced by a local dataset."""
    calls = []

    def fake_load_dataset(name, split=None, streaming=False, **kwargs):
        calls.append((name, split, streaming))
        table = vqav2_dataset()
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(
        datasets, "get_dataset_split_names", lambda name, **kw: ["validation", "testdev", "test"]
    )

    full = load_huggingface("lmms-lab/VQAv2")
    assert calls[-1] == ("lmms-lab/VQAv2", "validation", False)
    assert full.split == "validation" and len(full) == 3

    few = load_huggingface("lmms-lab/VQAv2", split="validation", limit=2)
    assert calls[-1] == ("lmms-lab/VQAv2", "validation", True)  # a small limit streams
    items = list(few)
    assert len(few) == 2 and [i.question_id for i in items] == [10000, 10001]
    assert items[0].image.data is not None and list(few) == items


def test_hub_failure_is_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    with pytest.raises(DataError, match=r"lmms-lab/OK-VQA.*hub unreachable.*local save_to_disk"):
        load_huggingface("lmms-lab/OK-VQA")


def test_saved_files_stay_in_tmp(tmp_path):
    path = tmp_path / "p.parquet"
    okvqa_dataset().to_parquet(str(path))
    load_huggingface(str(path))
    assert any(Path(tmp_path / "hf_cache").rglob("*.arrow"))


def test_content_fingerprint_reads_no_image_and_follows_the_answers(tmp_path, monkeypatch):
    from capvqa.data.datasets import open_dataset

    path = tmp_path / "vqav2"
    vqav2_dataset().save_to_disk(str(path))
    first = open_dataset(f"hf:{path}").content_fingerprint()
    assert open_dataset(f"hf:{path}").content_fingerprint() == first  # stable across openings

    # the same questions and answers over other pixels: the fingerprint does not look at images
    recoloured = vqav2_dataset().cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"image": {"bytes": _png((1, 2, 3)), "path": None}})
    recoloured.save_to_disk(str(tmp_path / "recoloured"))
    assert open_dataset(f"hf:{tmp_path / 'recoloured'}").content_fingerprint() == first

    edited = vqav2_dataset().map(lambda row, i: {"question": row["question"] + "?" * (i == 2)}, with_indices=True)
    edited.save_to_disk(str(tmp_path / "edited"))
    assert open_dataset(f"hf:{tmp_path / 'edited'}").content_fingerprint() != first
    assert open_dataset(f"hf:{path}", limit=2).content_fingerprint() != first
