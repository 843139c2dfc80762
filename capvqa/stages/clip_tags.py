"""Image tags from CLIP zero-shot classification over a fixed vocabulary (PICa's "caption + tags").

PICa (docs/methods.md#query-context-caption-and-tags) appends object tags to the query caption; the
paper took them from Microsoft's Azure tagging API, which is not available offline or for free. This
stage is the open stand-in: CLIP scores the image against every vocabulary name written into the
prompt template ``"a photo of a {}."`` (CLIP's own zero-shot template), turns the scores into a
softmax over the vocabulary, and keeps at most ``top_k`` names whose probability reaches
``threshold``.

Why a softmax threshold of 0.05 by default: the softmax spreads the mass over ~460 names, so a name
holding 5% of it is ~23 times the uniform share -- clearly picked by the image -- while names ranked
3rd to 5th usually hold 1-5%; the threshold keeps PICa's context from filling up with guesses. Set it
to 0 for exactly ``top_k`` tags. An image where nothing passes gets no tags, and the prompt then carries
the caption alone.

The vocabulary (``capvqa/data/tag_vocabulary.txt``, shipped with the package) is COCO's 80 categories
plus ~380 common object, food, clothing, room and scene names; a custom file can be given. Its text
embeddings are computed once in ``setup``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from capvqa.data.image_memo import ImageMemo
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, non_semantic
from capvqa.errors import ConfigError, DataError
from capvqa.models.clip_encoder import ClipEncoder
from capvqa.models.loading import ModelRef

log = logging.getLogger(__name__)

VOCABULARY_RESOURCE = "tag_vocabulary.txt"


@dataclass(frozen=True)
class ClipTagsConfig:
    model: str = "openai/clip-vit-base-patch16"
    revision: str | None = None
    vocabulary: str | None = None  # a file with one name per line; None: the shipped vocabulary
    template: str = "a photo of a {}."
    top_k: int = 5
    threshold: float = 0.05  # minimum softmax probability over the vocabulary
    batch_size: int = non_semantic(64)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a probability in [0, 1], got {self.threshold}")
        if "{}" not in self.template:
            raise ConfigError(f"template must contain '{{}}' where the tag goes, got {self.template!r}")


@dataclass(frozen=True)
class ImageTags:
    """Tag names, most probable first, and their softmax probabilities over the vocabulary."""

    tags: list[str]
    scores: list[float]


# ------------------------------------------------------------------------------------ pure helpers


def parse_vocabulary(text: str, *, source: str) -> list[str]:
    """Names from a vocabulary file's text: one per line, '#' comments and blanks skipped, duplicates
    dropped (a duplicate would split its own probability in two)."""
    names: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        name = " ".join(line.split())
        if name and not name.startswith("#") and name not in seen:
            seen.add(name)
            names.append(name)
    if not names:
        raise DataError(f"tag vocabulary {source} holds no names")
    return names


def load_tag_vocabulary(path: str | Path | None = None) -> list[str]:
    """The shipped vocabulary, or the file at ``path``."""
    if path is None:
        resource = resources.files("capvqa.data").joinpath(VOCABULARY_RESOURCE)
        return parse_vocabulary(
            resource.read_text(encoding="utf-8"), source=f"capvqa/data/{VOCABULARY_RESOURCE}"
        )
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"cannot read the tag vocabulary {path}: {error}") from None
    return parse_vocabulary(text, source=str(path))


def select_tags(
    probabilities: np.ndarray, vocabulary: Sequence[str], top_k: int, threshold: float
) -> tuple[list[str], list[float]]:
    """At most ``top_k`` names with probability >= ``threshold``, most probable first; ties keep
    vocabulary order."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    kept = [int(i) for i in order if probabilities[i] >= threshold]
    return [vocabulary[i] for i in kept], [float(probabilities[i]) for i in kept]


# ------------------------------------------------------------------------------------------ stage


class ClipTags:
    NAME: ClassVar[str] = "clip_tags"
    VERSION: ClassVar[str] = "1"  # bump when the shipped vocabulary changes
    INPUTS: ClassVar[tuple[str, ...]] = ()
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    Config = ClipTagsConfig
    Output = ImageTags

    def __init__(self, config: ClipTagsConfig | None = None, **overrides: Any) -> None:
        self.config = config or ClipTagsConfig(**overrides)
        self._encoder: ClipEncoder | None = None
        self.tags_by_image: ImageMemo[ImageTags] = ImageMemo()

    def setup(self, runtime: Runtime) -> None:
        cfg = self.config
        self.tags_by_image = ImageMemo()
        self.vocabulary = load_tag_vocabulary(cfg.vocabulary)
        self._encoder = ClipEncoder.load(ModelRef(cfg.model, cfg.revision), runtime)
        prompts = [cfg.template.format(name) for name in self.vocabulary]
        self._vocabulary_features = self._encoder.encode_texts(prompts, cfg.batch_size)
        log.info(
            "clip tags: CLIP %s over %d names, top %d with p >= %g",
            cfg.model,
            len(self.vocabulary),
            cfg.top_k,
            cfg.threshold,
        )

    def run(self, batch: Sequence[StageInput]) -> list[ImageTags]:
        per_image, image_index = self.tags_by_image.values(batch, self.tag_images)
        return [ImageTags(tags=list(per_image[i].tags), scores=list(per_image[i].scores)) for i in image_index]

    @property
    def images_encoded(self) -> int:
        return self.tags_by_image.computed

    def tag_images(self, images: list) -> list[ImageTags]:
        """The tags of each decoded image, in order."""
        cfg, encoder = self.config, self._encoder
        assert encoder is not None
        image_features = encoder.encode_images(images, cfg.batch_size)
        logits = encoder.logit_scale * image_features @ self._vocabulary_features.T
        probabilities = torch.softmax(logits, dim=-1).cpu().numpy()
        chosen = [select_tags(p, self.vocabulary, cfg.top_k, cfg.threshold) for p in probabilities]
        return [ImageTags(tags=tags, scores=scores) for tags, scores in chosen]

    def cleanup(self) -> None:
        self._encoder = None
        self._vocabulary_features = None
        self.tags_by_image.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
