"""The pacer: the one place that holds rate state (QPS, QPM, TPM and the run-wide pause).

Workers ``await pacer.acquire(tokens)`` before each attempt and report back with
``pacer.settle(...)`` and ``pacer.penalise(...)``. The interface is small on purpose, so
that a shared actor can implement it for many worker processes later.

Sending is smooth: each leaky bucket holds at most ``BURST_S`` seconds of its rate, so
a per-minute budget is spent evenly over the minute, never in one burst (Model Studio
enforces RPM/60 and TPM/60 per second, and rejects sudden surges).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import anyio
from aiolimiter import AsyncLimiter

from batchq.config import Limits

__all__ = ["BURST_S", "Pacer", "RatePacer"]

BURST_S = 0.05


class Pacer(Protocol):
    async def acquire(self, tokens: int) -> None:
        """Wait until one more request of ``tokens`` estimated tokens may be sent now.
        Every acquire is followed by exactly one ``release``."""

    def release(self, estimated: int, used: int | None) -> None:
        """The request is over: free its slot, and correct its token reservation by the
        tokens the answer reports (None: no answer)."""

    def penalise(self, retry_after: float | None) -> None:
        """Report a 429: every sender pauses for ``retry_after`` seconds when given."""


def _bucket(rate_per_s: float) -> AsyncLimiter:
    capacity = max(1.0, rate_per_s * BURST_S)
    return AsyncLimiter(capacity, capacity / rate_per_s)


class RatePacer:
    """The concurrency cap, QPS, QPM and TPM leaky buckets (aiolimiter), and a run-wide
    pause after a 429."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slots = anyio.Semaphore(limits.concurrency)
        self._paused_until = 0.0
        self._requests = [_bucket(r) for r in (limits.qps, (limits.qpm or 0) / 60) if r]
        self._tokens: AsyncLimiter | None = None
        if limits.tpm:
            per_s = limits.tpm / 60
            self._tokens = AsyncLimiter(per_s, 1.0)

    async def acquire(self, tokens: int) -> None:
        await self._slots.acquire()
        try:
            await self._pace(tokens)
        except BaseException:
            self._slots.release()
            raise

    async def _pace(self, tokens: int) -> None:
        # Not polling: each sleep lasts exactly until the pause ends; the loop only
        # repeats when another 429 extended the pause meanwhile.
        while (wait := self._paused_until - self._clock()) > 0:  # noqa: ASYNC110
            await anyio.sleep(wait)
        for bucket in self._requests:
            await bucket.acquire()
        if self._tokens is not None:
            await self._tokens.acquire(min(tokens, self._tokens.max_rate))

    def release(self, estimated: int, used: int | None) -> None:
        self._slots.release()

    def penalise(self, retry_after: float | None) -> None:
        if retry_after:
            self._paused_until = max(self._paused_until, self._clock() + retry_after)
