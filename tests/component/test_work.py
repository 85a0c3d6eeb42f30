"""The per-row retry loop, over httpx.MockTransport, with sleeps recorded instead of slept."""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest

from batchq.client import Client
from batchq.errors import RunStopped
from batchq.events import Event
from batchq.work import Item, answer

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
    def __init__(self) -> None:
        self.acquired = 0
        self.released: list[int | None] = []
        self.penalties: list[float | None] = []

    async def acquire(self, prompt_tokens: int, max_completion: int | None) -> int:
        self.acquired += 1
        return prompt_tokens + (max_completion or 0)

    def release(self, reserved: int, used: int | None, completion: int | None) -> None:
        self.released.append(used)

    def penalise(self, retry_after: float | None, sent_at: float) -> None:
        self.penalties.append(retry_after)

    def now(self) -> float:
        return 0.0


async def run(responses: list[httpx.Response], *, max_attempts: int = 5, prior: int = 0):  # type: ignore[no-untyped-def]
    script: Iterator[httpx.Response] = iter(responses)
    sleeps: list[float] = []
    events: list[Event] = []
    pacer = Pacer()

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = httpx.MockTransport(lambda request: next(script))
    item = Item(7, "r7", {"model": "qwen-plus", "messages": []}, 10, None, prior)
    async with Client("http://sim/v1", api_key=None, timeout_s=5, max_connections=1,
                      transport=transport) as client:  # fmt: skip
        row = await answer(item, client=client, pacer=pacer, max_attempts=max_attempts,
                           emit=events.append, sleep=sleep, rng=random.Random(0))  # fmt: skip
    return row, sleeps, events, pacer


async def test_transient_failures_are_retried_until_ok() -> None:
    row, sleeps, events, pacer = await run([err(503), err(500), OK])
    assert row["status"] == "ok"
    assert row["response"] == "yo"
    assert row["attempts"] == 3
    assert row["_row"] == 7
    assert row["_id"] == "r7"
    assert row["model"] == "qwen-plus"
    assert len(sleeps) == 2
    assert pacer.acquired == 3  # every attempt waits on the pacer
    assert pacer.released == [None, None, 4]  # ... and gives back what it used
    assert [e.attempt for e in events] == [1, 2]  # type: ignore[union-attr]


async def test_a_429_pauses_the_whole_run_and_honours_retry_after() -> None:
    row, sleeps, _, pacer = await run([err(429, "limit_requests", **{"Retry-After": "3"}), OK])
    assert row["status"] == "ok"
    assert pacer.penalties == [3.0]
    assert sleeps == [3.0]


async def test_a_fault_that_never_passes_ends_the_row_not_the_run() -> None:
    row, sleeps, _, _ = await run([err(503)] * 4, max_attempts=4)
    assert row["status"] == "error"
    assert row["attempts"] == 4
    assert row["http_status"] == 503
    assert row["error_code"] == "x"
    assert len(sleeps) == 3


async def test_a_400_is_recorded_once_without_retrying() -> None:
    row, sleeps, _, _ = await run([err(400, "data_inspection_failed")])
    assert (row["status"], row["attempts"], row["error_code"]) == (
        "error", 1, "data_inspection_failed",
    )  # fmt: skip
    assert sleeps == []


async def test_attempts_count_across_runs() -> None:
    row, _, _, _ = await run([err(503), OK], prior=2)
    assert row["attempts"] == 4


async def test_auth_failure_stops_the_run() -> None:
    with pytest.raises(RunStopped, match="HTTP 401"):
        await run([err(401, "invalid_api_key")])
