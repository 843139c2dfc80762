"""Rich progress bars, one per stage, with items/s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from capvqa.cli.console import err_console


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} items/s" if speed else "- items/s", style="cyan")


class _StageBar:
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int) -> None:
        self.progress.advance(self.task_id, n)

    def close(self) -> None:
        self.progress.refresh()


@contextmanager
def stage_progress(enabled: bool = True) -> Iterator[Any]:
    """A progress factory for :class:`capvqa.engine.runner.PipelineRunner` (None when disabled)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )
    with progress:
        # the description is read as markup by the column: a stage named "[x]" must show as written
        yield lambda name, total: _StageBar(progress, progress.add_task(escape(name), total=total))
