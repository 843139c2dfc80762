"""Memory stays flat in the dataset size: 20,000 synthetic items through PNP-VQA with the tiny models."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import io, json, sys
    from PIL import Image
    from capvqa.bench.memory import PeakMemory
    from capvqa.data.items import ImageRef, VQAItem
    from capvqa.engine.pipeline import Pipeline

    count, cache, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "gray").save(buffer, format="PNG")
    image = ImageRef(data=buffer.getvalue())

    class Synthetic:
        """A re-iterable dataset that never holds its items: each pass makes them afresh."""
        name = "synthetic"
        def __len__(self):
            return count
        def __iter__(self):
            for i in range(count):
                yield VQAItem(question_id=i, image_id=0, question=f"what is item {i}?", image=image,
                              answers=("item",) * 10, answer_type="other", question_type="what is")

    overrides = ["captioning.num_captions=1", "captioning.num_patches=4", "captioning.min_length=5",
                 "captioning.max_length=6", "reader.max_new_tokens=2",
                 "matching.batch_size=500", "captioning.batch_size=500", "reader.batch_size=500"]
    pipeline = Pipeline.from_yaml("pnp-vqa", overrides, models="tiny")
    with PeakMemory("cpu", interval=0.01) as peak:
        result = pipeline.run(Synthetic(), cache_dir=cache, out_dir=out)
    print(json.dumps({"peak": peak.bytes, "predictions": len(result.predictions),
                      "computed": [s.computed for s in result.stage_stats]}))
''')


def run(count, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(count), str(tmp_path / f"cache{count}"),
                           str(tmp_path / f"out{count}")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_rss_does_not_grow_with_the_dataset(tmp_path, tiny_zoo):
    small, large = run(2_000, tmp_path), run(20_000, tmp_path)
    assert large["predictions"] == 20_000 and large["computed"] == [20_000] * 3
    # 10x the items: everything is streamed, so only the answers kept for scoring may grow
    assert large["peak"] - small["peak"] < 120 * 2**20, (small, large)
    lines = (tmp_path / "out20000" / "records.jsonl").read_text().count("\n")
    assert lines == 20_000
