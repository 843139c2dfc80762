"""``RunSettings``: everything about a run that is not the pipeline config -- which data, where, how.

The CLI's ``capvqa run`` options map one to one onto these fields, and a run folder's ``config.yaml``
records them under ``run:``. Rerunning a saved config restores them (:meth:`RunSettings.restored_from`),
with explicitly given values winning. :meth:`RunSettings.validate` checks every option before any model
or dataset is loaded, so a typo never costs a finished stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from capvqa.errors import ConfigError

BAD_IMAGE_POLICIES = ("error", "skip")
# config.yaml's ``run:`` keeps the requested device/dtype as device_request/dtype_request, and the
# resolved ones ("cuda:0", "bfloat16") as device/dtype, which the report shows; only requests restore.
_RECORDED_NAMES = {"device": "device_request", "dtype": "dtype_request"}
_SAVED_NAMES = {v: k for k, v in _RECORDED_NAMES.items()}
_RESOLVED_ONLY = ("device", "dtype")
_DEFAULTS = {"device": "auto", "dtype": "auto", "lemmatize": "none", "on_bad_image": "error"}


@dataclass(frozen=True)
class RunSettings:
    """Every field defaults to None, "not given": :meth:`restored_from` fills such fields from a saved
    run, and :meth:`with_defaults` gives the rest their defaults (device and dtype ``auto``, no
    lemmatizer, stop at a bad image)."""

    dataset: str | None = None
    split: str | None = None
    data_root: str | None = None
    limit: int | None = None
    question_ids: tuple[int | str, ...] | None = None
    batch_size: int | None = None  # every stage's batch size (None: each stage's own)
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    lemmatize: str | None = None
    on_bad_image: str | None = None

    def with_defaults(self) -> RunSettings:
        return replace(self, **{name: value for name, value in _DEFAULTS.items() if getattr(self, name) is None})

    def validate(self) -> RunSettings:
        """Raise :class:`ConfigError` for a missing dataset or any invalid option; returns self."""
        if not self.dataset:
            raise ConfigError("a dataset is required (--dataset sample, vqav2, okvqa, hf:NAME or a folder)")
        return self.check_options()

    def check_options(self) -> RunSettings:
        """Raise :class:`ConfigError` for any invalid option; returns self. Loads nothing (the lemmatizer
        itself is built once, when the run starts)."""
        if self.limit is not None:
            _check_count("--limit", self.limit)
        if self.batch_size is not None:
            check_batch_size(self.batch_size)
        if self.question_ids is not None and not self.question_ids:
            raise ConfigError("--question-ids names no question; give comma-separated ids, e.g. 1,2,3")
        if self.on_bad_image is not None and self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"--on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {self.on_bad_image!r}")
        from capvqa.engine.runtime import check_device_and_dtype
        from capvqa.eval.lemmatize import LEMMATIZER_KINDS

        check_device_and_dtype(self.device, self.dtype)
        if self.lemmatize is not None and self.lemmatize not in LEMMATIZER_KINDS:
            raise ConfigError(f"unknown lemmatizer {self.lemmatize!r}; choose one of: {', '.join(LEMMATIZER_KINDS)}")
        return self

    def restored_from(self, saved: Mapping[str, Any] | None) -> RunSettings:
        """These settings with every field not given (None) taken from a saved run's ``run:`` section
        (what ``capvqa run runs/x`` restores). Given fields win, whatever their value."""
        if not saved:
            return self
        values = {_SAVED_NAMES.get(k, k): v for k, v in saved.items() if k not in _RESOLVED_ONLY}
        restored = {}
        for f in fields(RunSettings):
            if getattr(self, f.name) is None and values.get(f.name) is not None:
                value = values[f.name]
                restored[f.name] = tuple(value) if f.name == "question_ids" else value
        return replace(self, **restored)

    def to_dict(self) -> dict[str, Any]:
        """The non-empty settings, as recorded under ``run:`` in a run folder's config.yaml (the
        pipeline adds the resolved ``device`` and ``dtype`` beside the requested ones)."""
        out = {_RECORDED_NAMES.get(k, k): v for k, v in asdict(self).items() if v is not None}
        if "question_ids" in out:
            out["question_ids"] = list(out["question_ids"])
        return out

    def open_dataset(self) -> Any:
        """The dataset these settings name (streamed; images decode lazily)."""
        from capvqa.data.datasets import open_dataset

        return open_dataset(
            str(self.dataset), split=self.split, data_root=Path(self.data_root).expanduser() if self.data_root else None,
            limit=self.limit, question_ids=list(self.question_ids) if self.question_ids else None,
        )


def check_batch_size(value: object) -> None:
    _check_count("--batch-size", value)


def _check_count(flag: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")


def parse_question_ids(text: str | Sequence[int | str]) -> tuple[int | str, ...]:
    """``"1,2,abc"`` -> ``(1, 2, "abc")`` (VQAv2 ids are ints, Hugging Face OK-VQA ids strings)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    ids: list[int | str] = []
    for part in parts:
        token = str(part).strip()
        if token:
            ids.append(int(token) if token.lstrip("-").isdigit() else token)
    return tuple(ids)
