"""Progress reporting for long commands: a rich progress bar on a TTY, plain lines otherwise,
JSON lines for ``--json``.

Everything goes to stderr, so stdout stays free for the command's result (one JSON object with
``--json``). Thread-safe: the worker advances tasks from many threads.

    ui = Progress.create("auto")           # or "rich", "lines", "json", "quiet"
    with ui.task("mark", total=n, unit="indexes") as t:
        for ...:
            t.advance()
        t.done("1234 chunks referenced")
    ui.close()

``lines`` prints one line when a task starts, one when it ends, and a progress line at most every
``interval`` seconds in between (so logs stay short). ``json`` prints objects like
``{"event": "progress", "task": "mark", "completed": 10, "total": 30}`` with the same pacing.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

MODES = ("auto", "rich", "lines", "json", "quiet")


class Task:
    def __init__(self, ui: Progress, name: str, total: float | None, unit: str):
        self.ui = ui
        self.name = name
        self.total = total
        self.unit = unit
        self.completed = 0.0
        self.started = time.monotonic()
        self._last_emit = float("-inf")  # the first update is shown at once
        self._ended = False
        self._handle: Any = None

    def advance(self, n: float = 1) -> None:
        with self.ui._lock:
            self.completed += n
            self.ui._update(self)

    def update(self, *, completed: float | None = None, total: float | None = None) -> None:
        with self.ui._lock:
            if completed is not None:
                self.completed = completed
            if total is not None:
                self.total = total
            self.ui._update(self)

    def done(self, summary: str | None = None, **fields: Any) -> None:
        with self.ui._lock:
            if self._ended:
                return
            self._ended = True
            self.ui._end(self, summary, fields)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._ended:
            self.done(f"failed: {exc}", failed=True)
        else:
            self.done()


class Progress:
    def __init__(self, mode: str = "lines", stream: TextIO | None = None, interval: float = 2.0):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} not in {MODES}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "rich" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.interval = interval
        self._lock = threading.RLock()
        self._rich: Any = None
        if mode == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress
            from rich.text import Text

            class ByUnit(ProgressColumn):
                """Bytes (amount, rate) for byte tasks; counts for the others."""

                def __init__(self, for_bytes, for_counts):
                    super().__init__()
                    self.for_bytes, self.for_counts = for_bytes, for_counts

                def render(self, task):
                    column = (
                        self.for_bytes if task.fields.get("unit") == "bytes" else self.for_counts
                    )
                    return column.render(task) if column is not None else Text("")

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                ByUnit(DownloadColumn(binary_units=True), MofNCompleteColumn()),
                ByUnit(TransferSpeedColumn(), None),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._rich.start()

    @classmethod
    def create(cls, mode: str = "auto", *, json_output: bool = False, **kw: Any) -> Progress:
        """``json_output`` (the command's --json) selects JSON lines unless a mode is forced."""
        if json_output and mode == "auto":
            mode = "json"
        return cls(mode, **kw)

    def task(self, name: str, total: float | None = None, unit: str = "") -> Task:
        with self._lock:
            t = Task(self, name, total, unit)
            if self.mode == "rich":
                t._handle = self._rich.add_task(name, total=total, unit=unit)
            elif self.mode == "lines":
                self._line(f"{name}: started" + (f" ({_num(total)} {unit})" if total else ""))
            elif self.mode == "json":
                self._json({"event": "start", "task": name, "total": total, "unit": unit})
            return t

    def log(self, message: str, **fields: Any) -> None:
        with self._lock:
            if self.mode == "rich":
                self._rich.console.print(message, markup=False, highlight=False)
            elif self.mode == "lines":
                self._line(message)
            elif self.mode == "json":
                self._json({"event": "log", "message": message, **fields})

    def close(self) -> None:
        with self._lock:
            if self._rich is not None:
                self._rich.stop()
                self._rich = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backends --------------------------------------------------------------------------------

    def _update(self, t: Task) -> None:
        if self.mode == "rich":
            self._rich.update(t._handle, completed=t.completed, total=t.total)
            return
        if self.mode in ("quiet",):
            return
        now = time.monotonic()
        if now - t._last_emit < self.interval:
            return
        t._last_emit = now
        if self.mode == "lines":
            if t.unit == "bytes":
                self._line(f"{t.name}: {_bytes_line(t, now)}")
                return
            of = f"/{_num(t.total)}" if t.total else ""
            pct = f" ({100 * t.completed / t.total:.0f}%)" if t.total else ""
            self._line(f"{t.name}: {_num(t.completed)}{of} {t.unit}{pct}".rstrip())
        else:
            self._json(
                {"event": "progress", "task": t.name, "completed": t.completed, "total": t.total}
            )

    def _end(self, t: Task, summary: str | None, fields: dict[str, Any]) -> None:
        elapsed = time.monotonic() - t.started
        if self.mode == "rich":
            self._rich.update(t._handle, completed=t.total or t.completed, total=t.total)
            if summary:
                self._rich.console.print(f"{t.name}: {summary}", markup=False, highlight=False)
        elif self.mode == "lines":
            self._line(f"{t.name}: {summary or 'done'} ({elapsed:.1f} s)")
        elif self.mode == "json":
            self._json(
                {
                    "event": "end",
                    "task": t.name,
                    "completed": t.completed,
                    "total": t.total,
                    "seconds": round(elapsed, 3),
                    "summary": summary,
                    **fields,
                }
            )

    def _line(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _json(self, obj: dict[str, Any]) -> None:
        self._line(json.dumps(obj, default=str))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _bytes_line(t: Task, now: float) -> str:
    """'48.0 MiB/86.0 MiB (56%), 120.0 MiB/s, ETA 0:00:01' for a byte task."""
    elapsed = max(now - t.started, 1e-9)
    rate = t.completed / elapsed
    text = _size(t.completed)
    if t.total:
        text += f"/{_size(t.total)} ({100 * t.completed / t.total:.0f}%)"
    text += f", {_size(rate)}/s"
    if t.total and rate > 0 and t.completed < t.total:
        left = int((t.total - t.completed) / rate)
        text += f", ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return text


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


__all__ = ["MODES", "Progress", "Task"]
