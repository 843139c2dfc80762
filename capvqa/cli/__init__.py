"""The ``capvqa`` command line: a thin typer layer over the Python API.

Each command lives in its own module and imports heavy dependencies (torch, transformers) inside the
function, so ``capvqa --help`` stays fast. User errors (:class:`capvqa.errors.UserError`) are printed
without a traceback and exit with status 2.
"""

from __future__ import annotations

import sys

import typer

from capvqa.cli import bench as bench_cmd
from capvqa.cli import cache as cache_cmd
from capvqa.cli import data as data_cmd
from capvqa.cli import evaluate as evaluate_cmd
from capvqa.cli import report as report_cmd
from capvqa.cli import run as run_cmd
from capvqa.cli.console import err_console
from capvqa.errors import UserError

app = typer.Typer(
    name="capvqa",
    help="Zero-shot VQA through captions: PNP-VQA, Img2LLM, PICa.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("run")(run_cmd.run)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("report")(report_cmd.report)
app.command("bench")(bench_cmd.bench)
app.add_typer(data_cmd.app, name="data", help="Download and inspect datasets.")
app.add_typer(cache_cmd.app, name="cache", help="Inspect and clear the stage cache.")


def main() -> None:
    """Console-script entry point."""
    try:
        app(standalone_mode=False)
    except UserError as error:
        err_console.print(f"[bold red]error:[/] {error}")
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        err_console.print("[red]aborted[/]")
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit codes
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
