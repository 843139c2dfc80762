"""``capvqa run PIPELINE --dataset ...``: run a pipeline and write a run folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from capvqa.cli.console import console, note_resumable_run, print_text, print_warning


def run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name (pipelines/NAME.yaml), a config path, or a run folder's config.yaml.")],
    dataset: Annotated[str | None, typer.Option(help="sample | vqav2 | okvqa | hf:NAME_OR_PATH | path to a folder laid out like data/sample.")] = None,
    split: Annotated[str | None, typer.Option(help="Dataset split (e.g. val2014).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Where `capvqa data download` put vqav2/okvqa/coco.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N questions.")] = None,
    question_ids: Annotated[str | None, typer.Option(help="Comma-separated question ids to run.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/PIPELINE-TIMESTAMP).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Items per batch for every stage.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random stage (default 42).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Stage cache directory (default ~/.cache/capvqa/cache).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: stage.param=value, models.ROLE=ID, seed=N.")] = None,
    models: Annotated[str | None, typer.Option(help="Model preset for every role: hub (config's ids) or tiny (offline random tiny models).")] = None,
    lemmatize: Annotated[str | None, typer.Option(help="Lemmatise predictions before scoring (OK-VQA option): none | auto | spacy | rule.")] = None,
    on_bad_image: Annotated[str | None, typer.Option(help="error: stop at a missing/corrupt image (default); skip: leave such questions out, list them in skipped.json and count them as missing.")] = None,
    report: Annotated[bool, typer.Option(help="Write report.html and report.md into the run folder.")] = True,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Run PIPELINE over a dataset and write config.yaml, predictions.json, records.jsonl, metrics.json,
    timings.json into the run folder. A saved run (its folder or config.yaml) reruns with its settings."""
    from transformers.utils import logging as hf_logging

    from capvqa.cli.progress import stage_progress
    from capvqa.engine.distributed import DistributedContext
    from capvqa.engine.pipeline import Pipeline
    from capvqa.engine.run_settings import RunSettings, parse_question_ids

    hf_logging.disable_progress_bar()  # one bar per stage is ours; per-file loading bars are noise
    explicit = RunSettings(
        dataset=dataset, split=split, data_root=str(data_root) if data_root else None, limit=limit,
        question_ids=parse_question_ids(question_ids) if question_ids is not None else None,
        batch_size=batch_size, device=device, dtype=dtype, cache_dir=str(cache_dir) if cache_dir else None,
        lemmatize=lemmatize, on_bad_image=on_bad_image,
    )
    explicit.check_options()  # before the config loads: a bad option costs nothing
    overrides = ([f"seed={seed}"] if seed is not None else []) + list(set_ or [])
    pipe = Pipeline.from_yaml(pipeline, overrides=overrides, models=models)
    if pipe.spec.models_preset == "tiny":
        print_warning("--models tiny: random-weight tiny models. The answers and accuracy are meaningless; "
                      "this run only exercises the pipeline end to end.")
    # what Ctrl-C says: finished batches are kept in the run's cache, and how to resume
    note_resumable_run(explicit.restored_from(pipe.spec.run).cache_dir)
    out_dir = out or Path("runs") / f"{pipe.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    is_main = DistributedContext.from_env().is_main
    with stage_progress(enabled=not quiet and is_main) as progress:
        result = pipe.run_with(explicit, out_dir=out_dir, progress=progress, keep_freed_host_memory=True)
    if not is_main:
        return  # rank 0 writes the run folder and prints the summary
    if report:
        _write_reports(result.out_dir)
    _print_summary(result, pipe.spec.name)


def _write_reports(out_dir: Path) -> None:
    """Reports are a convenience on top of the run's files: a failure here must not fail the run."""
    from capvqa.report import write_run_reports

    try:
        write_run_reports(out_dir)
    except Exception as error:  # noqa: BLE001 - reported, and `capvqa report` can redo it
        print_warning(f"could not write the report ({error}); the run's files are complete. "
                      f"Retry with: capvqa report {out_dir} --out {out_dir}/report.html")


def _print_summary(result, name: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{escape(name)}: {len(result.predictions)} questions in {result.wall_seconds:.1f}s")
    for column in ("stage", "computed", "cached", "s / computed item", "wall s"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stats in result.stage_stats:
        per = f"{stats.compute_seconds / stats.computed:.3f}" if stats.computed else "-"
        table.add_row(escape(stats.name), str(stats.computed), str(stats.cached), per, f"{stats.wall_seconds:.1f}")
    console.print(table)
    if result.metrics is not None:
        console.print(f"VQA accuracy: [bold]{result.metrics['overall']:.2f}[/] over {result.metrics['num_questions']} questions"
                      + (f" ({len(result.metrics['missing'])} missing)" if result.metrics["missing"] else ""))
    if result.skipped:
        print_warning(f"{len(result.skipped)} question(s) skipped for bad images (listed in skipped.json, "
                      "counted as missing)")
    print_text(f"run folder: {result.out_dir}")
