"""Shared rich consoles (results to stdout, progress and errors to stderr), how sizes read in them, how
user-facing messages are printed, and what an interrupted command says.

Messages carry data (paths, ids, questions) that may contain ``[``...``]``; Rich would read those as
markup (``[/]`` raises, ``[exp1]`` vanishes), so every message is escaped here and printed with
``soft_wrap`` (a long path is never broken by an inserted newline; the terminal wraps it).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

INTERRUPTED = "interrupted"
_interrupt_message: str | None = None


def print_error(message: object) -> None:
    """``error: MESSAGE`` on stderr, MESSAGE exactly as given."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", soft_wrap=True)


def print_warning(message: object) -> None:
    """MESSAGE in yellow on stderr, exactly as given (warnings and notes that are not results)."""
    err_console.print(f"[yellow]{escape(str(message))}[/]", soft_wrap=True)


def print_text(message: object) -> None:
    """MESSAGE on stdout, exactly as given (a result line that names a path or data)."""
    console.print(escape(str(message)), soft_wrap=True)


def on_interrupt(message: str | None) -> None:
    """From now on, an interrupt (Ctrl-C, SIGINT) of this command prints MESSAGE (one line, shown as
    given) instead of the bare ``interrupted``; ``None`` restores that. The command still exits 130."""
    global _interrupt_message
    _interrupt_message = message


def note_resumable_run(cache_dir: str | os.PathLike[str] | None, command: list[str] | None = None) -> None:
    """Make an interrupt say that finished batches are kept in the stage cache at ``cache_dir`` (``None``:
    the default cache) and how to resume: rerun ``command`` (default: this process's ``capvqa ...``
    command line). ``capvqa run`` calls this once it knows the cache folder, before computing."""
    from capvqa.engine.store import default_cache_dir

    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    on_interrupt(f"{INTERRUPTED}: finished batches are kept in the stage cache ({directory}); "
                 f"rerun the same command to resume: {shlex.join(command or command_line())}")


def command_line() -> list[str]:
    """This process's command as a user would type it again (``python -m capvqa`` reads ``capvqa``)."""
    return ["capvqa", *sys.argv[1:]]


def interrupt_message() -> str:
    """The line an interrupt of the running command prints (see :func:`on_interrupt`)."""
    return _interrupt_message or f"{INTERRUPTED} (Ctrl-C): stopped before the command finished"


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file path before any work is done: a folder, or a place where no file can be
    made (a parent that is a file, a folder without write permission). ``option`` names it (``--json``)."""
    from capvqa.errors import UserError

    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path such as {path / 'result.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the first folder that exists is the one a new file or folder goes in
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is a file, not a folder; give a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {parent}; give a path in a writable folder")


def write_output_file(path: Path, text: str, option: str) -> None:
    """Write an output file atomically; a failure (folder, permissions, full disk) is a clear UserError."""
    from capvqa.atomic import atomic_write_text
    from capvqa.errors import UserError

    check_output_file(path, option)
    try:
        atomic_write_text(path, text)
    except OSError as error:
        raise UserError(f"cannot write {option} {path}: {error.strerror or error}; "
                        "give a file path in a writable folder") from None


def human_size(size: int | None, *, binary: bool = True) -> str:
    """``12 B``, ``1.5 KiB`` ... ``3.2 GiB`` (``binary``: what a disk holds) or ``1.5 KB`` ... ``GB``
    (decimal: what download servers announce); ``?`` for an unknown size."""
    if size is None:
        return "?"
    step, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "KB", "MB", "GB"))
    value = float(size)
    for unit in units[:-1]:
        if value < step:
            return f"{int(size)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= step
    return f"{value:.1f} {units[-1]}"
