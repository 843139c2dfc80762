"""The stage interface every pipeline step implements.

A stage is a frozen dataclass config plus a class with ``setup(runtime)`` (load weights once),
``run(batch)`` (one output record per input, aligned) and ``cleanup()``. The engine (``runner.py``)
owns caching, batching, ordering and progress; stages only compute. :class:`Stage` states the whole
contract; :func:`capvqa.engine.registry.check_stage_class` checks it for every class a config names,
and a test checks it for every ``type:`` in ``pipelines/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from capvqa.data.items import VQAItem
from capvqa.engine.runtime import Runtime


def non_semantic(default: Any) -> Any:
    """Mark a config field that cannot change results (batch sizes, chunking): it stays out of the
    cache key, so changing it never recomputes anything."""
    return field(default=default, metadata={"semantic": False})


def semantic_config(config: Any) -> dict[str, Any]:
    """The config fields that can change a stage's output (what goes into its cache key)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("semantic", True)
    }


@dataclass(frozen=True)
class StageInput:
    """One item as a stage sees it: the dataset record, its cache identity, and upstream results.

    ``item_key`` identifies (image content, question); stages derive per-item random streams from it so
    an item's result does not depend on which items share its batch. ``content_sha256`` is set by the
    engine: the hash of the image bytes the keys were made from, which a stage decoding the image checks
    (:func:`capvqa.data.images.distinct_images`, :class:`capvqa.data.image_memo.ImageMemo`, which also
    keeps values across batches by it), so a file replaced mid-run never gets results under the
    old content's keys; hand-made inputs leave it None.

    ``neighbours`` holds, for each of the stage's ``NEIGHBOUR_INPUTS``, that input's upstream result for
    the *next* item of the run (see :class:`Stage`); empty for other stages and for hand-made inputs.
    """

    item: VQAItem
    item_key: str
    image_hash: str
    upstream: dict[str, Any] = field(default_factory=dict)
    content_sha256: str | None = None
    neighbours: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetContext:
    """The dataset a pipeline runs on, as a stage's :meth:`Stage.resolve_params` sees it.

    ``spec`` is the ``open_dataset`` spec string ("sample", "okvqa", "hf:NAME", a folder path);
    ``data_root`` the root of official files, when one was given.
    """

    spec: str | None = None
    split: str | None = None
    data_root: str | None = None


@runtime_checkable
class Stage(Protocol):
    """What the engine needs from a stage.

    Class attributes:

    - ``NAME``: the cache namespace, shared by every pipeline that uses the stage;
    - ``VERSION``: bump to invalidate old cache entries on purpose (an instance may set its own when
      only some configurations changed, as the LLM stage does for Img2LLM's answer rules);
    - ``INPUTS``: names of the upstream results ``run`` reads from ``StageInput.upstream``;
    - ``MODEL_FIELDS``: config fields that hold model ids (their resolved revisions enter the cache key);
    - ``Config``: a *frozen* dataclass of every setting; its semantic fields form the cache key, so it
      must not change after construction. It has a non-semantic ``batch_size`` (:func:`non_semantic`);
    - ``Output``: the dataclass ``run`` returns per item. The stage a pipeline names as its ``answer``
      must have ``answer: str`` in its Output.

    Optional:

    - ``cost(input) -> int``: the engine then runs the longest items first, so padding is small and an
      out-of-memory error shows at once;
    - ``images_encoded``: an int attribute or property, how many images the stage encoded since ``setup``
      (a stage keeping recent images' encodings, :mod:`capvqa.data.image_memo`, encodes fewer than its
      batches hold); the engine reports it in the stage's statistics;
    - ``model_fingerprints(cache_dir=None) -> dict[str, str]``: what identifies the stage's models (and any other
      dataset-level state it reads) in the cache key, when ``MODEL_FIELDS`` alone does not say it;
    - classmethod ``resolve_params(params, dataset: DatasetContext) -> params``: settings that depend on
      the run's dataset, resolved to concrete values before the config is built (and so recorded in the
      run's ``config.yaml``);
    - ``INPUT_FIELDS = {input: (field, ...)}``: the upstream Output fields ``run`` reads, checked against
      the wired stage when the config loads; ``OPTIONAL_INPUTS``: inputs that may be left unwired;
    - ``CONSUMER_FIELDS = {own field: reader's field}``: settings taken from the config of the stage that
      reads this one's output, so they are stated once (Img2LLM's prompt budget is the LLM's);
    - classmethod ``check_pipeline(config, upstream)``: a cross-stage check run when the config loads,
      before any model (``upstream`` maps each input to its stage's class and config);
    - ``NEIGHBOUR_INPUTS = (input, ...)``: inputs (a subset of ``INPUTS``) whose upstream result ``run``
      also reads for the *neighbour* of each item, delivered as ``StageInput.neighbours[input]``
      (Img2LLM's authors' prompt shows the next item's yes-question). An instance may narrow the tuple
      in ``__init__`` (set ``self.NEIGHBOUR_INPUTS`` to a subset) when its config does not need them;
    - ``bind_dtype(dtype, device) -> dtype``: the precision the stage's model will run in, when it is not
      the run's (Img2LLM's LLM runs in float16 on CUDA, as its authors ran it); that precision is the one
      in the stage's cache key.

    Neighbours, as the engine defines them (:mod:`capvqa.engine.runner`): the neighbour of an item is the
    next item of the run's whole item sequence (after ``--limit`` / ``--question-ids`` selection), in
    dataset order, wrapping from the last item to the first; items skipped for a bad image before the
    stage starts are passed over (the next item that is not skipped; a one-item run is its own
    neighbour). The map is built over the whole sequence when the stage starts, so batch size, the
    runner's windows, ``torchrun`` shards and resumed runs all see the same neighbour; under
    ``torchrun`` every rank first waits for all ranks to finish the earlier stages. The neighbour's
    upstream cache key enters the stage's cache key, so a changed neighbour recomputes the item (and,
    through the key chain, every later stage of it). Question ids must be unique in the run.

    :mod:`capvqa.engine.config` applies all of these; nothing of them loads a model.
    """

    NAME: ClassVar[str]
    VERSION: ClassVar[str]
    INPUTS: ClassVar[tuple[str, ...]]
    MODEL_FIELDS: ClassVar[tuple[str, ...]]
    Config: ClassVar[type]
    Output: ClassVar[type]
    config: Any

    def setup(self, runtime: Runtime) -> None: ...

    def run(self, batch: Sequence[StageInput]) -> list[Any]: ...

    def cleanup(self) -> None: ...
