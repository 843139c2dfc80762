"""A stage computes a per-image value (an encoding, a caption, tags) once per run, not once per batch: only
the images its memo lacks are decoded and computed, the memo stays bounded, and results do not change."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from record_matching import assert_records_match

from capvqa.data.image_memo import ImageMemo, memo_encoded_images
from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.errors import DataError


@pytest.fixture
def inputs(tmp_path):
    """Questions 0..5 over images a, b, c (two each), with each image a distinct solid colour."""
    entries = []
    for i, (name, colour) in enumerate([("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))] * 2):
        path = tmp_path / f"{name}.png"
        if not path.exists():
            Image.new("RGB", (4, 4), colour).save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        item = VQAItem(question_id=i, image_id=ord(name), question=f"q{i}?", image=ImageRef(path=path))
        entries.append(StageInput(item=item, item_key=f"k{i}", image_hash=digest, content_sha256=digest))
    return entries


class Colours:
    """A per-image value that shows which image it came from (10 red + green), and which images each
    call computed."""

    def __init__(self) -> None:
        self.calls: list[list[tuple]] = []

    def __call__(self, images: list) -> list[int]:
        self.calls.append([image.getpixel((0, 0)) for image in images])
        return [image.getpixel((0, 0))[0] * 10 + image.getpixel((0, 0))[1] for image in images]


def test_only_images_missing_from_the_memo_are_computed(inputs):
    a0, b1, c2, a3, b4, c5 = inputs
    memo: ImageMemo[int] = ImageMemo(capacity=2)
    colours = Colours()
    values, index = memo.values([a0, b1, a3], colours)
    assert values == [2550, 255] and index == [0, 1, 0] and memo.computed == 2
    values, index = memo.values([a3, c2], colours)  # a is there; c evicts b (least recently used)
    assert values == [2550, 0] and index == [0, 1]
    assert colours.calls == [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255)]] and memo.computed == 3 and len(memo) == 2
    memo.values([b4, c5], colours)
    assert colours.calls[-1] == [(0, 255, 0)] and memo.computed == 4
    memo.values([c5], colours)
    assert len(colours.calls) == 3  # nothing to compute: not called at all
    memo.clear()
    assert len(memo) == 0 and memo.computed == 4  # the count stays for the run's statistics


def test_a_memo_hit_does_not_decode_the_image_again(inputs):
    memo: ImageMemo[int] = ImageMemo()
    memo.values(inputs[:1], Colours())
    inputs[0].item.image.path.unlink()  # a hit never opens the file
    assert memo.values([inputs[3]], Colours()) == ([2550], [0])


def test_hand_made_inputs_share_values_within_a_batch_only(inputs):
    """A stage used alone gets inputs labelled by the caller (no content hash): a label reused for another
    picture in a later call must not get the earlier picture's value."""
    a, b = (replace(inputs[i], image_hash="photo", content_sha256=None) for i in (0, 1))
    memo: ImageMemo[int] = ImageMemo()
    colours = Colours()
    assert memo.values([a, a], colours) == ([2550], [0, 0])
    assert memo.values([b], colours) == ([255], [0])
    assert len(colours.calls) == 2 and len(memo) == 0


def test_a_changed_image_is_refused_when_it_is_decoded(inputs):
    Image.new("RGB", (4, 4), (9, 9, 9)).save(inputs[1].item.image.path)
    with pytest.raises(DataError, match="changed while the run was using it"):
        ImageMemo().values(inputs[:2], Colours())


def test_a_compute_returning_the_wrong_number_of_values_is_an_error(inputs):
    with pytest.raises(RuntimeError, match="computed 1 values for 2 images"):
        ImageMemo().values(inputs[:2], lambda images: [0])
    with pytest.raises(ValueError, match="at least one image"):
        ImageMemo(capacity=0)


def test_encoded_images_stack_the_distinct_images_rows(inputs):
    memo: ImageMemo[torch.Tensor] = ImageMemo()

    def encode(images):
        return torch.tensor([[float(image.getpixel((0, 0))[0]), float(image.getpixel((0, 0))[2])] for image in images])

    embeds, index = memo_encoded_images(memo, inputs[:3], encode)
    assert embeds.tolist() == [[255.0, 0.0], [0.0, 0.0], [0.0, 255.0]] and index == [0, 1, 2]
    embeds, index = memo_encoded_images(memo, [inputs[5], inputs[3]], encode)
    assert embeds.tolist() == [[0.0, 255.0], [255.0, 0.0]] and index == [0, 1] and memo.computed == 3


@pytest.mark.slow
def test_an_image_split_across_batches_is_encoded_once_and_results_do_not_change(tmp_path, tiny_zoo):
    """Batches of 3 over two images with four questions each: [a a a] [a b b] [b b]. Each stage that
    encodes images encodes each once (not 4 times), and the records equal one-question batches'."""
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.pipeline import Pipeline

    fast = ["captioning.num_captions=3", "captioning.num_patches=4"]
    data = open_dataset("sample", limit=8)  # images 1 and 2, four questions each
    split = Pipeline.from_yaml("pnp-vqa", fast, models="tiny", batch_size=3).run(
        data, cache_dir=tmp_path / "a", out_dir=tmp_path / "split")
    stats = {s.name: s for s in split.stage_stats}
    for name in ("matching", "captioning"):
        assert stats[name].batches == 3 and stats[name].batch_images == 4
        assert stats[name].images_encoded == 2
    assert stats["reader"].images_encoded is None  # the reader encodes no image
    one_by_one = Pipeline.from_yaml("pnp-vqa", fast, models="tiny", batch_size=1).run(
        data, cache_dir=tmp_path / "b", out_dir=tmp_path / "single")
    assert split.predictions == one_by_one.predictions

    def records(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "records.jsonl").read_text().splitlines()]

    assert_records_match(records("split"), records("single"))
    # a rerun finds everything cached and encodes nothing
    again = Pipeline.from_yaml("pnp-vqa", fast, models="tiny", batch_size=3).run(
        data, cache_dir=tmp_path / "a", out_dir=tmp_path / "again")
    assert {s.name: s.images_encoded for s in again.stage_stats} == {"matching": 0, "captioning": 0, "reader": None}
