"""Progress for people: a rich bar (rate, ETA) on a terminal; plain lines in a log file (Slurm, nohup), where a bar
would print nothing until the end."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


def hms(seconds: float) -> str:
    """H:MM:SS, for ETAs in log lines."""
    s = max(int(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`enabled`: show progress at all. On a terminal (stderr a tty) a bar; otherwise, when `line_every` is given,
    one plain line on stdout every `line_every` calls of `advance` and one when the total is reached:
    `LABEL  done/total UNITs (pct%)  rate UNITs/s  ETA H:MM:SS  info`. `enabled` stays the bar's switch."""

    def __init__(self, *, total: int, label: str, unit: str = "img", enabled: bool = True,
                 line_every: int | None = None):
        tty = sys.stderr.isatty()
        self.enabled = enabled and tty
        self.lines = enabled and not tty and line_every is not None
        self.total, self.label, self.unit, self.line_every = total, label, unit, line_every
        self.done, self.calls, self.info = 0, 0, ""
        self._t0 = time.perf_counter()
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        self._t0 = time.perf_counter()
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
        self.done += n
        if info is not None:
            self.info = info
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({} if info is None else {"info": info}))
            speed = self._bar.tasks[0].speed
            if speed:
                self._bar.update(self._task, rate=f"{speed:8.1f} {self.unit}/s")
        if self.lines and n:
            self.calls += 1
            if self.calls % self.line_every == 0 or self.done >= self.total:
                print(self.line(), flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / max(self.total, 1)
        return (f"{self.label}  {self.done}/{self.total} {self.unit}s ({pct:.0f}%)  {rate:.1f} {self.unit}s/s  "
                f"ETA {hms(eta)}" + (f"  {self.info}" if self.info else ""))

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
