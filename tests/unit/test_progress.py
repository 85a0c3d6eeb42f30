"""The sinks that show a run: figures from events, on a fake clock."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from batchq.cli.progress import LiveProgress, PlainProgress, Tally
from batchq.events import (
    Checking,
    Notice,
    Retrying,
    RowFinished,
    RunFinished,
    RunStarted,
    RunSummary,
    Slowdown,
    Speedup,
)
from batchq.money.pricing import PriceTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def finished(i: int, status: str = "ok", model: str = "qwen-plus") -> RowFinished:
    if status == "ok":
        return RowFinished(f"r{i}", status, 1, model, 1000, 100, 0, 0, False, 200, None, None)
    return RowFinished(f"r{i}", status, 1, model, 0, 0, 0, 0, False, 400, "bad", "refused")


def feed(sink: PlainProgress | LiveProgress, clock: Clock) -> None:
    sink(RunStarted("job", 1000, 800, Path("o.parquet")))
    sink(Notice("resuming: 200 rows already done"))
    sink(Retrying("x7", 1, 429, "limit_requests", 1.0, 1.0))
    sink(Retrying("r8", 1, 503, "503", 0.5))
    sink(Slowdown(42.0, 1.0, 0.3))
    sink(Speedup(92.2, "a limit of about 95.0 req/s: holding just under it"))
    for i in range(400):
        clock.now += 0.025  # 40 rows/s
        sink(finished(i, "error" if i == 8 else "ok"))


def test_plain_lines_give_rows_rates_429s_errors_retrying_cost_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    sink = PlainProgress(out, prices=PriceTable.builtin(), clock=clock)
    feed(sink, clock)
    text = out.getvalue()
    assert "job: 1,000 rows, 800 to send" in text
    assert "resuming: 200 rows already done" in text
    assert "429s on 30% of answers: slowing to 42.0 req/s after a 1.0 s pause" in text
    # A rise says so: "slowing" only when it slows.
    assert "holding just under it: raising the rate to 92.2 req/s" in text
    assert text.count("slowing") == 1
    line = sink.line()
    assert line.startswith("400/800 rows (50%) · 40 rows/s · 43,890 tok/s · 1 × 429 · 1 errors")
    assert "1 retrying" in line  # x7 is still waiting; r8 finished
    # 399 rows ok at 1,000 prompt + 100 completion tokens of qwen-plus (Singapore)
    assert f"cost ${399 * (1000 * 0.4 + 100 * 1.2) / 1e6:.4f}" in line
    assert line.endswith("ETA 0m10s")


def test_unpriced_models_are_said_not_priced_at_zero() -> None:
    out, clock = io.StringIO(), Clock()
    sink = PlainProgress(out, prices=PriceTable.builtin(), clock=clock)
    sink(RunStarted("job", 1, 1, Path("o.parquet")))
    sink(finished(0, model="my-local-model"))
    assert "cost unpriced: my-local-model" in sink.line()


def test_the_live_bar_shows_the_same_figures() -> None:
    buffer, clock = io.StringIO(), Clock()
    console = Console(file=buffer, force_terminal=True, width=250, color_system=None)
    sink = LiveProgress(console, prices=PriceTable.builtin(), clock=clock)
    feed(sink, clock)
    summary = RunSummary(Path("o.parquet"), 1000, 399, 1, 400, 10.0, False)
    sink(RunFinished(summary))
    text = buffer.getvalue()
    assert "resuming: 200 rows already done" in text
    assert "400/800 rows · ETA 0m10s" in text
    assert "40 rows/s" in text
    assert "1 × 429 · 1 errors · 1 retrying · cost $0.2075" in text
    assert "43,890 tok/s" in text
    assert "ETA 0m10s" in text


def check(sink: PlainProgress | LiveProgress, clock: Clock, seconds: float) -> None:
    """The preflight's progress: 200,000 rows a second for ``seconds``, then the run."""
    for step in range(int(seconds * 10)):
        clock.now += 0.1
        sink(Checking(20_000 * (step + 1), exact=step > 10))
    sink(RunStarted("job", 1000, 1000, Path("o.parquet")))


def test_a_preflight_longer_than_a_second_is_shown_on_a_terminal() -> None:
    for seconds, shown in [(0.8, False), (3.0, True)]:
        buffer, clock = io.StringIO(), Clock()
        console = Console(file=buffer, force_terminal=True, width=250, color_system=None)
        sink = LiveProgress(console, prices=PriceTable.builtin(), clock=clock)
        check(sink, clock, seconds)
        sink.close()
        text = buffer.getvalue()
        assert ("checking the input before sending" in text) is shown, text
        assert ("(row by row, to say where a problem is)" in text) is shown


def test_plain_lines_say_the_preflights_progress_every_5_s() -> None:
    out, clock = io.StringIO(), Clock()
    check(PlainProgress(out, clock=clock), clock, 12.0)
    lines = [x for x in out.getvalue().splitlines() if x.startswith("checking the input")]
    assert len(lines) == 2, lines  # at 5 s and 10 s
    assert all(x.endswith(" rows so far (row by row, to say where a problem is)") for x in lines)


def test_the_running_cost_prices_an_explicit_caches_writes_as_the_cost_column_does() -> None:
    """1,500 of 2,000 prompt tokens written to the explicit cache: at 125 % of the input
    price (qwen-plus intl: $0.4 per 1M), not as plain input."""
    tally = Tally(PriceTable.builtin(), "intl", clock=lambda: 0.0)
    tally.add(
        RowFinished(
            "r0",
            "ok",
            1,
            "qwen-plus",
            2000,
            0,
            0,
            0,
            False,
            200,
            None,
            None,
            cache_creation_tokens=1500,
        )
    )
    assert tally.cost["USD"] == pytest.approx((500 * 0.4 + 1500 * 0.4 * 1.25) / 1e6)
