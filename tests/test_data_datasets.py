"""open_dataset for every spec form, the data-root layout contract, and the bundled sample."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from capvqa.data.datasets import Dataset, okvqa_layout, open_dataset, vqav2_layout
from capvqa.data.images import load_image
from capvqa.errors import DataError
from capvqa.resources import sample_dir


def _write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def _questions(subtype: str, ids=(1, 2)) -> dict:
    return {
        "data_subtype": subtype,
        "questions": [{"image_id": i, "question": f"Question {i}?", "question_id": i * 1000} for i in ids],
    }


def _annotations(ids=(1, 2), raw: bool = False) -> dict:
    def answer(k: int) -> dict:
        entry = {"answer": "yes", "answer_confidence": "yes", "answer_id": k + 1}
        if raw:
            entry["raw_answer"] = "yes!"
        return entry

    return {
        "annotations": [
            {
                "question_id": i * 1000,
                "image_id": i,
                "question_type": "is this",
                "answer_type": "yes/no",
                "multiple_choice_answer": "yes",
                "answers": [answer(k) for k in range(10)],
            }
            for i in ids
        ]
    }


def _coco_images(root: Path, image_split: str, ids=(1, 2)) -> None:
    folder = root / "coco" / image_split
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (4, 4), (i, i, i)).save(folder / f"COCO_{image_split}_{i:012d}.jpg")


# ------------------------------------------------------------------------------------- the sample


def test_sample_is_a_real_vqav2_style_split():
    dataset = open_dataset("sample")
    assert isinstance(dataset, Dataset)
    assert dataset.name == "sample" and dataset.split == "val2014" and dataset.has_annotations
    items = list(dataset)
    assert len(items) == len(dataset) >= 30
    assert all(len(item.answers) == 10 for item in items)
    assert set(Counter(item.answer_type for item in items)) == {"yes/no", "number", "other"}
    assert all(item.question_type for item in items)
    assert len({item.image_id for item in items}) >= 8
    assert len({item.question_id for item in items}) == len(items)
    # Several questions have disagreeing annotators, so partial credit is exercised.
    assert sum(len(set(item.answers)) > 1 for item in items) >= 10


def test_every_sample_image_decodes():
    seen = {}
    for item in open_dataset("sample"):
        if item.image_id not in seen:
            image = load_image(item.image)
            assert image.mode == "RGB" and max(image.size) <= 512 and min(image.size) >= 100
            seen[item.image_id] = image.size
    assert len(seen) == len(list((sample_dir() / "images").glob("*.jpg")))


def test_sample_files_use_the_official_format():
    questions = json.loads((sample_dir() / "questions.json").read_text())
    annotations = json.loads((sample_dir() / "annotations.json").read_text())
    assert questions["task_type"] == "Open-Ended" and questions["data_type"] == "mscoco"
    assert questions["data_subtype"] == annotations["data_subtype"] == "val2014"
    assert {"info", "license"} <= set(questions) and {"info", "license"} <= set(annotations)
    for annotation in annotations["annotations"]:
        assert annotation["multiple_choice_answer"] in {a["answer"] for a in annotation["answers"]}
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert {a["answer_confidence"] for a in annotation["answers"]} <= {"yes", "maybe", "no"}
    total = sum(p.stat().st_size for p in sample_dir().rglob("*") if p.is_file())
    assert total < 1_500_000
    assert "CC0" in (sample_dir() / "README.md").read_text()


def test_sample_subset_and_limit():
    assert len(open_dataset("sample", limit=5)) == 5
    assert [i.question_id for i in open_dataset("sample", question_ids=["2000", 1000])] == [1000, 2000]
    with pytest.raises(DataError, match="holds the split 'val2014'"):
        open_dataset("sample", split="train2014")


# -------------------------------------------------------------------------------- official layouts


def test_layout_contract():
    root = Path("/data")
    val = vqav2_layout(root, "val2014")
    assert val.questions == root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
    assert val.annotations == root / "vqav2/v2_mscoco_val2014_annotations.json"
    assert val.image_dir == root / "coco/val2014"
    testdev = vqav2_layout(root, "test-dev2015")
    assert testdev.annotations is None and testdev.image_dir == root / "coco/test2015"
    ok = okvqa_layout(root, "train2014")
    assert ok.questions == root / "okvqa/OpenEnded_mscoco_train2014_questions.json"
    assert ok.annotations == root / "okvqa/mscoco_train2014_annotations.json"
    assert ok.image_dir == root / "coco/train2014"


def test_vqav2_val_and_test_dev(tmp_path):
    _write_json(tmp_path / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", _questions("val2014"))
    _write_json(tmp_path / "vqav2/v2_mscoco_val2014_annotations.json", _annotations())
    _coco_images(tmp_path, "val2014")
    dataset = open_dataset("vqav2", data_root=tmp_path)
    assert (dataset.name, dataset.split, len(dataset), dataset.has_annotations) == (
        "vqav2",
        "val2014",
        2,
        True,
    )
    item = next(iter(dataset))
    assert item.answers == ("yes",) * 10
    assert load_image(item.image).size == (4, 4)

    _write_json(
        tmp_path / "vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json",
        _questions("test-dev2015", ids=(3,)),
    )
    _coco_images(tmp_path, "test2015", ids=(3,))
    testdev = open_dataset("vqav2", split="test-dev2015", data_root=tmp_path)
    assert testdev.split == "test-dev2015" and not testdev.has_annotations
    (only,) = list(testdev)
    assert only.image.path == tmp_path / "coco/test2015/COCO_test2015_000000000003.jpg"
    assert load_image(only.image).size == (4, 4)


def test_okvqa_with_raw_answers(tmp_path):
    _write_json(tmp_path / "okvqa/OpenEnded_mscoco_val2014_questions.json", _questions("val2014"))
    _write_json(tmp_path / "okvqa/mscoco_val2014_annotations.json", _annotations(raw=True))
    _coco_images(tmp_path, "val2014")
    dataset = open_dataset("okvqa", data_root=tmp_path, limit=1)
    (item,) = list(dataset)
    assert dataset.name == "okvqa" and item.raw_answers == ("yes!",) * 10


def test_missing_official_files_say_how_to_download(tmp_path):
    with pytest.raises(
        DataError,
        match=r"missing .*v2_OpenEnded_mscoco_val2014_questions\.json.*"
        r"capvqa data download vqav2 --root",
    ):
        open_dataset("vqav2", data_root=tmp_path)
    _write_json(tmp_path / "okvqa/OpenEnded_mscoco_val2014_questions.json", _questions("val2014"))
    with pytest.raises(DataError, match=r"mscoco_val2014_annotations\.json.*download okvqa --root"):
        open_dataset("okvqa", data_root=tmp_path)
    _write_json(tmp_path / "okvqa/mscoco_val2014_annotations.json", _annotations())
    with pytest.raises(DataError, match=r"coco/val2014.*capvqa data download coco-val2014 --root"):
        open_dataset("okvqa", data_root=tmp_path)


def test_official_argument_errors(tmp_path):
    with pytest.raises(DataError, match="needs a data root"):
        open_dataset("vqav2")
    with pytest.raises(DataError, match=r"okvqa has no split 'test2015'.*val2014, train2014"):
        open_dataset("okvqa", split="test2015", data_root=tmp_path)


# ------------------------------------------------------------------------------ folders and hf:


def test_dataset_folder_with_plain_image_names(tmp_path):
    folder = tmp_path / "mine"
    _write_json(folder / "questions.json", {"questions": _questions("x")["questions"]})
    (folder / "images").mkdir()
    Image.new("RGB", (5, 5)).save(folder / "images" / "1.png")
    Image.new("RGB", (6, 6)).save(folder / "images" / "2.jpg")
    dataset = open_dataset(str(folder))
    assert dataset.name == "mine" and dataset.split is None and not dataset.has_annotations
    assert [load_image(i.image).size for i in dataset] == [(5, 5), (6, 6)]


def test_dataset_folder_prefers_coco_names(tmp_path):
    folder = tmp_path / "coco_named"
    _write_json(folder / "questions.json", _questions("val2014"))
    _write_json(folder / "annotations.json", _annotations())
    images = folder / "images"
    images.mkdir()
    Image.new("RGB", (5, 5)).save(images / "COCO_val2014_000000000001.jpg")
    dataset = open_dataset(str(folder))
    first, second = list(dataset)
    assert first.image.path.name == "COCO_val2014_000000000001.jpg"
    with pytest.raises(DataError, match="COCO_val2014_000000000002.jpg"):
        load_image(second.image)


def test_dataset_folder_annotation_with_empty_answers_is_rejected(tmp_path):
    """``answers: []`` would make the item unannotated and silently turn scoring off for the run."""
    folder = tmp_path / "mine"
    _write_json(folder / "questions.json", _questions("val2014"))
    annotations = _annotations()
    annotations["annotations"][1]["answers"] = []
    _write_json(folder / "annotations.json", annotations)
    (folder / "images").mkdir()
    with pytest.raises(DataError, match=r"annotations\.json: annotations\[1\] \(question_id 2000\): "
                                        r"field 'answers' is empty"):
        open_dataset(str(folder))


def test_hf_spec_with_local_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "okvqa_hf"
    from test_data_huggingface import OKVQA_FEATURES

    features = datasets.Features(OKVQA_FEATURES)
    rows = {
        "question_id": ["100"],
        "image": [Image.new("RGB", (3, 3))],
        "question": ["What is it?"],
        "answers": [["cat"] * 10],
        "question_type": ["other"],
        "answer_type": ["other"],
    }
    datasets.DatasetDict({"val2014": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(path)
    )
    dataset = open_dataset(f"hf:{path}")
    assert dataset.name == f"hf:{path}" and dataset.split == "val2014" and dataset.has_annotations
    (item,) = list(dataset)
    assert item.question_id == "100" and item.answers == ("cat",) * 10
    assert load_image(item.image).size == (3, 3)


@pytest.mark.parametrize("spec", ["vqa", "coco", "hf:", "/no/such/folder"])
def test_unknown_spec_lists_the_valid_forms(spec):
    with pytest.raises(DataError) as error:
        open_dataset(spec)
    message = str(error.value)
    if spec != "hf:":
        assert "'sample'" in message and "'vqav2' or 'okvqa'" in message and "hf:" in message
        assert "questions.json" in message


def test_folder_without_questions_is_rejected(tmp_path):
    with pytest.raises(DataError, match="has no questions.json.*Valid forms"):
        open_dataset(str(tmp_path))


def test_importing_the_data_package_does_not_import_datasets():
    code = (
        "import sys, capvqa.data.datasets, capvqa.data.huggingface, capvqa.data.images; "
        "print('datasets' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
