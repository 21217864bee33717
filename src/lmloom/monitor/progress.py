"""Progress bars with rate and ETA for long work (quiet when the console is not a terminal)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress, task, unit: str):
        self._progress, self._task, self.unit = progress, task, unit

    def advance(self, amount: float = 1, **fields) -> None:
        self._progress.update(self._task, advance=amount, **fields)

    def update(self, completed: float | None = None, **fields) -> None:
        self._progress.update(self._task, completed=completed, **fields)

    def note(self, text: str) -> None:
        self._progress.update(self._task, note=text)


@contextmanager
def progress_bar(console: Console, total: float | None, description: str, unit: str = "it"):
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit == "it" else TaskProgressColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, note="")
        yield _Bar(progress, task, unit)
