"""``capvqa run PIPELINE --dataset ...``: run a pipeline and write a run folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from capvqa.cli.console import console, err_console


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
    timings.json into the run folder."""
    import yaml
    from transformers.utils import logging as hf_logging

    from capvqa.cli.progress import stage_progress
    from capvqa.data.datasets import open_dataset
    from capvqa.engine.config import locate_config
    from capvqa.engine.pipeline import Pipeline
    from capvqa.engine.runtime import make_runtime
    from capvqa.errors import ConfigError

    hf_logging.disable_progress_bar()  # one bar per stage is ours; per-file loading bars are noise
    saved = {}
    config_path = locate_config(pipeline)
    if config_path.suffix in (".yaml", ".yml"):
        saved = (yaml.safe_load(config_path.read_text()) or {}).get("run") or {}
    settings = {
        "dataset": dataset or saved.get("dataset"),
        "split": split or saved.get("split"),
        "data_root": str(data_root) if data_root else saved.get("data_root"),
        "limit": limit if limit is not None else saved.get("limit"),
        "question_ids": _parse_ids(question_ids) if question_ids else saved.get("question_ids"),
        "batch_size": batch_size or saved.get("batch_size"),
        "lemmatize": lemmatize or saved.get("lemmatize") or "none",
    }
    on_bad_image = on_bad_image or saved.get("on_bad_image") or "error"
    cache_dir = cache_dir or (Path(saved["cache_dir"]) if saved.get("cache_dir") else None)
    if not settings["dataset"]:
        raise ConfigError("--dataset is required (sample, vqav2, okvqa, hf:NAME or a folder)")
    overrides = list(set_ or [])
    if seed is not None:
        overrides.insert(0, f"seed={seed}")
    if settings["batch_size"]:
        overrides = _batch_size_overrides(config_path, settings["batch_size"]) + overrides
    if settings["data_root"]:
        overrides = _pool_root_overrides(config_path, settings["data_root"], overrides) + overrides
    pipe = Pipeline.from_yaml(config_path, overrides=overrides, models=models)
    if pipe.spec.models_preset == "tiny":
        err_console.print(
            "[yellow]--models tiny: random-weight tiny models. The answers and accuracy are meaningless; "
            "this run only exercises the pipeline end to end.[/]"
        )
    data = open_dataset(
        settings["dataset"], split=settings["split"],
        data_root=Path(settings["data_root"]) if settings["data_root"] else None,
        limit=settings["limit"], question_ids=settings["question_ids"],
    )
    out_dir = out or Path("runs") / f"{pipe.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from capvqa.engine.distributed import DistributedContext

    distributed = DistributedContext.from_env()
    runtime = make_runtime(distributed.device_request(device or saved.get("device_request")),
                           dtype or saved.get("dtype_request"))
    run_settings = {k: v for k, v in settings.items() if v is not None}
    run_settings.update({"device_request": device or "auto", "dtype_request": dtype or "auto",
                         "on_bad_image": on_bad_image})
    if cache_dir:
        run_settings["cache_dir"] = str(cache_dir)
    with stage_progress(enabled=not quiet and distributed.is_main) as progress:
        result = pipe.run(
            data, out_dir=out_dir, cache_dir=cache_dir, runtime=runtime, progress=progress,
            run_settings=run_settings, eval_options={"lemmatize": settings["lemmatize"]}, on_bad_image=on_bad_image,
        )
    if not distributed.is_main:
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
        err_console.print(f"[yellow]could not write the report ({error}); the run's files are complete. "
                          f"Retry with: capvqa report {out_dir} --out {out_dir}/report.html[/]")


def _parse_ids(text: str) -> list[int | str]:
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def _batch_size_overrides(config_path: Path, batch_size: int) -> list[str]:
    from capvqa.engine.config import load_raw_config

    stages = load_raw_config(config_path).get("stages") or {}
    return [f"{name}.batch_size={batch_size}" for name in stages]


def _pool_root_overrides(config_path: Path, data_root: str, overrides: list[str]) -> list[str]:
    """--data-root also locates an example pool (PICa) unless its root is set explicitly."""
    from capvqa.engine.config import load_raw_config

    stages = load_raw_config(config_path).get("stages") or {}
    return [
        f"{name}.pool_data_root={data_root}"
        for name, node in stages.items()
        if isinstance(node, dict) and "pool_dataset" in node and not node.get("pool_data_root")
        and not any(o.startswith(f"{name}.pool_data_root=") for o in overrides)
    ]


def _print_summary(result, name: str) -> None:
    from rich.table import Table

    table = Table(title=f"{name}: {len(result.predictions)} questions in {result.wall_seconds:.1f}s")
    for column in ("stage", "computed", "cached", "s / computed item", "wall s"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stats in result.stage_stats:
        per = f"{stats.compute_seconds / stats.computed:.3f}" if stats.computed else "-"
        table.add_row(stats.name, str(stats.computed), str(stats.cached), per, f"{stats.wall_seconds:.1f}")
    console.print(table)
    if result.metrics is not None:
        console.print(f"VQA accuracy: [bold]{result.metrics['overall']:.2f}[/] over {result.metrics['num_questions']} questions"
                      + (f" ({len(result.metrics['missing'])} missing)" if result.metrics["missing"] else ""))
    if result.skipped:
        err_console.print(f"[yellow]{len(result.skipped)} question(s) skipped for bad images (listed in "
                          "skipped.json, counted as missing)[/]")
    console.print(f"run folder: {result.out_dir}")
