"""An image's questions are batched together, so the stages that encode each distinct image of a batch
once (matching, captioning) encode it once for all of them; results do not change."""

from __future__ import annotations

import json

import pytest
from record_matching import assert_records_match

from capvqa.engine.runner import batch_order


def test_batch_order_puts_an_images_questions_side_by_side_costliest_first():
    images = ["a", "b", "a", "c", "b", "a"]
    costs = [3, 9, 5, 1, 2, 4]
    # b holds the costliest question (9), then a (5), then c; within an image, costliest first
    assert batch_order(images, costs) == [1, 4, 2, 5, 0, 3]
    assert batch_order(images) == [0, 2, 5, 1, 4, 3]  # no costs: images in order of first appearance
    assert batch_order([]) == []


def test_ties_keep_the_windows_order():
    assert batch_order(["x", "y", "x", "y"], [1, 1, 1, 1]) == [0, 2, 1, 3]


@pytest.mark.slow
def test_grouped_batches_encode_each_image_once_and_give_the_same_records(tmp_path, tiny_zoo):
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.pipeline import Pipeline

    fast = ["captioning.num_captions=3", "captioning.num_patches=4"]
    data = open_dataset("sample", limit=8)  # images 1 and 2, four questions each
    grouped = Pipeline.from_yaml("pnp-vqa", fast, models="tiny", batch_size=4).run(
        data, cache_dir=tmp_path / "a", out_dir=tmp_path / "grouped")
    stats = {s.name: s for s in grouped.stage_stats}
    assert stats["matching"].batches == stats["captioning"].batches == 2
    assert stats["matching"].batch_images == stats["captioning"].batch_images == 2  # one per image

    one_by_one = Pipeline.from_yaml("pnp-vqa", fast, models="tiny", batch_size=1).run(
        data, cache_dir=tmp_path / "b", out_dir=tmp_path / "single")
    assert {s.name: s.batch_images for s in one_by_one.stage_stats}["matching"] == 8
    assert grouped.predictions == one_by_one.predictions

    def records(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "records.jsonl").read_text().splitlines()]

    assert_records_match(records("grouped"), records("single"))
