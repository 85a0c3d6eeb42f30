"""The pacer: the one place that holds rate state (concurrency, QPS, QPM, TPM, slowdown).

Workers ``await pacer.acquire(...)`` before each attempt and ``pacer.settle(...)`` after
it, saying what the attempt came to (a :class:`Settled`: its usage, or the 429 it got).
The interface is small on purpose, so that a shared actor can implement it for many
worker processes later.

Requests are spaced by the generic cell rate algorithm: each acquire books the next free
send time on a timeline (``1 / rate`` seconds a request, ``tokens / token_rate`` seconds
of the token timeline) and sleeps until it. Sending is therefore smooth — a per-minute
budget is spent evenly, never in a burst (Model Studio enforces RPM/60 and TPM/60 per
second and rejects sudden surges) — and waiting is one sleep, except for a turn more than
RECHECK_S ahead (a slow rate, a block, a pause; a token timeline that answers using less
than their reservation pull back in): that is looked at again each RECHECK_S rather than
booked, so that a rate that rises is taken up at once.

    rate(t) = min(limit × ramp(t), ceiling(t))
    ramp(t) = min(1, from + (1 − from) × (t − start) / ramp_s)   from 0.25 over 2 s

``ceiling(t)`` is what the server lets through, learned from its 429s, told from random
ones (``batchq.send.ceiling``). A cut pauses every sender when the 429s are a wall and the
server gave a Retry-After. A burst 429 (Model Studio's ``limit_burst_rate``) makes the
ramp gentler: it starts again from half of where it was, over twice as long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from batchq.config import Limits
from batchq.events import Sink, Slowdown, Speedup, discard
from batchq.send.ceiling import (
    BLOCKED_RATE,
    CUT_EVERY_S,
    MIN_RATE,
    Ceiling,
    Raise,
    Settled,
    Throttle,
)

__all__ = ["Pacer", "RatePacer", "Settled", "Throttle"]

RAMP_FROM, RAMP_S, RAMP_MAX_S = 0.25, 2.0, 32.0
#: When max_tokens is absent, reserve this many completion tokens until answers teach more.
FIRST_COMPLETION_GUESS = 256
#: A request whose turn (or tokens) would come later than this looks again after it: the
#: rate may rise meanwhile (answers back after a block, usage below a reservation).
RECHECK_S = 1.0


class Pacer(Protocol):
    async def acquire(self, prompt_tokens: int, max_completion: int | None) -> int:
        """Wait until one more request may be sent now; return the tokens it reserved.
        Every acquire is followed by exactly one ``settle``."""

    def settle(self, reserved: int, settled: Settled) -> None:
        """The request is over: free its slot, correct its reservation by the tokens the
        answer reports, and learn from what it came to (a 429, or an answer let through)."""

    def now(self) -> float:
        """The pacer's clock."""


class RatePacer:
    """Concurrency cap, request and token rate, ramp-up and slowdown; see the module doc."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        emit: Sink = discard,
    ) -> None:
        self._clock, self._sleep, self._emit = clock, sleep, emit
        self._slots = anyio.Semaphore(limits.concurrency)
        rates = [r for r in (limits.qps, limits.qpm and limits.qpm / 60) if r]
        self._limit: float | None = min(rates) if rates else None
        self._token_rate = limits.tpm / 60 if limits.tpm else None
        self._started: float | None = None
        self._ramp_from, self._ramp_s, self._burst_at = RAMP_FROM, RAMP_S, -math.inf
        self._next_send = self._next_tokens = -math.inf
        self._paused_until = -math.inf
        self._ceiling = Ceiling()
        self._completion_avg = float(FIRST_COMPLETION_GUESS)
        self._completions = 0

    def now(self) -> float:
        return self._clock()

    @property
    def paused_until(self) -> float:
        """Every sender waits until then (a wall's Retry-After), on the pacer's clock."""
        return self._paused_until

    @property
    def floor(self) -> float:
        """The share of requests found to be refused at any rate (noise)."""
        return self._ceiling.floor

    def rate(self, now: float) -> float | None:
        """Requests per second allowed at ``now`` (None: no limit)."""
        limit = self._limit
        if limit is not None:
            limit *= self._ramp(now)
        if (ceiling := self._ceiling.rate(now)) is not None:
            limit = ceiling if limit is None else min(limit, ceiling)
        return limit

    async def acquire(self, prompt_tokens: int, max_completion: int | None) -> int:
        guess = max_completion if max_completion is not None else round(self._completion_avg)
        reserved = prompt_tokens + guess
        await self._slots.acquire()
        try:
            await self._wait_turn(reserved)
        except BaseException:
            self._slots.release()
            raise
        return reserved

    async def _wait_turn(self, tokens: int) -> None:
        while True:
            now, changes = self._clock(), self._ceiling.changes
            if self._started is None:
                self._started = now
            if self._token_rate is not None and self._next_tokens - now > RECHECK_S:
                # Far off on a token timeline that answers may still pull in (their usage
                # below what was reserved): look again soon rather than book it. Booked,
                # --tpm 60 did 1 of 5 short rows in 120 s.
                await self._sleep(RECHECK_S)
                continue
            at = max(now, self._paused_until)
            if (rate := self.rate(at)) is not None:
                at = max(at, self._next_send)
                if at - now > RECHECK_S:
                    # Far off (a slow rate, a block, a pause): look again soon rather than
                    # book it. Booked, senders that queued during a block at one request a
                    # second slept up to 30 s into the recovered run.
                    await self._sleep(RECHECK_S)
                    continue
                # Spaced at the rate of the booked time, not of now: a queue of bookings
                # made while ramping up (or slowed down) does not lock that rate in.
                self._next_send = at + 1 / max(MIN_RATE, self.rate(at) or rate)
            if self._token_rate is not None:
                at = max(at, self._next_tokens)
                self._next_tokens = at + tokens / self._token_rate
            if at > now:
                await self._sleep(at - now)
            # A limit found meanwhile voids this booking, made at the old rate: book again,
            # after the pause, at the new rate.
            if changes == self._ceiling.changes:
                self._ceiling.sent(max(at, now))
                return

    def book(self, count: int, tokens: int, *, span_s: float) -> list[float]:
        """Book up to ``count`` send times of ``tokens`` each, on the pacer's clock, for
        senders that pace themselves (the Ray engine's workers): the next free times on
        the timelines, as many as fall within ``span_s`` of the first (at least one). An
        empty list: the first is more than RECHECK_S off; ask again after it. A cut or a
        raise voids the times booked before it (``changes`` tells). The sender says when
        each went out (``sent``)."""
        now = self._clock()
        if self._started is None:
            self._started = now
        times: list[float] = []
        while len(times) < count:
            at = max(now, self._paused_until)
            if (rate := self.rate(at)) is not None:
                at = max(at, self._next_send)
            if self._token_rate is not None:
                at = max(at, self._next_tokens)
            if at - now > (span_s + (times[0] - now) if times else RECHECK_S):
                break
            if rate is not None:
                self._next_send = at + 1 / max(MIN_RATE, self.rate(at) or rate)
            if self._token_rate is not None:
                self._next_tokens = at + tokens / self._token_rate
            times.append(at)
        return times

    def sent(self, at: float) -> None:
        """A request booked by ``book`` went out at ``at`` (the sender says so)."""
        self._ceiling.sent(at)

    @property
    def changes(self) -> int:
        """Cuts and raises so far: a time booked before the last one is void."""
        return self._ceiling.changes

    def settle(self, reserved: int, settled: Settled) -> None:
        self._slots.release()
        self.learn(reserved, settled)

    def learn(self, reserved: int, settled: Settled) -> None:
        """Learn from what one attempt came to (``settle`` without its slot: a sender
        that holds its own, elsewhere)."""
        if settled.used is not None:
            if self._token_rate is not None:
                self._next_tokens += (settled.used - reserved) / self._token_rate
            if settled.completion is not None:
                # The mean of the answers so far, then a moving one: the first answers
                # replace the guess at once.
                self._completions += 1
                weight = max(0.05, 1 / self._completions)
                self._completion_avg += weight * (settled.completion - self._completion_avg)
        now = self._clock()
        if settled.throttled == "burst":
            self._gentler_ramp(now)
        change = self._ceiling.observe(settled, now, rate=self.rate, ramping=self._ramping)
        if change is None:
            return
        self._next_send = -math.inf  # bookings start over from the change (or the pause)
        if isinstance(change, Raise):
            to = change.to
            if to is None or (self._limit is not None and self._limit < to):
                to = self._limit  # no faster than the job's own limits
            self._emit(Speedup(to, change.why))
            return
        if change.pause_until is not None and change.pause_until > self._paused_until:
            self._paused_until = change.pause_until
            self._ceiling.paused(change.pause_until)
        pause = max(0.0, self._paused_until - now)
        rate = BLOCKED_RATE if change.blocked else self.rate(now) or MIN_RATE
        self._emit(Slowdown(rate, pause, change.share, blocked=change.blocked))

    def _ramp(self, at: float) -> float:
        """The share of the limit the ramp allows at ``at`` (1 before the first send)."""
        if self._started is None:
            return 1.0
        return min(
            1.0, self._ramp_from + (1 - self._ramp_from) * (at - self._started) / self._ramp_s
        )

    def _ramping(self, at: float) -> bool:
        """Whether the rate was still ramping up at ``at``."""
        return self._limit is not None and self._ramp(at) < 1

    def _gentler_ramp(self, now: float) -> None:
        """A burst limit refused a surge: ramp again from half of where the rate stands,
        over twice as long (at most once per CUT_EVERY_S)."""
        if now - self._burst_at < CUT_EVERY_S or self._limit is None:
            return
        self._burst_at = now
        current = self.rate(now)
        share = (current / self._limit) if current is not None else 1.0
        self._ramp_from = max(RAMP_FROM / 4, min(1.0, share) / 2)
        self._ramp_s = min(RAMP_MAX_S, 2 * self._ramp_s)
        self._started = now
        self._next_send = -math.inf
