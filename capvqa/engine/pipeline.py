"""``Pipeline``: a loaded config plus the runner, and the run folder it writes.

    from capvqa import Pipeline, open_dataset
    pipeline = Pipeline.from_yaml("pnp-vqa", overrides=["captioning.num_captions=20"], models="tiny")
    result = pipeline.run(open_dataset("sample", limit=8), out_dir="runs/demo")

The CLI's ``capvqa run`` is exactly this call. A run folder holds ``config.yaml`` (the resolved config,
rerunnable with ``capvqa run runs/demo/config.yaml``), ``predictions.json`` (official results format),
``records.jsonl`` (every intermediate per question), ``metrics.json`` (when the data is annotated) and
``timings.json``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from capvqa.atomic import atomic_open, atomic_write_text
from capvqa.data.items import VQAItem
from capvqa.engine.codec import record_to_json
from capvqa.engine.config import PipelineSpec, build_stage_config, load_spec, resolve_task
from capvqa.engine.registry import resolve_stage_type
from capvqa.engine.distributed import DistributedContext, Shard
from capvqa.engine.host_memory import host_allocator
from capvqa.engine.runner import BoundStage, PipelineRunner, ProgressFactory, StageStats, merge_rank_stats
from capvqa.engine.runtime import Runtime, make_runtime
from capvqa.engine.store import CacheStore


@dataclass
class RunResult:
    """What a run produced: answers by question id, metrics when annotated, per-stage timings."""

    predictions: dict[Any, str]
    metrics: dict[str, Any] | None
    stage_stats: list[StageStats]
    out_dir: Path | None
    wall_seconds: float
    skipped: list = field(default_factory=list)


class Pipeline:
    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec

    @classmethod
    def from_yaml(
        cls, name_or_path: str | Path, overrides: Iterable[str] = (), models: str | None = None
    ) -> Pipeline:
        """Load ``pipelines/NAME.yaml`` (or a path), apply ``key=value`` overrides and a models preset."""
        return cls(load_spec(name_or_path, tuple(overrides), models_preset=models))

    def resolved_spec(self, items: Iterable[VQAItem] | None = None) -> PipelineSpec:
        """The spec with ``task: auto`` resolved from the dataset's name (OK-VQA or not)."""
        if self.spec.task != "auto":
            return self.spec
        return replace(self.spec, task=resolve_task("auto", getattr(items, "name", None)))

    def build_stages(self, spec: PipelineSpec | None = None, runtime: Runtime | None = None) -> list[BoundStage]:
        """Instantiate every stage (configs only; weights load lazily on the first cache miss)."""
        spec = spec or self.resolved_spec()
        dtype = runtime.dtype_name if runtime is not None else None
        bound = []
        for stage_spec in spec.stages:
            stage_class = resolve_stage_type(stage_spec.type)
            stage = stage_class(build_stage_config(spec, stage_spec))
            bound.append(BoundStage.create(stage_spec.name, stage, stage_spec.inputs, dtype))
        return bound

    def run(
        self,
        items: Iterable[VQAItem],
        *,
        out_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        runtime: Runtime | None = None,
        progress: ProgressFactory | None = None,
        run_settings: dict[str, Any] | None = None,
        eval_options: dict[str, Any] | None = None,
        on_bad_image: str = "error",
    ) -> RunResult:
        """Run every stage over ``items`` (a re-iterable collection: a list or a capvqa Dataset; a
        one-shot iterator is materialised, since every stage passes over the items).

        ``on_bad_image='skip'`` leaves out items whose image is missing or cannot be decoded; they are
        listed in ``skipped.json`` and count as missing (wrong) in the metrics.
        """
        started = time.perf_counter()
        if iter(items) is items:  # a generator would be used up by the first stage
            items = list(items)
        distributed = DistributedContext.from_env()
        distributed.init()
        store = CacheStore(cache_dir)
        runtime = runtime or make_runtime()
        if runtime.cache_dir is None:
            runtime = replace(runtime, cache_dir=store.directory)
        spec = self.resolved_spec(items)
        runner = PipelineRunner(self.build_stages(spec, runtime), store, runtime, progress, on_bad_image=on_bad_image)
        work = Shard(items, distributed.rank, distributed.world_size) if distributed.active else items
        total = len(work) if hasattr(work, "__len__") else None  # type: ignore[arg-type]
        out = Path(out_dir) if out_dir is not None and distributed.is_main else None
        if out is not None:
            _prepare_out_dir(out)
            spec_dict = spec.to_dict()
            spec_dict["run"] = {**(run_settings or {}), "device": str(runtime.device), "dtype": runtime.dtype_name}
            atomic_write_text(out / "config.yaml", yaml.safe_dump(spec_dict, sort_keys=False, allow_unicode=True))

        stats = [runner.run_stage(bound, work, total) for bound in runner.stages]
        if distributed.active:
            # every rank must have finished every stage before rank 0 reads all results back
            per_rank = distributed.gather((stats, list(runner.skipped.values())))
            distributed.barrier()
            if not distributed.is_main:
                store.close()
                distributed.shutdown()
                return RunResult(predictions={}, metrics=None, stage_stats=stats, out_dir=None,
                                 wall_seconds=time.perf_counter() - started)
            stats = merge_rank_stats([rank_stats for rank_stats, _ in per_rank])
            for _, skipped in per_rank:
                runner.skipped.update({str(s.question_id): s for s in skipped})

        predictions: dict[Any, str] = {}
        scored_items: list[VQAItem] = []
        num_items = 0
        answer_stage = spec.answer
        with ExitStack() as stack:
            records_file = stack.enter_context(atomic_open(out / "records.jsonl")) if out is not None else None
            for item, outputs in runner.results(items):
                num_items += 1
                if outputs is None:  # skipped: no prediction, scored as missing
                    if item.is_annotated:
                        scored_items.append(_without_image(item))
                    continue
                answer = outputs[answer_stage].answer
                predictions[item.question_id] = answer
                if item.is_annotated:
                    scored_items.append(_without_image(item))
                if records_file is not None:
                    records_file.write(json.dumps(_record_line(item, answer, outputs), ensure_ascii=False) + "\n")

        metrics = None
        evaluation = None
        if scored_items and len(scored_items) == num_items:
            from capvqa.eval.accuracy import score_predictions
            from capvqa.eval.lemmatize import make_lemmatizer

            options = eval_options or {}
            evaluation = score_predictions(
                scored_items,
                predictions,
                variant=options.get("variant", "official"),
                lemmatizer=make_lemmatizer(options.get("lemmatize", "none")),
            )
            metrics = evaluation.to_json()
        wall = time.perf_counter() - started
        if out is not None:
            from capvqa.eval.predictions import write_predictions

            write_predictions(out / "predictions.json", predictions)
            skipped = [vars(s) for s in runner.skipped.values()]
            atomic_write_text(out / "skipped.json", json.dumps(skipped, indent=2, ensure_ascii=False))
            if metrics is not None:
                atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            timings = {
                "pipeline": spec.name,
                "device": str(runtime.device),
                "dtype": runtime.dtype_name,
                "host": platform.node(),
                "host_allocator": host_allocator(),
                "num_questions": num_items,
                "num_predictions": len(predictions),
                "num_skipped": len(runner.skipped),
                "world_size": distributed.world_size,
                "total_seconds": round(wall, 4),
                "stages": {s.name: s.to_json() for s in stats},
            }
            if evaluation is not None:
                timings["evaluation"] = {"variant": evaluation.variant, "lemmatizer": evaluation.lemmatizer}
            atomic_write_text(out / "timings.json", json.dumps(timings, indent=2))
        store.close()
        distributed.shutdown()
        return RunResult(predictions=predictions, metrics=metrics, stage_stats=stats, out_dir=out, wall_seconds=wall,
                         skipped=list(runner.skipped.values()))


def _prepare_out_dir(out: Path) -> None:
    """Fail before any computation when the run folder cannot be written."""
    from capvqa.errors import UserError

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".capvqa-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write the run folder {out}: {error}. Choose another --out.") from error


def _without_image(item: VQAItem) -> VQAItem:
    """Scoring needs no pixels; dropping embedded image bytes keeps memory flat on HF datasets."""
    from dataclasses import replace

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
