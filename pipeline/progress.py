"""Progress of a long loop: a live bar on a terminal, a plain line every few seconds elsewhere (Slurm, CI
logs, `nohup`), nothing when disabled (tests, library use)."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

LINE_EVERY_S = 10.0


class Progress:
    """`with Progress("title_cam", total) as p: ... p.advance(n, loss="0.41")`.

    `unit` names what is counted (items, batches); extra fields are shown beside the count."""

    def __init__(self, what: str, total: int, enabled: bool = True, unit: str = "items", transient: bool = False):
        self.what, self.total, self.unit = what, int(total), unit
        self.done, self.fields = 0, {}
        self.console = Console(stderr=True)
        self.mode = "off" if not enabled else ("bar" if self.console.is_terminal else "lines")
        self.transient = transient
        self._bar = None

    def __enter__(self) -> Progress:
        self.started = self._last = time.perf_counter()
        if self.mode == "bar":
            columns = [TextColumn(f"[bold]{self.what}[/]"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
            self._bar = RichProgress(*columns, console=self.console, transient=self.transient)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total, info="")
        return self

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        if self.mode == "bar":
            self._bar.update(self._task, advance=n, info=self._info())
        elif self.mode == "lines" and time.perf_counter() - self._last >= LINE_EVERY_S:
            self._line()

    def _info(self) -> str:
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        return "  ".join([f"{rate:.1f} {self.unit}/s"] + [f"{k} {v}" for k, v in self.fields.items()])

    def _line(self) -> None:
        self._last = now = time.perf_counter()
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        extra = "".join(f", {k} {v}" for k, v in self.fields.items())
        print(f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta:.0f} s{extra}",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
