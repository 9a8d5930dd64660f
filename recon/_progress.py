"""A rich progress bar that shows the running loss, or nothing when progress is off."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, total: int | None, label: str) -> None:
        self._progress = progress
        self._task = progress.add_task(label, total=total, info="") if progress is not None else None

    def advance(self, losses: Mapping[str, float] | None = None, **extra: float) -> None:
        if self._progress is None:
            return
        values = {**(losses or {}), **extra}
        info = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        self._progress.update(self._task, advance=1, info=info)


@contextmanager
def progress_bar(total: int | None, label: str, *, enabled: bool = True) -> Iterator[_Bar]:
    """``with progress_bar(n, "profiling") as bar: ... bar.advance({"left": 0.3})``."""
    if not enabled:
        yield _Bar(None, total, label)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield _Bar(progress, total, label)
