"""``Pipeline``: a loaded config plus the runner, and the run folder it writes.

    from capvqa import Pipeline, RunSettings, open_dataset
    pipeline = Pipeline.from_yaml("pnp-vqa", overrides=["captioning.num_captions=20"], models="tiny")
    result = pipeline.run(open_dataset("sample", limit=8), out_dir="runs/demo")
    # or, as `capvqa run` does, from settings (a saved run's settings fill what is not given):
    result = pipeline.run_with(RunSettings(dataset="sample", limit=8), out_dir="runs/demo")

The CLI's ``capvqa run`` is exactly the second call. A run folder holds ``config.yaml`` (the resolved
config, rerunnable with ``capvqa run runs/demo``), ``predictions.json`` (official results format),
``records.jsonl`` (every intermediate per question), ``metrics.json`` (when the data is annotated),
``timings.json``, ``skipped.json`` and ``status.json`` (:mod:`capvqa.engine.run_folder`).

A run is a fixed sequence of steps, each a method below: check every option, resolve the config for the
dataset, build the stages, start the run folder, run the stages (each over the whole dataset, cached),
collect the answers, score them, write the results.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from capvqa.atomic import atomic_open, atomic_write_text
from capvqa.data.items import VQAItem
from capvqa.engine.codec import record_to_json
from capvqa.engine.config import (
    PipelineSpec,
    build_stage_config,
    check_stages_together,
    load_spec,
    parse_override,
    resolve_task,
)
from capvqa.engine.distributed import DistributedContext, Shard
from capvqa.engine.host_memory import host_allocator
from capvqa.engine.registry import resolve_stage_type
from capvqa.engine.result_exchange import fetch_neighbour_inputs, send_results_to_main
from capvqa.engine.run_folder import COMPLETE, FAILED, INTERRUPTED, start_run_folder, write_status
from capvqa.engine.run_settings import RunSettings, check_batch_size
from capvqa.engine.runner import BoundStage, PipelineRunner, ProgressFactory, StageStats, merge_rank_stats
from capvqa.engine.runtime import Runtime, make_runtime
from capvqa.engine.stage import DatasetContext
from capvqa.engine.store import CacheStore
from capvqa.errors import DataError


@dataclass
class RunResult:
    """What a run produced: answers by question id, metrics when annotated, per-stage timings."""

    predictions: dict[Any, str]
    metrics: dict[str, Any] | None
    stage_stats: list[StageStats]
    out_dir: Path | None
    wall_seconds: float
    skipped: list = field(default_factory=list)


@dataclass
class _Answers:
    """What the collect step gathers while writing records.jsonl."""

    predictions: dict[Any, str] = field(default_factory=dict)
    scored_items: list[VQAItem] = field(default_factory=list)
    question_ids: list[Any] = field(default_factory=list)
    num_items: int = 0
    postprocess: dict[str, int] = field(default_factory=dict)  # answer post-processor name -> answers


class Pipeline:
    def __init__(self, spec: PipelineSpec, *, own_batch_size_stages: Iterable[str] = ()) -> None:
        """``own_batch_size_stages``: stages whose batch size an override set, which a run-wide batch
        size leaves alone."""
        self.spec = spec
        self.own_batch_size_stages = frozenset(own_batch_size_stages)

    @classmethod
    def from_yaml(
        cls, name_or_path: str | Path, overrides: Iterable[str] = (), models: str | None = None, *,
        batch_size: int | None = None,
    ) -> Pipeline:
        """Load ``pipelines/NAME.yaml``, a config path or a run folder, apply ``key=value`` overrides and
        a models preset. ``batch_size`` sets every stage's batch size, except where an override sets a
        stage's own."""
        overrides = tuple(overrides)
        spec = load_spec(name_or_path, overrides, models_preset=models)
        explicit = {parse_override(o)[0][0] for o in overrides if parse_override(o)[0][1:] == ["batch_size"]}
        if batch_size is not None:
            spec = _with_batch_size(spec, batch_size, explicit)
        return cls(spec, own_batch_size_stages=explicit)

    # -- the config for one dataset ------------------------------------------------------------------

    def resolved_spec(self, items: Iterable[VQAItem] | None = None) -> PipelineSpec:
        """The spec as it runs on ``items``: ``task: auto`` resolved from the dataset's name (OK-VQA or
        not), and each stage's dataset-dependent settings resolved by its ``resolve_params`` hook."""
        spec = self.spec
        if spec.task == "auto":
            spec = replace(spec, task=resolve_task("auto", getattr(items, "name", None)))
        if items is None:
            return spec
        data_root = getattr(items, "data_root", None)
        context = DatasetContext(spec=getattr(items, "spec", None), split=getattr(items, "split", None),
                                 data_root=str(data_root) if data_root is not None else None)
        stages = []
        for stage in spec.stages:
            hook = getattr(resolve_stage_type(stage.type), "resolve_params", None)
            stages.append(replace(stage, params=dict(hook(dict(stage.params), context))) if callable(hook) else stage)
        spec = replace(spec, stages=tuple(stages))
        check_stages_together(spec)  # the resolved task and the hooks' values are checked like any setting
        return spec

    def build_stages(self, spec: PipelineSpec | None = None, runtime: Runtime | None = None) -> list[BoundStage]:
        """Instantiate every stage (configs only; weights load lazily on the first cache miss)."""
        spec = spec or self.resolved_spec()
        dtype = runtime.dtype_name if runtime is not None else None
        cache_dir = runtime.cache_dir if runtime is not None else None
        bound = []
        for stage_spec in spec.stages:
            stage_class = resolve_stage_type(stage_spec.type)
            stage = stage_class(build_stage_config(spec, stage_spec))
            bound.append(BoundStage.create(stage_spec.name, stage, stage_spec.inputs, dtype, cache_dir,
                                           device=runtime.device.type if runtime is not None else None))
        return bound

    # -- running -------------------------------------------------------------------------------------

    def run(
        self,
        items: Iterable[VQAItem],
        *,
        out_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        runtime: Runtime | None = None,
        progress: ProgressFactory | None = None,
        on_bad_image: str = "error",
        lemmatize: str = "none",
    ) -> RunResult:
        """Run every stage over ``items`` (a re-iterable collection: a list or a capvqa Dataset; a
        one-shot iterator is materialised, since every stage passes over the items).

        ``on_bad_image='skip'`` leaves out items whose image is missing or cannot be decoded; they are
        listed in ``skipped.json`` and count as missing (wrong) in the metrics. ``lemmatize`` names the
        OK-VQA prediction lemmatizer used for scoring (:mod:`capvqa.eval.lemmatize`).
        """
        data_root = getattr(items, "data_root", None)
        settings = RunSettings(  # what reopens exactly these items (a capvqa Dataset knows its selection)
            dataset=getattr(items, "spec", None), split=getattr(items, "split", None),
            data_root=str(data_root) if data_root is not None else None,
            limit=getattr(items, "limit", None), question_ids=getattr(items, "question_ids", None),
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            lemmatize=lemmatize, on_bad_image=on_bad_image,
        ).with_defaults()
        settings.check_options()
        return self._execute(items, settings, runtime, out_dir, progress)

    def run_with(
        self,
        settings: RunSettings,
        *,
        out_dir: str | Path | None = None,
        runtime: Runtime | None = None,
        progress: ProgressFactory | None = None,
        keep_freed_host_memory: bool = False,
    ) -> RunResult:
        """Run on the dataset ``settings`` names. Settings not given (None) are restored from the loaded
        config's saved ``run:`` section (a run folder's config.yaml), then every option is checked before
        the dataset is opened or any model loads; a given ``batch_size`` sets every stage's.
        ``keep_freed_host_memory`` tunes this process's allocator for CPU runs
        (:mod:`capvqa.engine.host_memory`; the CLI turns it on)."""
        given_batch_size = settings.batch_size  # a restored one is already in the saved stages' settings
        settings = settings.restored_from(self.spec.run).with_defaults().validate()
        pipeline = self
        if given_batch_size is not None:  # every stage's, as --batch-size and from_yaml(batch_size=) do
            pipeline = Pipeline(_with_batch_size(self.spec, given_batch_size, self.own_batch_size_stages),
                                own_batch_size_stages=self.own_batch_size_stages)
        if runtime is None:
            distributed = DistributedContext.from_env()
            runtime = make_runtime(distributed.device_request(settings.device), settings.dtype,
                                   keep_freed_host_memory=keep_freed_host_memory)
        return pipeline._execute(settings.open_dataset(), settings, runtime, out_dir, progress)

    def _execute(
        self, items: Iterable[VQAItem], settings: RunSettings, runtime: Runtime | None,
        out_dir: str | Path | None, progress: ProgressFactory | None,
    ) -> RunResult:
        """The run itself; ``settings`` were checked (:meth:`RunSettings.check_options`) by the caller."""
        from capvqa.eval.lemmatize import make_lemmatizer

        started = time.perf_counter()
        lemmatizer = make_lemmatizer(settings.lemmatize)  # before any model: spaCy missing fails now
        if iter(items) is items:  # a generator would be used up by the first stage
            items = list(items)
        runtime = runtime or make_runtime(settings.device, settings.dtype)
        spec = self.resolved_spec(items)
        with _process_group() as distributed, _open_store(settings.cache_dir) as store:
            store.check_readable()  # a damaged cache stops here, before the run folder is touched
            if runtime.cache_dir is None:
                runtime = replace(runtime, cache_dir=store.directory)
            runner = PipelineRunner(self.build_stages(spec, runtime), store, runtime, progress,
                                    on_bad_image=settings.on_bad_image)
            if isinstance(items, list) and any(bound.neighbour_inputs for bound in runner.stages):
                _check_unique_question_ids(items)  # loaders refuse duplicates; a caller's own list may not
            out = Path(out_dir) if out_dir is not None and distributed.is_main else None
            if out is not None:
                self._start_run_folder(out, spec, settings, runtime)
            try:
                stats = self._run_stages(runner, items, distributed)
                if not distributed.is_main:
                    return RunResult(predictions={}, metrics=None, stage_stats=stats, out_dir=None,
                                     wall_seconds=time.perf_counter() - started)
                answers = self._collect_answers(runner, items, spec.answer, out)
                evaluation = self._score(answers, settings, lemmatizer)
                wall = time.perf_counter() - started
                if out is not None:
                    self._write_results(out, spec, runtime, distributed, runner, answers, evaluation, stats, wall)
            except BaseException as error:
                if out is not None:
                    _record_failure(out, error)
                raise
        return RunResult(predictions=answers.predictions, metrics=evaluation.to_json() if evaluation else None,
                         stage_stats=stats, out_dir=out, wall_seconds=wall, skipped=list(runner.skipped.values()))

    # -- the steps -----------------------------------------------------------------------------------

    def _start_run_folder(self, out: Path, spec: PipelineSpec, settings: RunSettings, runtime: Runtime) -> None:
        """Clear the folder of any earlier run's files, mark it running, save the resolved config."""
        start_run_folder(out)
        spec_dict = spec.to_dict()
        spec_dict["run"] = {**settings.to_dict(), "device": str(runtime.device), "dtype": runtime.dtype_name}
        atomic_write_text(out / "config.yaml", yaml.safe_dump(spec_dict, sort_keys=False, allow_unicode=True))

    @staticmethod
    def _run_stages(runner: PipelineRunner, items: Iterable[VQAItem], distributed: DistributedContext) -> list[StageStats]:
        """Each stage over this process's share of the items; under torchrun, every rank's statistics
        and skipped items are merged on rank 0 once all ranks have finished every stage.

        A stage that reads neighbours (``NEIGHBOUR_INPUTS``) maps them over all the items, not the shard;
        under torchrun it starts only when every rank has finished the earlier stages (the next item's
        result may be another rank's) and knows every rank's skipped items (they are passed over)."""
        work = Shard(items, distributed.rank, distributed.world_size) if distributed.active else items
        total = len(work) if hasattr(work, "__len__") else None  # type: ignore[arg-type]
        stats = []
        for bound in runner.stages:
            mapped = False
            if bound.neighbour_inputs and distributed.active:
                distributed.barrier()
                for skipped in distributed.gather(list(runner.skipped.values())):
                    runner.skipped.update({str(s.question_id): s for s in skipped})
                runner.map_neighbours(bound, items)
                fetch_neighbour_inputs(runner, bound, work, distributed)  # the next item may be another node's
                mapped = True
            stats.append(runner.run_stage(bound, work, total, dataset=items, neighbours_mapped=mapped))
        if not distributed.active:
            return stats
        per_rank = distributed.gather((stats, list(runner.skipped.values())))
        for _, skipped in per_rank:
            runner.skipped.update({str(s.question_id): s for s in skipped})
        send_results_to_main(runner, work, distributed)  # nodes with caches of their own send to rank 0
        distributed.barrier()  # rank 0 reads all results back only after every rank wrote them
        return merge_rank_stats([rank_stats for rank_stats, _ in per_rank])

    @staticmethod
    def _collect_answers(runner: PipelineRunner, items: Iterable[VQAItem], answer_stage: str, out: Path | None) -> _Answers:
        """Every item's answer from the cache, in input order, and its records.jsonl line."""
        answers = _Answers()
        with atomic_open(out / "records.jsonl") if out is not None else _no_file() as records_file:
            for item, outputs in runner.results(items):
                answers.num_items += 1
                answers.question_ids.append(item.question_id)
                if item.is_annotated:
                    answers.scored_items.append(_without_image(item))
                if outputs is None:  # skipped: no prediction, scored as missing
                    continue
                record = outputs[answer_stage]
                answer = record.answer
                name = getattr(record, "postprocess", None)  # an LLM answer's; the FiD reader has none
                if isinstance(name, str):
                    answers.postprocess[name] = answers.postprocess.get(name, 0) + 1
                answers.predictions[item.question_id] = answer
                if records_file is not None:
                    records_file.write(json.dumps(_record_line(item, answer, outputs), ensure_ascii=False) + "\n")
        return answers

    @staticmethod
    def _score(answers: _Answers, settings: RunSettings, lemmatizer: Any) -> Any:
        """VQA accuracy when the items are annotated; None when none is (a test split). A mix is an error:
        scoring only some would report a number over a subset nobody asked for."""
        if not answers.scored_items:
            return None
        if len(answers.scored_items) != answers.num_items:
            annotated = {str(item.question_id) for item in answers.scored_items}
            missing = [qid for qid in answers.question_ids if str(qid) not in annotated]
            raise DataError(
                f"{len(missing)} of {answers.num_items} questions have no human answers (e.g. question ids "
                f"{', '.join(map(str, missing[:10]))}) while the others do, so no accuracy can be computed; "
                "annotate every question or none. The answers are kept in the cache: rerun after fixing the data."
            )
        from capvqa.eval.accuracy import score_predictions

        return score_predictions(answers.scored_items, answers.predictions, lemmatizer=lemmatizer)

    @staticmethod
    def _write_results(out: Path, spec: PipelineSpec, runtime: Runtime, distributed: DistributedContext,
                       runner: PipelineRunner, answers: _Answers, evaluation: Any, stats: list[StageStats],
                       wall: float) -> None:
        from capvqa.eval.predictions import write_predictions

        write_predictions(out / "predictions.json", answers.predictions)
        skipped = [vars(s) for s in runner.skipped.values()]
        atomic_write_text(out / "skipped.json", json.dumps(skipped, indent=2, ensure_ascii=False))
        if evaluation is not None:
            atomic_write_text(out / "metrics.json", json.dumps(evaluation.to_json(), indent=2))
        timings = {
            "pipeline": spec.name,
            "device": str(runtime.device),
            "dtype": runtime.dtype_name,
            "host": platform.node(),
            "host_allocator": host_allocator(),
            "num_questions": answers.num_items,
            "num_predictions": len(answers.predictions),
            "num_skipped": len(runner.skipped),
            "world_size": distributed.world_size,
            "total_seconds": round(wall, 4),
            "stages": {s.name: s.to_json() for s in stats},
        }
        if answers.postprocess:  # which answer post-processing ran (e.g. Img2LLM's OK-VQA lemmatizer)
            timings["answer_postprocess"] = dict(sorted(answers.postprocess.items()))
        if evaluation is not None:
            timings["evaluation"] = {"variant": evaluation.variant, "lemmatizer": evaluation.lemmatizer}
        atomic_write_text(out / "timings.json", json.dumps(timings, indent=2))
        write_status(out, COMPLETE, num_questions=answers.num_items, num_predictions=len(answers.predictions))


def _with_batch_size(spec: PipelineSpec, batch_size: int, explicit: Iterable[str]) -> PipelineSpec:
    """``spec`` with every stage's batch size set, except the stages named in ``explicit``."""
    check_batch_size(batch_size)
    keep = set(explicit)
    stages = tuple(s if s.name in keep else replace(s, params={**s.params, "batch_size": batch_size})
                   for s in spec.stages)
    spec = replace(spec, stages=stages)
    check_stages_together(spec)
    return spec


def _check_unique_question_ids(items: list[VQAItem]) -> None:
    """A stage reading the next item's results needs each question id once; say so before any stage runs
    rather than when that stage starts."""
    seen: set[str] = set()
    for item in items:
        key = str(item.question_id)
        if key in seen:
            raise DataError(
                f"question id {item.question_id} occurs twice in the run's items; a stage that reads the next "
                "item's results needs unique question ids: remove or renumber the duplicate")
        seen.add(key)


@contextmanager
def _process_group() -> Iterator[DistributedContext]:
    """The torchrun context. A process group this run creates is destroyed when it ends; one the caller
    created is left alone."""
    distributed = DistributedContext.from_env()
    created = distributed.active and not _group_exists()
    distributed.init()
    try:
        yield distributed
    finally:
        if created:
            distributed.shutdown()


def _group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextmanager
def _open_store(cache_dir: str | Path | None) -> Iterator[CacheStore]:
    store = CacheStore(cache_dir)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _no_file() -> Iterator[None]:
    yield None


def _record_failure(out: Path, error: BaseException) -> None:
    """Mark the run folder failed (or interrupted), keeping the first error's message; never masks it."""
    status = INTERRUPTED if isinstance(error, KeyboardInterrupt) else FAILED
    try:
        write_status(out, status, error=f"{type(error).__name__}: {error}".strip().rstrip(":"))
    except OSError:
        pass


def _without_image(item: VQAItem) -> VQAItem:
    """Scoring needs no pixels; dropping embedded image bytes keeps memory flat on HF datasets."""
    from capvqa.data.items import ImageRef

    if item.image.data is None:
        return item
    return replace(item, image=ImageRef(path=Path(f"<embedded:{item.image_id}>")))


def _record_line(item: VQAItem, answer: str, outputs: dict[str, Any]) -> dict[str, Any]:
    line: dict[str, Any] = {
        "question_id": item.question_id,
        "image_id": item.image_id,
        "question": item.question,
        "answer": answer,
    }
    if item.is_annotated:
        from capvqa.eval.normalize import question_accuracy

        line["gt_answers"] = list(item.answers)
        line["answer_type"] = item.answer_type
        line["question_type"] = item.question_type
        line["accuracy"] = round(100 * question_accuracy(answer, item.answers), 2)
    line["stages"] = {name: record_to_json(record) for name, record in outputs.items()}
    return line

