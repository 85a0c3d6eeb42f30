"""The pacer: the one place that holds rate state (concurrency, QPS, QPM, TPM, slowdown).

Workers ``await pacer.acquire(...)`` before each attempt and ``pacer.release(...)`` after
it; a 429 is reported with ``pacer.penalise(...)``. The interface is small on purpose,
so that a shared actor can implement it for many worker processes later.

Requests are spaced by the generic cell rate algorithm: each acquire books the next free
send time on a timeline (``1 / rate`` seconds a request, ``tokens / token_rate`` seconds
of the token timeline) and sleeps until it. Sending is therefore smooth — a per-minute
budget is spent evenly, never in a burst (Model Studio enforces RPM/60 and TPM/60 per
second and rejects sudden surges) — and waiting is one sleep, never polling.

    rate(t) = limit × slowdown(t) × ramp(t)
    ramp(t) = min(1, RAMP_FROM + (1 − RAMP_FROM) × t / RAMP_S)        from the first send
    on a 429 that shows a limit (two or more 429s in about a second, at least CUT_SHARE of
    the answers; at most one cut per CUT_EVERY_S, and only for requests sent since the
    last cut):
        ceiling  = min(rate, requests answered ok per second lately)
        rate    := ceiling × (CUT + RECOVER × t × (1 + t / 10)), t seconds after the cut,
                   up to the limit: slowly near the ceiling, faster the longer all is well
        and every sender waits out the 429's Retry-After
    A stray 429 (a burst, a hiccup) only sends its own row into backoff.
    Two guards keep a cut from going deeper than the server asks:
    - the ok rate is read over at least MEASURE_S of answers (the first answers of a run
      that starts at full concurrency, or of the end of a pause, would read a fraction of
      the real rate);
    - 429s that a cut did not make rarer are not the rate's doing (a server that refuses
      a steady share at random, at any rate): when, with the rate still at or under
      where the last cut found it, the share of 429s since that cut is at least
      CUT_SHARE and NOISE_KEEP of the share that made it, that share becomes the floor,
      and only a share above floor + CUT_SHARE cuts again. Without this, a steady 5 % of
      random 429s cut a run with no limit to 3 % of its speed within a minute (fake
      clock, tests/component/test_limiter.py).

So a run configured above the server's real limit settles just under it instead of
cycling through 429 storms; a run with no limit set learns one from its 429s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from batchq.config import Limits
from batchq.events import Sink, Slowdown, discard

__all__ = ["Pacer", "RatePacer"]

RAMP_FROM, RAMP_S = 0.25, 2.0
CUT, RECOVER, CUT_EVERY_S = 0.95, 0.001, 1.0
MIN_RATE = 0.5
#: 429s must be at least this share of recent answers before the rate is cut.
CUT_SHARE = 0.03
#: The ok rate is measured over at least this long before it sets a ceiling.
MEASURE_S = 0.5
#: 429s still this share of the share that made the last cut are not the rate's doing.
NOISE_KEEP = 0.5
#: When max_tokens is absent, reserve this many completion tokens until answers teach more.
FIRST_COMPLETION_GUESS = 256


class Pacer(Protocol):
    async def acquire(self, prompt_tokens: int, max_completion: int | None) -> int:
        """Wait until one more request may be sent now; return the tokens it reserved.
        Every acquire is followed by exactly one ``release``."""

    def release(self, reserved: int, used: int | None, completion: int | None) -> None:
        """The request is over: free its slot and correct its reservation by the tokens
        the answer reports (``used`` total, ``completion``; None when there is no answer)."""

    def penalise(self, retry_after: float | None, sent_at: float) -> None:
        """Report a 429 for a request sent at ``sent_at`` (the pacer's clock)."""

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
        self._next_send = self._next_tokens = -math.inf
        self._paused_until = -math.inf
        # slowdown: the ceiling found by the last cut, and when it was made
        self._ceiling: float | None = None
        self._cut_at = -math.inf
        self._cuts = 0
        self._cut_from: float | None = None  # the rate the last cut was made from
        self._cut_share = 0.0  # the share of 429s that made it
        self._floor = 0.0  # the share of 429s found to come at any rate (noise)
        self._since_cut = [0, 0]  # answers ok, 429s, since the last cut
        self._sent, self._ok, self._throttled = _Meter(), _Meter(), _Meter()
        self._completion_avg = float(FIRST_COMPLETION_GUESS)

    def now(self) -> float:
        return self._clock()

    @property
    def paused_until(self) -> float:
        """Every sender waits until then (a 429's Retry-After), on the pacer's clock."""
        return self._paused_until

    def rate(self, now: float) -> float | None:
        """Requests per second allowed at ``now`` (None: no limit)."""
        limit = self._limit
        if self._ceiling is not None:
            t = max(0.0, now - self._cut_at)
            recovered = self._ceiling * (CUT + RECOVER * t * (1 + t / 10))
            limit = recovered if limit is None else min(limit, recovered)
        if limit is None:
            return None
        ramp = 1.0 if self._started is None else (now - self._started) / RAMP_S
        return limit * min(1.0, RAMP_FROM + (1 - RAMP_FROM) * ramp)

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
            now, cuts = self._clock(), self._cuts
            if self._started is None:
                self._started = now
            at = max(now, self._paused_until)
            if (rate := self.rate(at)) is not None:
                at = max(at, self._next_send)
                # Spaced at the rate of the booked time, not of now: a queue of bookings
                # made while ramping up (or slowed down) does not lock that rate in.
                self._next_send = at + 1 / (self.rate(at) or rate)
            if self._token_rate is not None:
                at = max(at, self._next_tokens)
                self._next_tokens = at + tokens / self._token_rate
            if at > now:
                await self._sleep(at - now)
            # A limit found meanwhile voids this booking, made at the old rate: book again,
            # after the pause, at the new rate.
            if cuts == self._cuts:
                self._sent.add(max(at, now))
                return

    def release(self, reserved: int, used: int | None, completion: int | None) -> None:
        self._slots.release()
        if used is None:
            return
        self._ok.add(self._clock())
        self._since_cut[0] += 1
        if self._token_rate is not None:
            self._next_tokens += (used - reserved) / self._token_rate
        if completion is not None:
            self._completion_avg += 0.05 * (completion - self._completion_avg)

    def penalise(self, retry_after: float | None, sent_at: float) -> None:
        now = self._clock()
        self._throttled.add(now)
        if sent_at < self._cut_at:
            return  # sent before the last cut: that congestion event is answered
        self._since_cut[1] += 1
        if now - self._cut_at < CUT_EVERY_S:
            return  # the same congestion event: one cut is enough
        throttled = self._throttled.count(now)
        answered = self._ok.rate(now)
        share = throttled / (answered + throttled) if answered else 1.0
        if throttled < 2 or share < self._floor + CUT_SHARE:
            return  # a stray 429 among answers ok: no sign of a limit; its row backs off
        if answered is not None and now - self._ok.since < MEASURE_S:
            return  # too few answers yet to say what the server serves
        current = self.rate(now)
        if self._cut_did_not_help(current):
            ok, refused = self._since_cut
            self._floor = refused / (ok + refused)  # their share at any rate: noise
            if share < self._floor + CUT_SHARE:
                return
        if answered is None:  # nothing got through yet: halve what is being sent
            answered = (current or self._sent.rate(now) or 2 * MIN_RATE) / 2
        self._cut_from = current if current is not None else self._sent.rate(now)
        self._cut_share, self._since_cut = share, [0, 0]
        self._ceiling = max(MIN_RATE, answered if current is None else min(current, answered))
        self._cut_at = now
        self._cuts += 1
        self._next_send = -math.inf  # bookings start over from the end of the pause
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        # What the server answers is measured afresh from the end of the pause: a rate
        # measured across it would read low, and the next cut would go too deep.
        self._ok.restart(max(now, self._paused_until))
        self._emit(Slowdown(self._ceiling * CUT, max(0.0, self._paused_until - now)))

    def _cut_did_not_help(self, current: float | None) -> bool:
        """Whether the 429s since the last cut are still common (CUT_SHARE, and NOISE_KEEP
        of the share that made it) with the rate not yet back above where it found it."""
        ok, refused = self._since_cut
        if self._cut_from is None or current is None or ok + refused < 20:
            return False
        share = refused / (ok + refused)
        return current <= self._cut_from and share >= max(CUT_SHARE, NOISE_KEEP * self._cut_share)


class _Meter:
    """Events per second, as a count decaying with a time constant of one second."""

    def __init__(self) -> None:
        self._count, self._at, self._since = 0.0, -math.inf, math.inf
        self._from = -math.inf

    @property
    def since(self) -> float:
        """When counting started (inf before the first event)."""
        return self._since

    def add(self, now: float) -> None:
        if now < self._from:
            return  # before a restart's start: not part of what is measured
        self._count = self._count * math.exp(self._at - now) + 1.0
        self._at = now
        self._since = min(self._since, now)

    def restart(self, at: float) -> None:
        """Count from zero from ``at`` on; events before ``at`` are ignored."""
        self._count, self._at, self._since, self._from = 0.0, at, at, at

    def count(self, now: float) -> float:
        """Events in about the last second."""
        return self._count * math.exp(self._at - now) if self._count else 0.0

    def rate(self, now: float) -> float | None:
        """Events per second lately (None before the first): the decaying count, corrected
        for having started from zero, over at least a tenth of a second."""
        if self._since == math.inf or now < self._since:
            return None
        return self.count(now) / (1 - math.exp(-max(0.1, now - self._since)))
