"""The ``capvqa`` command line: a thin typer layer over the Python API.

Each command lives in its own module and imports heavy dependencies (torch, transformers) inside the
function, so ``capvqa --help`` stays fast. Exit statuses: 0 done; 2 a user error
(:class:`capvqa.errors.UserError`, printed without a traceback) or a usage error; 130 interrupted (Ctrl-C),
with one line on stderr saying what was kept (see :func:`capvqa.cli.console.on_interrupt`); 1 aborted at a
prompt.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from capvqa.cli import bench as bench_cmd
from capvqa.cli import cache as cache_cmd
from capvqa.cli import config as config_cmd
from capvqa.cli import data as data_cmd
from capvqa.cli import evaluate as evaluate_cmd
from capvqa.cli import report as report_cmd
from capvqa.cli import run as run_cmd
from capvqa.cli.console import err_console, interrupt_message, on_interrupt, print_error
from capvqa.errors import UserError


class _Interrupted(Exception):
    """A KeyboardInterrupt inside a command, carried past typer (which would turn it into a bare status)."""


class _CapvqaGroup(TyperGroup):
    """The root command group: an interrupt anywhere in a command reaches :func:`main` as ``_Interrupted``."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as error:
            raise _Interrupted() from error


app = typer.Typer(
    cls=_CapvqaGroup,
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
app.add_typer(cache_cmd.app, name="cache", help="Inspect, check and clear the stage cache.")
app.add_typer(config_cmd.app, name="config", help="Show and check pipeline configs without running them.")


def main() -> None:
    """Console-script entry point."""
    on_interrupt(None)
    try:
        # a status comes back from typer.Exit, and 130 from typer itself when an interrupt came while the
        # arguments were parsed (once a command runs, _CapvqaGroup turns it into _Interrupted)
        status = app(standalone_mode=False)
    except UserError as error:
        print_error(error)
        sys.exit(2)
    except (_Interrupted, KeyboardInterrupt):
        status = 130
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print_error("aborted")
        sys.exit(1)
    except Exception as error:
        if _is_click_exception(error):  # usage errors carry their own message and exit status
            error.show()
            sys.exit(error.exit_code)
        raise
    if status == 130:
        err_console.print(interrupt_message(), style="yellow", markup=False, highlight=False, soft_wrap=True)
    sys.exit(status if isinstance(status, int) else 0)


def _is_click_exception(error: Exception) -> bool:
    """Usage errors are click exceptions; recent typer versions vendor click (``typer._click``), older
    ones use click itself, so both classes are recognised."""
    classes = []
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        classes.append(VendoredClickException)
    except ImportError:
        pass
    try:
        from click import ClickException

        classes.append(ClickException)
    except ImportError:
        pass
    return isinstance(error, tuple(classes))
