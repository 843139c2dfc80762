"""Shared rich consoles (results to stdout, progress and errors to stderr) and how sizes read in them."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


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
