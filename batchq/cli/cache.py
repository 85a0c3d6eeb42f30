"""``batchq cache list`` / ``batchq cache clear``: the Python API's folders in the cache."""

from __future__ import annotations

import re
import time
from datetime import datetime

import click

from batchq import cache as calls
from batchq.cli._common import fail
from batchq.cli.progress import money
from batchq.errors import BatchqError, UsageError
from batchq.money import report
from batchq.money.pricing import PriceTable

__all__ = ["cache"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@click.group()
def cache() -> None:
    """The Python API's state folders (``$XDG_CACHE_HOME/batchq``)."""


@cache.command("list")
def list_() -> None:
    """Each cached call: when last used, how far it got, what it cost, its size."""
    folders = list(calls.entries())
    if not folders:
        click.echo(f"{calls.cache_root()}: no cached calls")
        return
    prices = PriceTable.load(None)
    total = 0
    for folder in folders:
        size = folder.size()
        total += size
        record = folder.record()
        endpoint = "simulated" if record.get("simulated") else record.get("provider", "?")
        click.echo(
            f"{folder.path.name}  {_when(folder.last_used())}  {_size(size):>8}  "
            f"{_progress(folder, prices)}  {record.get('model')} @ {endpoint}  "
            f"{record.get('input', '')}"
        )
    click.echo(f"{len(folders)} calls, {_size(total)} in {calls.cache_root()}")


@cache.command()
@click.option("--older-than", metavar="AGE", help="only calls last used longer ago: 7d, 12h, 30m")
def clear(older_than: str | None) -> None:
    """Delete cached calls (all, or those not used for AGE); never one that is running."""
    try:
        age = _age(older_than) if older_than is not None else None
    except BatchqError as e:
        fail(e)
    removed = freed = running = 0
    for folder in calls.entries():
        if age is not None and time.time() - folder.last_used() < age:
            continue
        size = folder.size()
        if calls.remove(folder):
            removed, freed = removed + 1, freed + size
        else:
            running += 1
    calls.clear_staging(older_than_s=max(age or 0.0, 3600.0))  # younger: being written now
    note = f"; {running} running, kept" if running else ""
    click.echo(f"removed {removed} cached calls, {_size(freed)} freed{note}")


def _progress(folder: calls.CallFolder, prices: PriceTable) -> str:
    try:
        s = report.status(report.find_results(folder.output), prices)
    except BatchqError:
        return "nothing sent"
    total = f"{s.total_rows:,}" if s.total_rows is not None else "?"
    state = "complete" if s.finished else ("running" if s.state_of_run == "running" else "stopped")
    costs = " + ".join(money(v, c) for c, v in sorted(s.costs.items()))
    return f"{state} {s.done:,}/{total} rows" + (f", {costs}" if costs else "")


def _age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match is None:
        raise UsageError(
            f"--older-than {text!r}: give a number and a unit, such as 7d, 12h, 30m, 90s or 2w"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"
