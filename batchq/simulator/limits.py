"""The shapes of a server's rate limit, as servers enforce them. Pure: each is told the
time of every request and says whether it is let through. The simulator and the pacer's
fake-clock tests use the same shapes.

    window          a sliding window of one second: at most ``rate`` requests in any
                    second (Model Studio enforces RPM/60 per second this way)
    bucket          a token bucket refilling ``rate`` a second, holding one second's worth
                    (OpenAI-style limits, many gateways)
    minute-bucket   a token bucket refilling ``rate`` a second, holding a minute's worth
    minute-window   a fixed window: at most 60 × ``rate`` requests in each whole minute
                    counted from the first request

Every shape lets through ``rate`` a second in the long run; they differ in how much more
they let through at once (a bucket's burst, once) and where they refuse.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal, Protocol, get_args

__all__ = ["SHAPES", "FixedWindow", "Limit", "Shape", "SlidingWindow", "TokenBucket", "limit"]

Shape = Literal["window", "bucket", "minute-bucket", "minute-window"]
SHAPES: tuple[Shape, ...] = get_args(Shape)


class Limit(Protocol):
    def admit(self, now: float) -> bool:
        """Whether a request arriving at ``now`` is let through (and counted)."""


class SlidingWindow:
    """At most ``limit`` requests within any ``period`` seconds."""

    def __init__(self, limit: float, period: float) -> None:
        self.limit, self.period = limit, period
        self._times: deque[float] = deque()

    def admit(self, now: float) -> bool:
        times = self._times
        while times and times[0] <= now - self.period:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` a second; a request takes one."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, -math.inf

    def admit(self, now: float) -> bool:
        if self._at > -math.inf:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class FixedWindow:
    """At most ``limit`` requests in each ``period``, the periods counted from the first
    request."""

    def __init__(self, limit: float, period: float) -> None:
        self.limit, self.period = limit, period
        self._start: float | None = None
        self._index, self._count = 0, 0

    def admit(self, now: float) -> bool:
        if self._start is None:
            self._start = now
        index = math.floor((now - self._start) / self.period)
        if index != self._index:
            self._index, self._count = index, 0
        if self._count >= self.limit:
            return False
        self._count += 1
        return True


def limit(rate: float, shape: Shape = "window") -> Limit:
    """A limit letting ``rate`` requests a second through in the long run, of ``shape``."""
    match shape:
        case "window":
            return SlidingWindow(rate, 1.0)
        case "bucket":
            return TokenBucket(rate, rate)
        case "minute-bucket":
            return TokenBucket(rate, 60 * rate)
        case "minute-window":
            return FixedWindow(60 * rate, 60.0)
    raise ValueError(f"no limit shape {shape!r}: one of {', '.join(SHAPES)}")
