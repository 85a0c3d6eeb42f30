"""Sinks that show a run to a person: a live bar on a terminal (rich), one plain line
every few seconds elsewhere. ``--quiet`` uses neither. The final summary is the CLI's.
``shown`` picks one for the Python API, which may run in a notebook.

Both read the same :class:`Tally`, kept from the runner's events.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from batchq.cli.streams import gone, silence, write_or_silence
from batchq.events import (
    Checking,
    Event,
    Notice,
    Reasking,
    Retrying,
    RowFinished,
    RunFinished,
    RunStarted,
    Sink,
    Slowdown,
    Speedup,
    Tick,
    discard,
)
from batchq.money.pricing import PriceTable

if TYPE_CHECKING:  # rich loads only for a terminal
    from rich.console import Console
    from rich.progress import TaskID

__all__ = ["LiveProgress", "PlainProgress", "Tally", "money", "shown"]


class Tally:
    """Counts of one run so far: rows, tokens, 429s, errors, retries, cost."""

    def __init__(self, prices: PriceTable | None, region: str, *, clock: Callable[[], float]):
        self._prices, self._region, self._clock = prices, region, clock
        self.started = clock()
        self.todo = self.done = self.errors = self.retries = self.throttled = 0
        self.invalid = self.reasks = 0
        self.tokens = 0
        self.waiting: set[str] = set()  # rows between a failed attempt and their result
        self.cost: dict[str, float] = {}
        self.unpriced: set[str] = set()
        self.budget: tuple[float, float, str] | None = None  # cap, spent before, currency

    def add(self, event: Event) -> None:
        match event:
            case RunStarted(todo=todo, budget=budget):
                self.todo = todo
                self.started = self._clock()
                self.budget = budget
            case RowFinished():
                self.done += 1
                self.errors += event.status == "error"
                self.invalid += event.status == "invalid"
                self.tokens += event.prompt_tokens + event.completion_tokens
                self.waiting.discard(event.row_id)
                self._add_cost(event)
            case Reasking():
                self.reasks += 1
            case Retrying(http_status=status):
                self.retries += 1
                self.throttled += status == 429
                self.waiting.add(event.row_id)

    def _add_cost(self, row: RowFinished) -> None:
        if self._prices is None or not row.prompt_tokens:
            return
        price = self._prices.lookup(row.model, self._region)
        if price is None:
            self.unpriced.add(self._prices.unpriced_name(row.model, self._region))
            return
        cost = price.cost(
            row.prompt_tokens,
            row.completion_tokens,
            cached=row.cached_tokens,
            thinking=row.thinking,
            created=row.cache_creation_tokens,
        )
        self.cost[price.currency] = self.cost.get(price.currency, 0.0) + cost

    def elapsed(self) -> float:
        return max(self._clock() - self.started, 1e-9)

    def rate(self) -> float:
        return self.done / self.elapsed()

    def eta(self) -> str:
        rate = self.rate()
        return _duration((self.todo - self.done) / rate) if rate else "?"

    def cost_text(self) -> str:
        if self.budget is not None:  # spend, earlier runs' too, against the cap
            cap, before, currency = self.budget
            spent = before + self.cost.get(currency, 0.0)
            return f"{money(spent, currency)} of --max-cost {money(cap, currency)}"
        parts = [money(amount, currency) for currency, amount in sorted(self.cost.items())]
        if self.unpriced:
            parts.append(f"unpriced: {', '.join(sorted(self.unpriced))}")
        return " + ".join(parts) if parts else "-"

    def stats(self) -> str:
        answers = (
            f"{self.reasks:,} re-asked · {self.invalid:,} invalid · "
            if self.reasks or self.invalid
            else ""
        )
        return (
            f"{self.rate():,.0f} rows/s · {self.tokens / self.elapsed():,.0f} tok/s · "
            f"{self.throttled:,} × 429 · {self.errors:,} errors · {answers}"
            f"{len(self.waiting):,} retrying · cost {self.cost_text()}"
        )


class PlainProgress:
    """One line every ``every_s`` seconds: rows done of total, rate, errors, retries."""

    def __init__(
        self,
        out: TextIO,
        *,
        prices: PriceTable | None = None,
        region: str = "intl",
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out, self._every, self._clock = out, every_s, clock
        self.tally = Tally(prices, region, clock=clock)
        self._last = clock()
        self._shown = True  # False once the reader went away: the run goes on unshown

    def __call__(self, event: Event) -> None:
        self.tally.add(event)
        match event:
            case Checking() if self._clock() - self._last >= self._every:
                self._last = self._clock()
                self._print(_checking_text(event))
            case RunStarted(todo=todo, total=total):
                self._print(f"{event.job}: {total:,} rows, {todo:,} to send")
            case Notice(message=message):
                self._print(message)
            case Slowdown() | Speedup():
                self._print(rate_text(event))
            case RowFinished() | Tick() if self._clock() - self._last >= self._every:
                self._print(self.line())  # on schedule, even while nothing finishes

    def line(self) -> str:
        self._last = self._clock()
        t = self.tally
        share = t.done / t.todo if t.todo else 1.0
        return f"{t.done:,}/{t.todo:,} rows ({share:.0%}) · {t.stats()} · ETA {t.eta()}"

    def _print(self, text: str) -> None:
        if self._shown:
            self._shown = write_or_silence(self._out, text + "\n")


class LiveProgress:
    """A live display on a terminal (rich): a bar with rows done / total and ETA, and under
    it rows/s, tokens/s, 429s, errors, rows retrying and cost so far. Notices print above."""

    def __init__(
        self,
        console: Console,
        *,
        prices: PriceTable | None = None,
        region: str = "intl",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn

        self.tally = Tally(prices, region, clock=clock)
        self._clock = clock
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=None),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows · ETA {task.fields[eta]}"),
            console=console,
            expand=True,
        )
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._task: TaskID | None = None
        self._shown = 0.0
        self._checking_since: float | None = None
        self._started = False
        self._gone = False

    def __call__(self, event: Event) -> None:
        self.tally.add(event)
        if self._gone:
            return
        try:
            self._display(event)
        except OSError as e:  # the terminal went away: the run goes on unshown
            if not gone(e):
                raise
            self._gone = True
            silence(self._live.console.file)

    def _display(self, event: Event) -> None:
        match event:
            case Checking():
                now = self._clock()
                if self._checking_since is None:
                    self._checking_since = now
                # Shown once the check has taken a second (most inputs take less).
                if now - self._checking_since >= 1.0 and now - self._shown >= 0.2:
                    from rich.text import Text

                    self._shown = now
                    if not self._started:
                        self._live.start()
                        self._started = True
                    self._live.update(Text(_checking_text(event)), refresh=True)
            case RunStarted(job=job, todo=todo):
                self._task = self._bar.add_task(job, total=todo, eta="?")
                self._show()
                if not self._started:
                    self._live.start()
                    self._started = True
            case Notice(message=message):
                self._live.console.print(message)
            case Slowdown() | Speedup():
                self._live.console.print(rate_text(event))
            case RunFinished():
                self._show()
                self._live.stop()
            case RowFinished() | Retrying() | Tick() if self._clock() - self._shown >= 0.2:
                self._show()

    def _show(self) -> None:
        from rich.console import Group
        from rich.text import Text

        self._shown = self._clock()
        if self._task is not None:
            t = self.tally
            self._bar.update(self._task, completed=t.done, eta=t.eta())
            self._live.update(Group(self._bar, Text(t.stats(), overflow="fold")))

    def close(self) -> None:
        """Stop the display (a run that ended by an error has no RunFinished)."""
        try:
            self._live.stop()
        except OSError as e:
            if not gone(e):
                raise


def _checking_text(event: Checking) -> str:
    how = " (row by row, to say where a problem is)" if event.exact else ""
    return f"checking the input before sending: {event.rows:,} rows so far{how}"


def rate_text(event: Slowdown | Speedup) -> str:
    """What a change of the whole run's rate says: "slowing to" only when it slows."""
    if isinstance(event, Speedup):
        to = f"{event.rate:,.1f} req/s" if event.rate is not None else "full speed"
        return f"{event.reason}: raising the rate to {to}"
    pause = f" after a {event.pause_s:.1f} s pause (Retry-After)" if event.pause_s else ""
    if event.blocked:
        return (
            f"429s on every answer: slowing to {event.rate:,.1f} req/s{pause} until "
            "answers come back"
        )
    return f"429s on {event.share:.0%} of answers: slowing to {event.rate:,.1f} req/s{pause}"


def money(amount: float, currency: str) -> str:
    """``$0.0123`` / ``¥0.0123``; other currencies by code. Four decimals below 1."""
    symbol = {"USD": "$", "CNY": "¥"}.get(currency)
    digits = 4 if abs(amount) < 1 else 2
    text = f"{amount:,.{digits}f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@contextmanager
def shown(prices: PriceTable, region: str, *, on: bool) -> Iterator[Sink]:
    """The Python API's display: rich's live bar in a terminal or in a notebook (with
    ipywidgets, which rich's live display there needs), plain lines on stderr elsewhere;
    nothing with ``on=False``."""
    if not on:
        yield discard
        return
    console = _live_console()
    if console is None:
        yield PlainProgress(sys.stderr, prices=prices, region=region)
        return
    live = LiveProgress(console, prices=prices, region=region)
    try:
        yield live
    finally:
        live.close()


def _live_console() -> Any:
    """A rich console for a live display, or None where it cannot update in place."""
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_jupyter:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return None
        return Console()
    return console if console.is_terminal else None
