"""The per-row work: send one row's request, retrying as SPEC says, into a result row.

This is a plain function of a row, a client, a pacer and the limits, with no global
state, so that many workers (or worker processes) can run it side by side.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from batchq.client import Client, Outcome
from batchq.errors import RunStopped
from batchq.events import Retrying, Sink
from batchq.limiter import Pacer
from batchq.retry import backoff_delay

__all__ = ["Item", "answer"]


@dataclass(slots=True)
class Item:
    """One row to send: its input position, id, request body, and its token estimate
    (prompt, and the completion cap when the body sets one)."""

    row: int
    id: str
    body: dict[str, Any]
    prompt_tokens: int
    max_completion: int | None
    prior_attempts: int = 0


async def answer(
    item: Item,
    *,
    client: Client,
    pacer: Pacer,
    max_attempts: int,
    emit: Sink,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
) -> dict[str, Any]:
    """The result row for ``item``. Raises RunStopped on a fatal answer (401/403, quota)."""
    attempts = 0
    while True:
        reserved = await pacer.acquire(item.prompt_tokens, item.max_completion)
        sent_at = pacer.now()
        outcome: Outcome | None = None
        try:
            outcome = await client.send(item.body)
        finally:
            _release(pacer, reserved, outcome)
        attempts += 1
        if outcome.kind == "ok":
            return _row(item, outcome, attempts)
        if outcome.kind == "fatal":
            raise RunStopped(_fatal_message(outcome))
        if outcome.kind == "row_error" or attempts >= max_attempts:
            return _row(item, outcome, attempts)
        if outcome.http_status == 429:
            pacer.penalise(outcome.retry_after, sent_at)
        delay = backoff_delay(attempts, retry_after=outcome.retry_after, rng=rng)
        reason = outcome.error_code or outcome.error_type or "error"
        emit(Retrying(item.id, attempts, outcome.http_status, reason, delay, outcome.retry_after))
        await sleep(delay)


def _release(pacer: Pacer, reserved: int, outcome: Outcome | None) -> None:
    usage = outcome.result if outcome is not None and outcome.result is not None else {}
    pacer.release(reserved, usage.get("total_tokens"), usage.get("completion_tokens"))


def _row(item: Item, outcome: Outcome, attempts: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "_row": item.row,
        "_id": item.id,
        "model": item.body.get("model"),
        "attempts": item.prior_attempts + attempts,
        "via": "live",
        "http_status": outcome.http_status,
    }
    if outcome.kind == "ok":
        row.update(outcome.result or {}, status="ok", latency_ms=outcome.latency_ms)
    else:
        row.update(
            status="error",
            error_type=outcome.error_type,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
        )
    return row


def _fatal_message(outcome: Outcome) -> str:
    what = f"HTTP {outcome.http_status}" if outcome.http_status else "the server"
    detail = f" ({outcome.error_code}: {outcome.error_message})" if outcome.error_message else ""
    if outcome.http_status in (401, 403):
        hint = "check the API key, its region and the base URL, then rerun to resume"
    else:
        hint = "the account's quota is used up: top it up, then rerun to resume"
    return f"the run stopped: {what}{detail}, so every row would fail alike; {hint}"
