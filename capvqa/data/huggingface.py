"""Loader for VQA datasets in Hugging Face ``datasets`` form, images embedded.

Two schemas are understood, detected from the features (not from the dataset's name, so copies and
local exports work too):

``vqav2`` — as ``lmms-lab/VQAv2`` (splits validation / testdev / test)::

    question_id int, question str, image_id int, image Image, question_type str, answer_type str,
    multiple_choice_answer str, answers [{answer str, answer_confidence str, answer_id int}]

``okvqa`` — as ``lmms-lab/OK-VQA`` (split val2014)::

    question_id str, question str, image Image, question_type str, answer_type str, answers [str]

``lmms-lab/OK-VQA`` has no ``image_id``; OK-VQA numbers its questions ``image_id * 10 + k``, so a numeric
question id gives the image id (a non-numeric one is used as its own image id). Its question ids stay
strings as stored; :func:`capvqa.data.official.normalize_id` makes ``"2971475"`` and ``2971475`` select
the same item.

Sources: a hub name (``datasets.load_dataset(name, split=...)``; a small ``limit`` streams just those
rows instead of downloading the split), a local ``save_to_disk`` folder (``datasets.load_from_disk``),
or local parquet files (``datasets.load_dataset("parquet", data_files=...)``). The image column is cast
to ``Image(decode=False)`` so items carry the encoded bytes and nothing is decoded until a stage asks.
``datasets`` is imported inside the functions: it takes seconds to import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capvqa.data.items import ImageRef, VQAItem
from capvqa.data.official import ItemId, check_limit, normalize_id
from capvqa.errors import DataError

if TYPE_CHECKING:
    import datasets

VQAV2_SCHEMA = "vqav2"
OKVQA_SCHEMA = "okvqa"

#: Split picked when none is given, in order of preference: the annotated evaluation split.
DEFAULT_SPLITS = ("validation", "val2014", "val")

#: At most this many rows are streamed from the hub (and held, encoded, in memory) when a ``limit``
#: asks for only a few; beyond it the split is downloaded once into the ``datasets`` cache, because
#: each stage iterates the dataset again and a stream would be fetched again each time.
STREAM_LIMIT = 1000

_REQUIRED_COLUMNS = ("question_id", "question", "image")
_MAX_IDS_IN_MESSAGE = 10
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z][\w.]*?)-\d+-of-\d+$")


# ------------------------------------------------------------------------------ pure: schema & rows


def detect_schema(features: Mapping[str, Any], *, source: str) -> str:
    """``"vqav2"`` when answers are objects, ``"okvqa"`` when they are strings (or absent)."""
    missing = [name for name in _REQUIRED_COLUMNS if name not in features]
    if missing:
        raise DataError(
            f"{source} is not a VQA dataset: it lacks the column(s) {missing} (columns: "
            f"{sorted(features)}). Expected the lmms-lab/VQAv2 or lmms-lab/OK-VQA schema."
        )
    image_feature = features["image"]
    if type(image_feature).__name__ != "Image":
        raise DataError(
            f"{source}: column 'image' must be a datasets Image feature with the images embedded, got "
            f"{image_feature!r}."
        )
    if "answers" not in features:
        return VQAV2_SCHEMA if "image_id" in features else OKVQA_SCHEMA
    inner = _inner_feature(features["answers"])
    if isinstance(inner, Mapping):
        if "answer" not in inner:
            raise DataError(
                f"{source}: column 'answers' holds objects without an 'answer' field ({sorted(inner)})."
            )
        return VQAV2_SCHEMA
    if getattr(inner, "dtype", None) in ("string", "large_string"):
        return OKVQA_SCHEMA
    raise DataError(
        f"{source}: column 'answers' must be a list of strings (OK-VQA) or of objects with an 'answer' "
        f"field (VQAv2), got {features['answers']!r}."
    )


def row_to_item(row: Mapping[str, Any], schema: str, *, source: str) -> VQAItem:
    """One dataset row (image column not decoded) -> :class:`VQAItem`."""
    question_id = row.get("question_id")
    if question_id is None or isinstance(question_id, bool) or question_id == "":
        raise DataError(f"{source}: a row has no question_id ({_short(row)})")
    question = row.get("question")
    if not isinstance(question, str):
        raise DataError(f"{source}: question {question_id}: 'question' must be a string, got {question!r}")
    if not question.strip():
        raise DataError(f"{source}: question {question_id}: the question text is empty; fix or remove it")
    answers = _answers(row.get("answers"), schema, question_id=question_id, source=source)
    return VQAItem(
        question_id=question_id,
        image_id=_image_id(row, schema, question_id),
        question=question,
        image=_image_ref(row.get("image"), question_id=question_id, source=source),
        answers=answers,
        answer_type=row.get("answer_type") or None,
        question_type=row.get("question_type") or None,
    )


def _inner_feature(feature: Any) -> Any:
    if isinstance(feature, list):  # the old ``[{...}]`` spelling of a list feature
        return feature[0] if feature else None
    return getattr(feature, "feature", None)


def _answers(value: Any, schema: str, *, question_id: ItemId, source: str) -> tuple[str, ...]:
    """A row's answers; ``()`` when it has none (``None`` or an empty list: how test splits look).

    Answers that are all empty strings are an error, like an empty question: they would be scored as
    if the humans had answered "". Whether a row without answers is allowed depends on the rest of the
    split; :func:`check_answers` decides that.
    """
    if value is None:
        return ()
    if schema == VQAV2_SCHEMA and isinstance(value, Mapping):  # a ``Sequence`` of dicts: a dict of lists
        value = value.get("answer") or []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise DataError(f"{source}: question {question_id}: 'answers' must be a list, got {value!r}")
    if schema == VQAV2_SCHEMA:
        value = [a.get("answer") if isinstance(a, Mapping) else None for a in value]
    answers = tuple(value)
    if not all(isinstance(a, str) for a in answers):
        raise DataError(f"{source}: question {question_id}: every answer must be a string, got {answers!r}")
    if answers and not any(a.strip() for a in answers):
        raise DataError(
            f"{source}: question {question_id}: every answer is an empty string; give the question's human "
            "answers, or remove the row"
        )
    return answers


def check_answers(rows: Iterable[Mapping[str, Any]], schema: str, *, source: str) -> bool:
    """Whether the split is annotated: every row has answers (True) or none has (False, a test split).

    A split where only some rows lack answers is an error naming them: their items would count as
    unannotated, which turns scoring off for the whole run while the other questions are still reported.
    Each row's answers are also checked as :func:`row_to_item` checks them, so a bad one fails here, at
    load time, rather than in the middle of a run.
    """
    annotated = 0
    without: list[ItemId] = []
    for row in rows:
        question_id = row.get("question_id")
        if _answers(row.get("answers"), schema, question_id=question_id, source=source):
            annotated += 1
        else:
            without.append(question_id)
    if annotated and without:
        shown = ", ".join(str(i) for i in without[:_MAX_IDS_IN_MESSAGE])
        more = len(without) - _MAX_IDS_IN_MESSAGE
        raise DataError(
            f"{source}: {len(without)} question(s) have no answers (an empty or missing 'answers'): question "
            f"ids {shown}" + (f" and {more} more" if more > 0 else "") + f", while {annotated} other(s) "
            "have. Every question of an annotated split needs its human answers; fix or remove those rows."
        )
    return annotated > 0


def _image_id(row: Mapping[str, Any], schema: str, question_id: ItemId) -> ItemId:
    image_id = row.get("image_id")
    if image_id is not None:
        return image_id
    key = normalize_id(question_id)
    if schema == OKVQA_SCHEMA and isinstance(key, int):
        return key // 10
    return question_id


def _image_ref(value: Any, *, question_id: ItemId, source: str) -> ImageRef:
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return ImageRef(data=value["bytes"])
        if value.get("path"):
            return ImageRef(path=Path(value["path"]))
    raise DataError(
        f"{source}: question {question_id} has no image (neither embedded bytes nor a path). Re-export "
        "the dataset with the images embedded."
    )


def _short(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}"[:60] for k, v in row.items() if k != "image")


# ---------------------------------------------------------------------------------- the item source


class HuggingFaceSource:
    """Rows of one split (an Arrow ``datasets.Dataset`` or a list of streamed rows) as items.

    An Arrow dataset is memory-mapped, so re-iterating it per stage costs no download and no memory.
    """

    def __init__(self, rows: Any, schema: str, *, split: str | None, source: str, has_annotations: bool) -> None:
        """``has_annotations``: whether every row has answers, as :func:`check_answers` found."""
        self._rows = rows
        self.schema = schema
        self.split = split
        self.source = source
        self.has_annotations = has_annotations

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[VQAItem]:
        for row in self._rows:
            yield row_to_item(row, self.schema, source=self.source)

    def text_records(self) -> Iterator[dict[str, Any]]:
        """Every row without its image column, for a content fingerprint that reads no image bytes."""
        if isinstance(self._rows, list):
            for row in self._rows:
                yield {key: value for key, value in row.items() if key != "image"}
            return
        columns = [name for name in self._rows.column_names if name != "image"]
        for batch in self._rows.select_columns(columns).iter(batch_size=4096):
            for values in zip(*(batch[name] for name in columns)):
                yield dict(zip(columns, values))


def load_huggingface(
    source: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    question_ids: Iterable[ItemId] | None = None,
) -> HuggingFaceSource:
    """Load a hub dataset name, a ``save_to_disk`` folder, or parquet file(s); see the module docstring.

    ``split`` defaults to the first of :data:`DEFAULT_SPLITS` the source has (or its only split).
    """
    limit = check_limit(limit)
    path = Path(source).expanduser()
    if path.exists():
        table, split = _load_local(path, split)
    elif _looks_like_hub_name(source):
        if limit is not None and limit <= STREAM_LIMIT and question_ids is None:
            rows, split = _stream_hub(source, split, limit)
            schema = detect_schema(_features_of(rows, source), source=source)
            annotated = check_answers(rows.rows, schema, source=source)
            return HuggingFaceSource(rows.rows, schema, split=split, source=source, has_annotations=annotated)
        table, split = _load_hub(source, split)
    else:
        raise DataError(
            f"Hugging Face dataset source {source!r} is neither an existing local path nor a hub name "
            "like 'lmms-lab/VQAv2'."
        )
    schema = detect_schema(table.features, source=source)
    # the whole split, not just the selection: a subset of unannotated rows must not pass for a test split
    annotated = check_answers(_answer_rows(table), schema, source=source)
    table = _undecoded(table)
    table = _select(table, limit=limit, question_ids=question_ids, source=source)
    return HuggingFaceSource(table, schema, split=split, source=source, has_annotations=annotated)


# ---------------------------------------------------------------------------------------- loading


def _load_local(path: Path, split: str | None) -> tuple[datasets.Dataset, str | None]:
    import datasets

    if path.is_dir() and (path / "dataset_dict.json").is_file():
        loaded = _call(datasets.load_from_disk, str(path), source=str(path))
        name = _pick_split(list(loaded.keys()), split, source=str(path))
        return loaded[name], name
    if path.is_dir() and (path / "state.json").is_file():
        loaded = _call(datasets.load_from_disk, str(path), source=str(path))
        return loaded, split if split is not None else (loaded.split and str(loaded.split))
    files, split = _parquet_files(path, split)
    loaded = _call(
        datasets.load_dataset, "parquet", data_files={"data": files}, split="data", source=str(path)
    )
    return loaded, split


def _parquet_files(path: Path, split: str | None) -> tuple[list[str], str | None]:
    """A parquet file, or the parquet files of a folder, keeping those named after the split.

    Hub snapshots name shards ``{split}-00000-of-00068.parquet`` (under ``data/``); a folder without
    such names is taken as one split.
    """
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(
                f"{path} is not a Hugging Face dataset: expected a .parquet file, a folder of parquet "
                "files or a datasets.save_to_disk folder."
            )
        return [str(path)], split
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(
            f"{path} is not a Hugging Face dataset: it has no parquet files, no dataset_dict.json and "
            "no state.json (a datasets.save_to_disk folder)."
        )
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of_shard(file, path), []).append(file)
    named = sorted(k for k in by_split if k)
    if not named:
        return [str(f) for f in files], split
    chosen = _pick_split(named, split, source=str(path))
    return [str(f) for f in by_split[chosen]], chosen


def _split_of_shard(file: Path, root: Path) -> str:
    """``validation`` for ``validation-00000-of-00068.parquet`` or ``val2014/0000.parquet``, else ``""``."""
    match = _SHARD_NAME.match(file.stem)
    if match:
        return match.group("split")
    if file.stem.isdigit() and file.parent != root:
        return file.parent.name
    return ""


def _load_hub(name: str, split: str | None) -> tuple[datasets.Dataset, str]:
    import datasets

    if split is None:
        names = _call(datasets.get_dataset_split_names, name, source=name)
        split = _pick_split(list(names), None, source=name)
    return _call(datasets.load_dataset, name, split=split, source=name), split


class _Streamed:
    def __init__(self, rows: list[dict[str, Any]], features: Any) -> None:
        self.rows = rows
        self.features = features


def _stream_hub(name: str, split: str | None, limit: int) -> tuple[_Streamed, str]:
    import datasets

    if split is None:
        names = _call(datasets.get_dataset_split_names, name, source=name)
        split = _pick_split(list(names), None, source=name)
    stream = _call(datasets.load_dataset, name, split=split, streaming=True, source=name)
    if stream.features is not None and "image" in stream.features:
        stream = stream.cast_column("image", datasets.Image(decode=False))
    rows = _call(lambda: list(stream.take(limit)), source=name)
    return _Streamed(rows, stream.features), split


def _features_of(streamed: _Streamed, source: str) -> Any:
    if streamed.features is None:
        raise DataError(f"{source}: the hub did not report the dataset's features; cannot detect its schema.")
    return streamed.features


def _answer_rows(table: datasets.Dataset) -> Iterator[dict[str, Any]]:
    """``question_id`` and ``answers`` of every row, read column-wise (about 1 s per 200k VQAv2 rows)."""
    if "answers" not in table.column_names:
        return
    for batch in table.select_columns(["question_id", "answers"]).iter(batch_size=4096):
        for question_id, answers in zip(batch["question_id"], batch["answers"]):
            yield {"question_id": question_id, "answers": answers}


def _undecoded(table: datasets.Dataset) -> datasets.Dataset:
    import datasets

    return table.cast_column("image", datasets.Image(decode=False))


def _select(
    table: datasets.Dataset,
    *,
    limit: int | None,
    question_ids: Iterable[ItemId] | None,
    source: str,
) -> datasets.Dataset:
    """Explicit id subset in dataset order, then the first ``limit`` rows (the official semantics)."""
    if question_ids is not None:
        wanted = {normalize_id(i): i for i in question_ids}
        indices: list[int] = []
        found: set[ItemId] = set()
        for index, question_id in enumerate(table["question_id"]):
            key = normalize_id(question_id)
            if key in wanted:
                indices.append(index)
                found.add(key)
        unknown = [original for key, original in wanted.items() if key not in found]
        if unknown:
            shown = ", ".join(str(i) for i in unknown[:_MAX_IDS_IN_MESSAGE])
            more = len(unknown) - _MAX_IDS_IN_MESSAGE
            raise DataError(
                f"{source} has no question ids {shown}" + (f" and {more} more" if more > 0 else "")
            )
        table = table.select(indices)
    if limit is not None and limit < len(table):
        table = table.select(range(limit))
    return table


def _pick_split(available: Sequence[str], requested: str | None, *, source: str) -> str:
    if requested is not None:
        if requested not in available:
            raise DataError(f"{source} has no split {requested!r}; its splits are {sorted(available)}.")
        return requested
    for name in DEFAULT_SPLITS:
        if name in available:
            return name
    if len(available) == 1:
        return available[0]
    raise DataError(f"{source} has several splits {sorted(available)}; choose one with split=.")


def _looks_like_hub_name(source: str) -> bool:
    parts = source.split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not source.startswith((".", "~"))
        and not any(p.endswith(".parquet") for p in parts)
    )


def _call(function: Any, *args: Any, source: str, **kwargs: Any) -> Any:
    """Run a ``datasets`` call, turning its failures (offline, no such dataset) into a DataError."""
    try:
        return function(*args, **kwargs)
    except DataError:
        raise
    except Exception as error:  # datasets raises many unrelated types for one cause
        raise DataError(
            f"Could not load the Hugging Face dataset {source!r}: {type(error).__name__}: {error}. "
            "Hub datasets need network access (or the datasets cache); for offline use pass a local "
            "save_to_disk folder or parquet files."
        ) from error
