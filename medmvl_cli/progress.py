"""Progress of long jobs: a rich bar in a terminal, a plain line every few seconds anywhere else.

A job scheduler, `nohup` or CI sends stderr to a file, where a live bar draws nothing until the
end; there each job prints `label: done/total (pct) status, rate, ETA` every
`MEDMVL_PROGRESS_SECONDS` seconds (default 30) instead.
"""

from __future__ import annotations

import os
import time

DEFAULT_INTERVAL_S = 30.0


def plain_interval() -> float:
    """Seconds between plain progress lines ($MEDMVL_PROGRESS_SECONDS, default 30)."""
    try:
        return max(0.0, float(os.environ.get("MEDMVL_PROGRESS_SECONDS", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class JobProgress:
    """`with JobProgress("infer", console) as progress: progress.update(done, total, status)`.

    `console` is a rich Console (stderr). Disabled, it does nothing; `transient` bars vanish at the end.
    """

    def __init__(self, label: str, console=None, *, enabled: bool = True, transient: bool = False,
                 unit: str = "items"):
        from rich.console import Console

        self.label, self.enabled, self.transient, self.unit = label, enabled, transient, unit
        self.console = console if console is not None else Console(stderr=True)
        self.bar = self.task = None
        self.start = self.last_line = time.monotonic()
        self.first: tuple[int, float] | None = None  # (completed, time) at the first update

    @property
    def plain(self) -> bool:
        return not self.console.is_terminal

    def __enter__(self) -> JobProgress:
        self.start = self.last_line = time.monotonic()
        if self.enabled and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{self.label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                console=self.console, transient=self.transient)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=None, status="")
        return self

    def update(self, completed: int, total: int | None = None, status: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, total=total, status=status)
            return
        now = time.monotonic()
        if self.first is None:
            self.first = (completed, now)  # a resumed job starts part-way: the rate counts from here
        if now - self.last_line < plain_interval():
            return
        self.last_line = now
        self.console.print(self._line(completed, total, status, now), markup=False, highlight=False,
                           soft_wrap=True)

    def _line(self, completed: int, total: int | None, status: str, now: float) -> str:
        parts = [f"{self.label}: {completed}" + (f"/{total} ({100 * completed / max(total, 1):.0f}%)" if total else "")]
        if status:
            parts.append(status)
        first_completed, first_time = self.first
        rate = (completed - first_completed) / max(now - first_time, 1e-9)
        elapsed = now - self.start
        if rate > 0:
            parts.append(f"{rate:.2f} {self.unit}/s")
            if total:
                parts.append(f"ETA {_duration(max(total - completed, 0) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        return ", ".join(parts)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        return False
