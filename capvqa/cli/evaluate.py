"""``capvqa evaluate``: VQA accuracy of a predictions file, as the official script computes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from capvqa.cli.console import check_output_file, console, print_text, write_output_file


def evaluate(
    predictions: Annotated[Path, typer.Option(help="Results file: [{\"question_id\", \"answer\"}].")],
    questions: Annotated[Path | None, typer.Option(help="Official questions JSON (with --annotations).")] = None,
    annotations: Annotated[Path | None, typer.Option(help="Official annotations JSON.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Instead of --questions/--annotations: sample | vqav2 | okvqa | hf:NAME | folder.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of --dataset.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Root of downloaded vqav2/okvqa files.")] = None,
    only_predicted: Annotated[bool, typer.Option(help="Score only questions that have a prediction (a subset run) instead of counting the others as missing.")] = False,
    variant: Annotated[str, typer.Option(help="official (pre-2021 script, as LAVIS and the papers) | symmetric (EvalAI-style).")] = "official",
    lemmatize: Annotated[str, typer.Option(help="Lemmatise predictions first (OK-VQA option): none | auto | spacy | rule.")] = "none",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
) -> None:
    """Score PREDICTIONS: overall, per answer type, per question type and per question (x100, 2 decimals)."""
    from rich.markup import escape
    from rich.table import Table

    from capvqa.errors import UserError
    from capvqa.eval.accuracy import score_predictions
    from capvqa.eval.lemmatize import make_lemmatizer
    from capvqa.eval.predictions import load_predictions

    if json_out is not None:
        check_output_file(json_out, "--json")  # before the work, not after it
    items = _load_items(questions, annotations, dataset, split, data_root)
    answers = load_predictions(predictions)
    if only_predicted:
        predicted = {str(k) for k in answers}
        items = [item for item in items if str(item.question_id) in predicted]
        if not items:
            raise UserError(f"none of the predictions in {predictions} is for a question of the dataset")
    result = score_predictions(items, answers, variant=variant, lemmatizer=make_lemmatizer(lemmatize))

    table = Table(title=f"VQA accuracy ({result.variant} normalisation, lemmatizer: {result.lemmatizer})")
    table.add_column("group")
    table.add_column("accuracy", justify="right")
    table.add_row("[bold]overall[/]", f"[bold]{result.overall:.2f}[/]")
    for name, value in sorted(result.per_answer_type.items()):
        table.add_row(f"answer type: {escape(name)}", f"{value:.2f}")  # type names come from the data
    for name, value in sorted(result.per_question_type.items()):
        table.add_row(f"question type: {escape(name)}", f"{value:.2f}")
    console.print(table)
    print_text(f"{result.num_questions} questions scored, {len(result.missing)} without a prediction "
               "(counted as wrong)" + (f": {list(result.missing)[:10]}" if result.missing else ""))
    if json_out is not None:
        write_output_file(json_out, json.dumps(result.to_json(), indent=2), "--json")
        print_text(f"metrics written to {json_out}")


def _load_items(questions, annotations, dataset, split, data_root):
    from capvqa.errors import UserError

    if dataset is not None:
        if questions or annotations:
            raise UserError("give either --dataset or --questions/--annotations, not both")
        from capvqa.data.datasets import open_dataset

        return list(open_dataset(dataset, split=split, data_root=data_root))
    if questions is None or annotations is None:
        raise UserError("--questions and --annotations are required (or --dataset)")
    from capvqa.data.official import load_official

    # scoring reads no pixels: the image folder is only a formality of the loader here
    return list(load_official(questions, annotations_path=annotations, image_dir=questions.parent))
