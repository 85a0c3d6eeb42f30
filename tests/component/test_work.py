"""The per-row retry loop, over httpx.MockTransport, with sleeps recorded instead of slept."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchq.answer import Checker
from batchq.engine.work import QUOTA_STOP_S, Channel, Item, QuotaWatch, send_row
from batchq.errors import RunStopped
from batchq.events import Event
from batchq.send.client import Client
from batchq.send.limiter import Settled

pytestmark = pytest.mark.anyio

OK = httpx.Response(
    200,
    json={
        "id": "c1",
        "model": "qwen-plus",
        "choices": [{"message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    },
)


def err(status: int, code: str = "x", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": code}}, headers=headers)


class Pacer:
    """Records what each attempt came to; its clock moves only with the sleeps."""

    def __init__(self) -> None:
        self.acquired = 0
        self.outcomes: list[Settled] = []
        self.clock = 0.0

    async def acquire(self, prompt_tokens: int, max_completion: int | None) -> int:
        self.acquired += 1
        return prompt_tokens + (max_completion or 0)

    def settle(self, reserved: int, settled: Settled) -> None:
        self.outcomes.append(settled)

    @property
    def settled(self) -> list[int | None]:
        return [s.used for s in self.outcomes]

    @property
    def penalties(self) -> list[float | None]:
        return [s.retry_after for s in self.outcomes if s.throttled]

    def now(self) -> float:
        return self.clock


async def run(  # type: ignore[no-untyped-def]
    responses: list[httpx.Response] | Iterator[httpx.Response],
    *,
    max_attempts: int = 5,
    prior: dict[str, Any] | None = None,
    quota: QuotaWatch | None = None,
    checker: Checker | None = None,
    body: dict[str, Any] | None = None,
    sent: list[dict[str, Any]] | None = None,
):
    """The row ``answer`` makes of ``responses`` (one a request, in order), with the
    sleeps, events and pacer; ``sent`` is given each request's body."""
    script: Iterator[httpx.Response] = iter(responses)
    sleeps: list[float] = []
    events: list[Event] = []
    pacer = Pacer()

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        pacer.clock += seconds

    def reply(request: httpx.Request) -> httpx.Response:
        if sent is not None:
            sent.append(json.loads(request.content))
        return next(script)

    transport = httpx.MockTransport(reply)
    body = body or {"model": "qwen-plus", "messages": []}
    item = Item(7, "r7", body, 10, None, prior)
    async with Client(
        "http://sim/v1", api_key=None, timeout_s=5, max_connections=1, transport=transport
    ) as client:
        channel = Channel(
            client,
            pacer,
            max_attempts,
            events.append,
            sleep,
            random.Random(0),
            quota or QuotaWatch(),
        )
        row = await send_row(item, channel, checker=checker)
    return row, sleeps, events, pacer


async def test_transient_failures_are_retried_until_ok() -> None:
    row, sleeps, events, pacer = await run([err(503), err(500), OK])
    assert row.status == "ok"
    assert row.response == "yo"
    assert row.attempts == 3
    assert row.row == 7
    assert row.id == "r7"
    assert row.model == "qwen-plus"
    assert len(sleeps) == 2
    assert pacer.acquired == 3  # every attempt waits on the pacer
    assert pacer.settled == [None, None, 4]  # ... and gives back what it used
    assert [e.attempt for e in events] == [1, 2]  # type: ignore[union-attr]


async def test_a_429_is_told_to_the_pacer_and_its_retry_after_delays_the_row() -> None:
    row, sleeps, _, pacer = await run([err(429, "limit_requests", **{"Retry-After": "3"}), OK])
    assert row.status == "ok"
    assert pacer.penalties == [3.0]
    assert [s.throttled for s in pacer.outcomes] == ["rate", None]
    assert sleeps == [3.0]


async def test_a_fault_that_never_passes_ends_the_row_not_the_run() -> None:
    row, sleeps, _, _ = await run([err(503)] * 4, max_attempts=4)
    assert row.status == "error"
    assert row.attempts == 4
    assert row.http_status == 503
    assert row.error_code == "x"
    assert len(sleeps) == 3


async def test_a_400_is_recorded_once_without_retrying() -> None:
    row, sleeps, _, _ = await run([err(400, "data_inspection_failed")])
    assert (row.status, row.attempts, row.error_code) == (
        "error",
        1,
        "data_inspection_failed",
    )
    assert sleeps == []


async def test_attempts_count_across_runs() -> None:
    row, _, _, _ = await run([err(503), OK], prior={"attempts": 2})
    assert row.attempts == 4


async def test_auth_failure_stops_the_run() -> None:
    with pytest.raises(RunStopped, match="HTTP 401"):
        await run([err(401, "invalid_api_key")])


async def test_quota_429s_do_not_use_up_attempts_and_are_throttling_first() -> None:
    # Model Studio's TPM limit answers insufficient_quota: a momentary spike is ridden out.
    row, sleeps, _, pacer = await run([err(429, "insufficient_quota")] * 6 + [OK], max_attempts=2)
    assert row.status == "ok"
    assert row.attempts == 7  # every request sent is counted...
    assert [s.throttled for s in pacer.outcomes] == ["quota"] * 6 + [None]  # ...and slows
    assert len(sleeps) == 6


async def test_a_minute_of_nothing_but_quota_429s_stops_the_run() -> None:
    forever = iter(lambda: err(429, "Throttling.AllocationQuota"), None)
    with pytest.raises(RunStopped, match="quota or token rate exhausted") as stopped:
        await run(forever, max_attempts=3)
    assert stopped.value.exit_code == 3
    assert "rerun the same command to resume" in str(stopped.value)


def test_any_other_answer_restarts_the_quota_minute() -> None:
    watch = QuotaWatch()
    quota = err(429, "insufficient_quota")
    from batchq.send.client import classify

    as_outcome = classify(quota.status_code, quota.content, quota.headers, 1.0)
    other = classify(503, b"{}", {}, 1.0)
    assert not watch.record(as_outcome, 0.0)
    assert not watch.record(as_outcome, QUOTA_STOP_S - 1)
    assert not watch.record(other, QUOTA_STOP_S - 0.5)  # a 503: not "nothing but quota"
    assert not watch.record(as_outcome, QUOTA_STOP_S)
    assert watch.record(as_outcome, 2 * QUOTA_STOP_S)


@pytest.mark.parametrize("status", [400, 429])
async def test_a_billing_code_stops_the_run_at_once_whatever_the_status(status: int) -> None:
    with pytest.raises(RunStopped, match="billing") as stopped:
        await run([err(status, "Arrearage"), OK])
    assert "Arrearage" in str(stopped.value)
