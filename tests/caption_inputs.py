"""Stage inputs for the captioning stages: four questions about two random images, each with a random
relevance map over the captioner's patches (what GradCAM matching would hand over)."""

from pathlib import Path

import numpy as np
from PIL import Image

from capvqa.data.items import ImageRef, VQAItem
from capvqa.engine.stage import StageInput
from capvqa.stages.gradcam_matching import PatchRelevance


def relevance_inputs(folder: Path, num_patches: int, count: int = 4) -> list[StageInput]:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(count):
        path = folder / f"img{i % 2}.png"
        if not path.exists():
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(path)
        relevance = PatchRelevance(relevance=rng.random(num_patches).astype(np.float32), grid=[4, 4],
                                   matching_text="q", match_logit=0.0)
        item = VQAItem(question_id=i, image_id=i % 2, question=f"question {i}?", image=ImageRef(path=path))
        entries.append(StageInput(item=item, item_key=f"item-{i}", image_hash=f"img{i % 2}",
                                  upstream={"relevance": relevance}))
    return entries
