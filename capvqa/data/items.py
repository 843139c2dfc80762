"""The one record type every dataset loader yields and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageRef:
    """Where an item's image comes from, without loading it.

    Exactly one of ``path`` (a file on disk) or ``data`` (encoded image bytes, as Hugging Face datasets
    embed them) is set. Pixels are decoded lazily by :func:`capvqa.data.images.load_image`.
    """

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path or data")

    def describe(self) -> str:
        """A short human-readable origin for error messages."""
        return str(self.path) if self.path is not None else f"<{len(self.data or b'')} embedded bytes>"


@dataclass(frozen=True)
class VQAItem:
    """One question about one image, with its human answers when the split is annotated.

    ``answers`` holds the (usually 10) human answers in annotation order; it is empty for unannotated
    splits such as VQAv2 test-dev. For OK-VQA these are the stemmed ``answer`` fields (what papers score
    against); ``raw_answers`` keeps the unstemmed ones when the source has them.
    """

    question_id: int | str
    image_id: int | str
    question: str
    image: ImageRef
    answers: tuple[str, ...] = ()
    answer_type: str | None = None
    question_type: str | None = None
    raw_answers: tuple[str, ...] = ()

    @property
    def is_annotated(self) -> bool:
        return len(self.answers) > 0
