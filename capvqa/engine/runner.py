"""The generic cached runner: for each stage, look up every item, run only the misses in sorted
batches, commit each batch atomically.

Stages run one after another over the whole dataset (stage-major): only one stage's model is in memory
at a time, each stage batches freely, and a later stage reads its inputs back from the cache. Items are
streamed in windows, so memory does not grow with the dataset. A crash loses at most the batch in
flight; a rerun finds everything else in the cache.

A stage may also read an input's result for the *next* item (``NEIGHBOUR_INPUTS``, see
:class:`capvqa.engine.stage.Stage`): when such a stage starts, one pass over the run's whole item
sequence maps every question id to the next item not skipped so far, wrapping at the end
(:class:`NeighbourRing`: the ids and item keys, a few hundred bytes per item). Windows, batches and
shards only look things up in that map, so they all see the same neighbour, and the neighbour's upstream
key enters the stage's cache key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capvqa.data.items import VQAItem
from capvqa.engine.codec import decode_record, encode_record
from capvqa.engine.keys import item_fingerprint, sha256_hex, stage_fingerprint, stage_item_key
from capvqa.engine.registry import neighbour_inputs_problems
from capvqa.engine.runtime import Runtime
from capvqa.engine.stage import StageInput, semantic_config
from capvqa.engine.store import CacheStore
from capvqa.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

WINDOW_BATCHES = 16
BAD_IMAGE_POLICIES = ("error", "skip")
# Diagnostic: when set, every committed batch appends {"stage", "pid", "keys"} to this file, so tests and
# users can audit that no finished item was ever computed twice (the cache ignores duplicate writes).
COMMIT_LOG_ENV = "CAPVQA_COMMIT_LOG"
# A neighbour's upstream key enters a stage's key as input "NAME@next"; "@" is refused in the input names
# of a stage that reads neighbours, so the entry cannot collide with an input.
NEIGHBOUR_KEY_SUFFIX = "@next"


def revision_field(model_field: str) -> str:
    """The config field holding a model field's hub revision: model -> revision, clip_model ->
    clip_revision, llm -> llm_revision."""
    if model_field == "model":
        return "revision"
    return model_field.removesuffix("_model") + "_revision"


def default_model_fingerprints(stage: Any) -> dict[str, str]:
    """Fingerprints of the hub ids / local folders in a stage's ``MODEL_FIELDS``."""
    from capvqa.models.loading import ModelRef, model_fingerprint

    config = stage.config
    single = len(stage.MODEL_FIELDS) == 1
    models = {}
    for field_name in stage.MODEL_FIELDS:
        model_id = getattr(config, field_name, None)
        if not model_id:
            continue
        revision_name = revision_field(field_name)
        if single and not hasattr(config, revision_name):
            revision_name = "revision"  # a stage with one model may call its revision just "revision"
        models[field_name] = model_fingerprint(ModelRef(model_id, getattr(config, revision_name, None)))
    return models


@dataclass
class BoundStage:
    """A stage object placed in a pipeline: its name there, where its inputs come from, its key part."""

    name: str
    stage: Any
    inputs: dict[str, str]
    fingerprint: str
    neighbour_inputs: tuple[str, ...] = ()  # inputs also read for the next item (the stage's NEIGHBOUR_INPUTS)

    @classmethod
    def create(
        cls, name: str, stage: Any, inputs: dict[str, str], dtype: str | None = None, cache_dir: Path | None = None,
        device: str | None = None,
    ) -> BoundStage:
        """``dtype`` (the run's model precision) enters the key of stages that run a model: bf16 and
        fp32 results differ by more than rounding, so they must not be mixed in the cache. ``cache_dir``
        is the run's cache, where a stage's ``model_fingerprints`` may keep memos (PICa's pool).

        A stage that runs its model in a precision of its own (the LLM stage's ``cuda_dtype``) has a
        ``bind_dtype(dtype, device)`` hook: given the run's dtype and device type ("cuda", "cpu"; None
        when unknown) it returns the dtype it will run in, and keeps it for ``setup``; that dtype is the
        one keyed."""
        config = stage.config
        bind_dtype = getattr(stage, "bind_dtype", None)
        if callable(bind_dtype):
            dtype = bind_dtype(dtype, device)
        own = getattr(stage, "model_fingerprints", None)  # a stage whose "model" is not a hub/local model
        models = dict(own(cache_dir=cache_dir)) if callable(own) else default_model_fingerprints(stage)
        if dtype and any(not m.startswith("api:") for m in models.values()):  # local weights only
            models["dtype"] = dtype
        fingerprint = stage_fingerprint(f"{stage.NAME}", stage.VERSION, semantic_config(config), models)
        return cls(name=name, stage=stage, inputs=dict(inputs), fingerprint=fingerprint,
                   neighbour_inputs=_neighbour_inputs(name, stage, inputs))


def _neighbour_inputs(name: str, stage: Any, inputs: dict[str, str]) -> tuple[str, ...]:
    """The stage's ``NEIGHBOUR_INPUTS`` (as the instance states them), checked against its wiring."""
    neighbours = getattr(stage, "NEIGHBOUR_INPUTS", ())
    problems = neighbour_inputs_problems(type(stage), neighbours)
    if problems:
        raise ConfigError(f"stage {name!r}: {problems[0]}")
    if not neighbours:
        return ()
    unwired = [n for n in neighbours if n not in inputs]
    if unwired:
        raise ConfigError(f"stage {name!r} reads inputs {unwired} for neighbouring items, but they are not wired "
                          f"(inputs: {sorted(inputs)})")
    odd = [n for n in inputs if NEIGHBOUR_KEY_SUFFIX[0] in n]
    if odd:
        raise ConfigError(f"stage {name!r}: input names {odd} may not contain {NEIGHBOUR_KEY_SUFFIX[0]!r} (a stage "
                          "reading neighbours keys their results under NAME@next)")
    return tuple(neighbours)


@dataclass
class StageStats:
    name: str
    stage_type: str
    items: int = 0
    computed: int = 0
    cached: int = 0
    batches: int = 0
    setup_seconds: float = 0.0
    compute_seconds: float = 0.0
    wall_seconds: float = 0.0
    oom_splits: int = 0
    # distinct images among each computed batch's items, summed over batches: how many images a stage
    # would encode if it encoded each distinct image of a batch once
    batch_images: int = 0
    # how many images the stage did encode (its optional ``images_encoded``; fewer than batch_images when it
    # keeps recent images' encodings across batches, capvqa/data/image_memo.py); None when it does not say
    images_encoded: int | None = None

    def to_json(self) -> dict[str, Any]:
        per_item = self.compute_seconds / self.computed if self.computed else None
        return {
            "stage": self.stage_type,
            "items": self.items,
            "computed": self.computed,
            "cached": self.cached,
            "batches": self.batches,
            "setup_seconds": round(self.setup_seconds, 4),
            "compute_seconds": round(self.compute_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 4),
            "oom_splits": self.oom_splits,
            "batch_images": self.batch_images,
            "images_encoded": self.images_encoded,
            "seconds_per_computed_item": round(per_item, 6) if per_item is not None else None,
            "computed_items_per_second": round(self.computed / self.compute_seconds, 4)
            if self.compute_seconds > 0
            else None,
        }


def merge_rank_stats(per_rank: list[list[StageStats]]) -> list[StageStats]:
    """Stage statistics of a data-parallel run: counts add up, times are the slowest rank's."""
    merged = []
    for stage_stats in zip(*per_rank):
        first = stage_stats[0]
        merged.append(StageStats(
            name=first.name, stage_type=first.stage_type,
            items=sum(s.items for s in stage_stats), computed=sum(s.computed for s in stage_stats),
            cached=sum(s.cached for s in stage_stats), batches=sum(s.batches for s in stage_stats),
            setup_seconds=max(s.setup_seconds for s in stage_stats),
            compute_seconds=max(s.compute_seconds for s in stage_stats),
            wall_seconds=max(s.wall_seconds for s in stage_stats),
            oom_splits=sum(s.oom_splits for s in stage_stats),
            batch_images=sum(s.batch_images for s in stage_stats),
            images_encoded=None if any(s.images_encoded is None for s in stage_stats)
            else sum(s.images_encoded for s in stage_stats),
        ))
    return merged


@dataclass
class KeyedItem:
    item: VQAItem
    image_hash: str
    item_key: str
    keys: dict[str, str] = field(default_factory=dict)
    # stage name -> {neighbour input: the next item's key of that input's source}
    neighbour_keys: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class NeighbourRing:
    """The run's items in dataset order, minus those skipped when it was built: each item's neighbour is
    the next one, and the last item's is the first (a one-item run is its own neighbour)."""

    question_ids: list[str]
    item_keys: list[str]
    position: dict[str, int]

    def next_of(self, question_id: str) -> tuple[str, str] | None:
        """(question id, item key) of the item after ``question_id``; None if it is not in the ring."""
        index = self.position.get(question_id)
        if index is None:
            return None
        following = (index + 1) % len(self.question_ids)
        return self.question_ids[following], self.item_keys[following]


class ImageHasher:
    """Content hashes (SHA-256 of the encoded bytes) of item images, memoised in the cache for files.

    What the memo trusts: a file is not read again when the path resolves to a file whose device, inode,
    size, mtime and ctime (ns) all equal those recorded when it was hashed
    (:func:`capvqa.engine.store.file_signature`). Rewriting a file in place changes its ctime even when
    the writer puts the mtime back with ``utime`` (no user-space call sets ctime), and replacing it
    (rename, copy over, a re-pointed symlink) changes the inode. File times are stamped at a clock tick,
    so a rewrite within the same tick could keep every field: a file changed less than
    :attr:`UNSETTLED_SECONDS` before it was hashed, or that changed while it was read, is not memoised
    (it is hashed again next time). Not seen: a rewrite on a filesystem that keeps no ctime or no stable
    inode numbers (some FUSE and network mounts), or one that forges a ctime by setting the system clock
    back. A memo hit is not confirmed by reading the file: that read is the cost the memo exists to save
    (the whole image set on every rerun).

    Within one hasher (one run) each path is hashed once, so every stage of a run keys an item by the
    same version of its image.
    """

    #: Files changed more recently than this (ctime) when hashed are not memoised.
    UNSETTLED_SECONDS = 2.0

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self._recent: dict[str, str] = {}
        self._seeded: dict[str, str] = {}  # by question id: hashes another rank computed

    def seed(self, hashes: dict[str, str]) -> None:
        """Take these image hashes (by question id) as computed: rank 0 keys the items other nodes ran
        by the hashes those nodes sent with their results, instead of reading every image again
        (:mod:`capvqa.engine.result_exchange`)."""
        self._seeded.update(hashes)

    def __call__(self, item: VQAItem) -> str:
        import stat

        from capvqa.data.images import image_content_hash

        seeded = self._seeded.get(str(item.question_id))
        if seeded is not None:
            return seeded
        ref = item.image
        if ref.data is not None:
            return sha256_hex(ref.data)
        path = str(ref.path)
        if path in self._recent:
            return self._recent[path]
        try:
            before = ref.path.stat()  # type: ignore[union-attr]  # follows symlinks: the file that is read
        except OSError:
            return image_content_hash(ref)  # raises the loader's clear error for a missing file
        if not stat.S_ISREG(before.st_mode):
            return image_content_hash(ref)  # raises the loader's error for a FIFO, device or folder
        digest = self.store.lookup_image_hash(path, before)
        if digest is None:
            started_ns = time.time_ns()
            digest = image_content_hash(ref)
            if self._settled(ref.path, before, started_ns):  # type: ignore[arg-type]
                self.store.remember_image_hash(path, before, digest)
        if len(self._recent) > 4096:
            self._recent.clear()
        self._recent[path] = digest
        return digest

    def _settled(self, path: os.PathLike, before: os.stat_result, started_ns: int) -> bool:
        """Whether the hash just computed may be memoised: the file is unchanged since ``before`` (so the
        bytes hashed are the version recorded) and its last change is older than UNSETTLED_SECONDS."""
        from capvqa.engine.store import file_signature

        try:
            after = os.stat(path)
        except OSError:
            return False
        if file_signature(after) != file_signature(before):
            return False
        return started_ns - before.st_ctime_ns > self.UNSETTLED_SECONDS * 1e9


@dataclass(frozen=True)
class SkippedItem:
    """An item left out under ``on_bad_image='skip'``: it gets no prediction and counts as missing."""

    question_id: Any
    image_id: Any
    stage: str
    reason: str


def _items_with_bad_images(batch: Sequence[StageInput]) -> dict[int, DataError]:
    """Which inputs' images fail to load (decoding each alone: only done after a batch failed)."""
    from capvqa.data.images import load_image

    bad: dict[int, DataError] = {}
    for i, entry in enumerate(batch):
        try:
            load_image(entry.item.image, expected_sha256=entry.content_sha256)
        except DataError as error:
            bad[i] = error
    return bad


def _images_encoded(stage: Any) -> int | None:
    """The stage's optional ``images_encoded`` count; anything but an int is ignored with a warning, so a
    stage that got it wrong cannot fail a run whose results are already committed."""
    encoded = getattr(stage, "images_encoded", None)
    if encoded is None or (isinstance(encoded, int) and not isinstance(encoded, bool)):
        return encoded
    log.warning("%s.images_encoded should be an int property, not %r; not reported",
                type(stage).__name__, type(encoded).__name__)
    return None


def _is_out_of_memory(error: Exception) -> bool:
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_order(image_keys: Sequence[str], costs: Sequence[float] | None = None) -> list[int]:
    """The order a window's misses are batched in: the questions of one image side by side, so a batch
    holds an image's questions together and a stage encodes it once (stages encode each distinct image
    of a batch once; VQAv2 has about 5.4 questions per image). Images whose costliest question costs
    most come first (longest first keeps padding small and shows an out-of-memory error on the first
    batch), and within an image its questions by cost; ties keep the window's order. An item's result
    does not depend on which items share its batch, up to float rounding (docs in
    capvqa/engine/distributed.py), so this reordering changes no result."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(image_keys):
        groups.setdefault(key, []).append(index)
    cost_of = (lambda i: costs[i]) if costs is not None else (lambda i: 0)
    ordered = sorted(groups.values(), key=lambda members: -max(cost_of(i) for i in members))
    return [i for members in ordered for i in sorted(members, key=lambda i: -cost_of(i))]


def windows(items: Iterable[VQAItem], size: int) -> Iterator[list[VQAItem]]:
    window: list[VQAItem] = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


ProgressFactory = Callable[[str, int | None], Any]


class _NullProgress:
    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class PipelineRunner:
    """Runs bound stages over a re-iterable item collection with the cache."""

    def __init__(
        self,
        stages: Sequence[BoundStage],
        store: CacheStore,
        runtime: Runtime,
        progress: ProgressFactory | None = None,
        on_bad_image: str = "error",
        compute_context: Callable[[str], AbstractContextManager] | None = None,
    ) -> None:
        """``compute_context(stage_name)``, where given, is entered around every batch's ``stage.run``
        and nothing else (not model loading, not cache I/O): the bench counts a stage's work with it."""
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.stages = list(stages)
        self.store = store
        self.runtime = runtime
        self.progress = progress or (lambda _name, _total: _NullProgress())
        self.hasher = ImageHasher(store)
        self.on_bad_image = on_bad_image
        self.compute_context = compute_context or (lambda _name: nullcontext())
        self.skipped: dict[str, SkippedItem] = {}  # by str(question_id)
        self.commit_log = os.environ.get(COMMIT_LOG_ENV)
        self._by_name = {s.name: s for s in self.stages}
        self._rings: dict[str, NeighbourRing] = {}  # by stage name, for stages reading neighbours

    def _skip(self, item: VQAItem, stage: str, error: DataError) -> None:
        if self.on_bad_image != "skip":
            raise error
        key = str(item.question_id)
        if key not in self.skipped:
            log.warning("skipping question %s (%s): %s", item.question_id, stage, error)
            self.skipped[key] = SkippedItem(question_id=item.question_id, image_id=item.image_id, stage=stage,
                                            reason=str(error))

    def stage_named(self, name: str) -> BoundStage:
        return self._by_name[name]

    def keyed_window(self, window: list[VQAItem]) -> list[KeyedItem]:
        """Keys of every item not skipped; a missing image is caught here (it cannot be hashed)."""
        keyed = []
        for item in window:
            if str(item.question_id) in self.skipped:
                continue
            try:
                keyed.append(self.keyed(item))
            except DataError as error:
                self._skip(item, "image hashing", error)
        return keyed

    def keyed(self, item: VQAItem) -> KeyedItem:
        """The item's keys for every stage. A stage reading neighbours that has not started yet (its
        neighbour map is built then) gets no key, nor do the stages after it."""
        image_hash = self.hasher(item)
        item_key = item_fingerprint(image_hash, item.question)
        keys, neighbour_keys = self._stage_keys(str(item.question_id), item_key, len(self.stages))
        return KeyedItem(item=item, image_hash=image_hash, item_key=item_key, keys=keys,
                         neighbour_keys=neighbour_keys)

    def _stage_keys(
        self, question_id: str, item_key: str, count: int
    ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """Keys of the first ``count`` stages for one item, and the neighbour keys they read. A neighbour's
        keys come from its own item key (in the ring), computed for the stages before the reader only, so
        the recursion ends."""
        keys: dict[str, str] = {}
        neighbour_keys: dict[str, dict[str, str]] = {}
        for index, bound in enumerate(self.stages[:count]):
            upstream = {name: keys[source] for name, source in bound.inputs.items()}
            if bound.neighbour_inputs:
                ring = self._rings.get(bound.name)
                following = ring.next_of(question_id) if ring is not None else None
                if following is None:  # not started yet, or the item was skipped before it started
                    break
                next_keys, _ = self._stage_keys(*following, index)
                found = {name: next_keys[bound.inputs[name]] for name in bound.neighbour_inputs}
                neighbour_keys[bound.name] = found
                upstream.update({name + NEIGHBOUR_KEY_SUFFIX: key for name, key in found.items()})
            keys[bound.name] = stage_item_key(bound.fingerprint, item_key, upstream)
        return keys, neighbour_keys

    def neighbour_ring(self, items: Iterable[VQAItem]) -> NeighbourRing:
        """One pass over the run's whole item sequence (not a shard): the items not skipped so far, in
        order, as question ids and item keys. Images are hashed through the run's memo, so this reads no
        file that an earlier stage hashed."""
        question_ids: list[str] = []
        item_keys: list[str] = []
        position: dict[str, int] = {}
        for item in items:
            question_id = str(item.question_id)
            if question_id in self.skipped:
                continue
            try:
                image_hash = self.hasher(item)
            except DataError as error:
                self._skip(item, "image hashing", error)
                continue
            if question_id in position:
                raise DataError(
                    f"question id {item.question_id} occurs twice in the run's items; a stage that reads the "
                    "next item's results needs unique question ids: remove or renumber the duplicate")
            position[question_id] = len(question_ids)
            question_ids.append(question_id)
            item_keys.append(item_fingerprint(image_hash, item.question))
        return NeighbourRing(question_ids, item_keys, position)

    def map_neighbours(self, bound: BoundStage, dataset: Iterable[VQAItem]) -> None:
        """Map ``bound``'s neighbours over the run's whole item sequence (the items not skipped so far)."""
        self._rings[bound.name] = self.neighbour_ring(dataset)

    def run_stage(
        self, bound: BoundStage, items: Iterable[VQAItem], total: int | None = None, *,
        dataset: Iterable[VQAItem] | None = None, neighbours_mapped: bool = False,
    ) -> StageStats:
        """Run one stage over ``items`` (this process's share). ``dataset`` is the run's whole item
        sequence when ``items`` is a shard of it: a stage reading neighbours maps them over it (default:
        ``items``), unless the caller did so already (``neighbours_mapped``, after
        :meth:`map_neighbours`)."""
        stage = bound.stage
        stats = StageStats(name=bound.name, stage_type=f"{stage.NAME}@{stage.VERSION}")
        if bound.neighbour_inputs and not neighbours_mapped:
            self.map_neighbours(bound, dataset if dataset is not None else items)
        batch_size = max(1, int(getattr(stage.config, "batch_size", 8)))
        started = time.perf_counter()
        ready = False
        bar = self.progress(bound.name, total)
        try:
            for window in windows(items, batch_size * WINDOW_BATCHES):
                keyed = self.keyed_window(window)
                present = self.store.existing_keys([_key(k, bound.name) for k in keyed])
                misses = [k for k in keyed if k.keys[bound.name] not in present]
                stats.items += len(keyed)
                stats.cached += len(keyed) - len(misses)
                bar.advance(len(window) - len(misses))
                if not misses:
                    continue
                if not ready:
                    setup_started = time.perf_counter()
                    stage.setup(self.runtime)
                    stats.setup_seconds = time.perf_counter() - setup_started
                    ready = True
                inputs = self._stage_inputs(bound, misses)
                cost = getattr(stage, "cost", None)
                order = batch_order([k.image_hash for k in misses], [cost(x) for x in inputs] if cost else None)
                for start in range(0, len(order), batch_size):
                    chosen = order[start : start + batch_size]
                    self._run_batch(bound, [misses[i] for i in chosen], [inputs[i] for i in chosen], stats)
                    bar.advance(len(chosen))
        finally:
            bar.close()
            if ready:
                stats.images_encoded = _images_encoded(stage)
                stage.cleanup()
            elif hasattr(stage, "images_encoded"):
                stats.images_encoded = 0  # everything was cached
        stats.wall_seconds = time.perf_counter() - started
        log.info("%s: %d items (%d computed, %d cached) in %.1fs", bound.name, stats.items, stats.computed,
                 stats.cached, stats.wall_seconds)
        return stats

    def _run_batch(self, bound: BoundStage, keyed: list[KeyedItem], batch: list[StageInput], stats: StageStats) -> None:
        """Run one batch and commit it atomically.

        Out of GPU memory: the batch is retried as two halves (recorded in ``oom_splits``). A bad image
        under ``on_bad_image='skip'``: the offending items are found, recorded and left out, and the
        rest of the batch runs.
        """
        stage = bound.stage
        out_of_memory = False
        try:
            compute_started = time.perf_counter()
            with self.compute_context(bound.name):
                outputs = stage.run(batch)
            stats.compute_seconds += time.perf_counter() - compute_started
        except DataError:
            bad = _items_with_bad_images(batch)
            if not bad:
                raise
            for i in sorted(bad):
                self._skip(batch[i].item, bound.name, bad[i])
            good = [i for i in range(len(batch)) if i not in bad]
            if good:
                self._run_batch(bound, [keyed[i] for i in good], [batch[i] for i in good], stats)
            return
        except Exception as error:
            if not _is_out_of_memory(error) or len(batch) == 1:
                raise
            out_of_memory = True  # retried below: inside this block the traceback pins the failed batch
        if out_of_memory:
            stats.oom_splits += 1
            log.warning("%s: out of memory on a batch of %d; retrying as two halves", bound.name, len(batch))
            _free_accelerator_memory()
            half = len(batch) // 2
            self._run_batch(bound, keyed[:half], batch[:half], stats)
            self._run_batch(bound, keyed[half:], batch[half:], stats)
            return
        if len(outputs) != len(batch):
            raise RuntimeError(f"stage {bound.name} returned {len(outputs)} results for {len(batch)} items")
        keys = [k.keys[bound.name] for k in keyed]
        self.store.put_many(stage.NAME, [(key, *encode_record(out)) for key, out in zip(keys, outputs)])
        if self.commit_log:
            with open(self.commit_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"stage": bound.name, "pid": os.getpid(), "keys": keys}) + "\n")
        stats.computed += len(batch)
        stats.batches += 1
        stats.batch_images += len({k.image_hash for k in keyed})

    def _stage_inputs(self, bound: BoundStage, misses: list[KeyedItem]) -> list[StageInput]:
        # (source stage, key) -> what it is, for the error message; upstream results, then neighbours'
        wanted: dict[tuple[str, str], str] = {}
        for source in bound.inputs.values():
            for k in misses:
                wanted.setdefault((source, k.keys[source]), f"question {k.item.question_id}")
        for input_name in bound.neighbour_inputs:
            source = bound.inputs[input_name]
            ring = self._rings[bound.name]
            for k in misses:
                following = ring.next_of(str(k.item.question_id))
                wanted.setdefault((source, k.neighbour_keys[bound.name][input_name]),
                                  f"question {following[0] if following else '?'} (the next item after question "
                                  f"{k.item.question_id})")
        found = self.store.get_many(sorted({key for _, key in wanted}))
        decoded: dict[tuple[str, str], Any] = {}
        for (source, key), what in wanted.items():
            if key not in found:
                raise UserError(
                    f"stage {bound.name}: the {source} result of {what} is not in the cache {self.store.directory}: "
                    "that stage has not run, or the entry was removed as damaged or cleared by another process "
                    "meanwhile; rerun the pipeline (the same command) to recompute it"
                )
            decoded[(source, key)] = decode_record(self._by_name[source].stage.Output, *found[key])
        return [
            StageInput(
                item=k.item,
                item_key=k.item_key,
                image_hash=k.image_hash,
                content_sha256=k.image_hash,
                upstream={name: decoded[(source, k.keys[source])] for name, source in bound.inputs.items()},
                neighbours={name: decoded[(bound.inputs[name], k.neighbour_keys[bound.name][name])]
                            for name in bound.neighbour_inputs},
            )
            for k in misses
        ]

    def results(
        self, items: Iterable[VQAItem], window: int = 256
    ) -> Iterator[tuple[VQAItem, dict[str, Any] | None]]:
        """Every item with every stage's cached result, in input order (after all stages have run);
        skipped items come with ``None``."""
        for bound in self.stages:  # a runner that did not run the stages maps neighbours now
            if bound.neighbour_inputs and bound.name not in self._rings:
                self._rings[bound.name] = self.neighbour_ring(items)
        for chunk in windows(items, window):
            keyed = {str(k.item.question_id): k for k in self.keyed_window(chunk)}
            wanted = [_key(k, s.name) for k in keyed.values() for s in self.stages]
            found = self.store.get_many(wanted)
            for item in chunk:
                k = keyed.get(str(item.question_id))
                if k is None:
                    yield item, None
                    continue
                outputs = {}
                for bound in self.stages:
                    key = _key(k, bound.name)
                    if key not in found:
                        raise UserError(
                            f"question {item.question_id}: the {bound.name} result is not in the cache "
                            f"{self.store.directory}: it was removed as damaged or cleared by another process "
                            "meanwhile; rerun the same command to recompute it")
                    outputs[bound.name] = decode_record(bound.stage.Output, *found[key])
                yield item, outputs


def _key(keyed: KeyedItem, stage_name: str) -> str:
    """The item's key for a stage. Missing only when the item is not in the sequence the stage's neighbours
    were mapped over (``run_stage``'s ``dataset``), which the engine never does."""
    key = keyed.keys.get(stage_name)
    if key is None:
        raise UserError(
            f"stage {stage_name}: question {keyed.item.question_id} is not among the items whose neighbours were "
            "mapped when the stage started (pass the run's whole item sequence as run_stage(..., dataset=...))")
    return key
