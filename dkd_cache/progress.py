"""A progress bar with rate and ETA (rich), that is silent when disabled or when not on a terminal."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    def __init__(self, *, total: int, label: str, unit: str = "img", enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.label, self.unit = total, label, unit
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._bar = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, rate="", info="")
        return self

    def advance(self, n: int, info: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({} if info is None else {"info": info}))
            speed = self._bar.tasks[0].speed
            if speed:
                self._bar.update(self._task, rate=f"{speed:8.1f} {self.unit}/s")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
