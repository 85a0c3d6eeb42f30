"""Sinks that show a run to a person: periodic plain lines, or nothing (``--quiet``).

The final summary is the CLI's; these show the run while it goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from batchq.events import Event, Notice, Retrying, RowFinished, RunStarted

__all__ = ["PlainProgress"]


class PlainProgress:
    """One line every ``every_s`` seconds: rows done of total, rate, errors, retries."""

    def __init__(
        self,
        out: TextIO,
        *,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out, self._every, self._clock = out, every_s, clock
        self._started = self._last = clock()
        self.todo = self.done = self.errors = self.retries = self.throttled = 0
        self.tokens = 0

    def __call__(self, event: Event) -> None:
        match event:
            case RunStarted(todo=todo, total=total):
                self.todo = todo
                self._print(f"{event.job}: {total:,} rows, {todo:,} to send")
            case Notice(message=message):
                self._print(message)
            case RowFinished():
                self.done += 1
                self.errors += event.status != "ok"
                self.tokens += event.prompt_tokens + event.completion_tokens
                if self._clock() - self._last >= self._every:
                    self._print(self.line())
            case Retrying():
                self.retries += 1
                self.throttled += event.http_status == 429

    def line(self) -> str:
        now = self._clock()
        self._last = now
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.todo if self.todo else 1.0
        eta = (self.todo - self.done) / rate if rate else float("inf")
        return (
            f"{self.done:,}/{self.todo:,} rows ({share:.0%}) · {rate:,.0f} rows/s · "
            f"{self.tokens / elapsed:,.0f} tokens/s · {self.errors:,} errors · "
            f"{self.retries:,} retries ({self.throttled:,} × 429) · ETA {_duration(eta)}"
        )

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
