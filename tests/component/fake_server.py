"""A server and a sender on a fake clock, for the pacer's tests and ``bench/pacer_seeds.py``:
no network, no simulator, seconds of simulated time in milliseconds."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from anyio.lowlevel import checkpoint

from batchq.config import Limits
from batchq.send.limiter import RatePacer, Settled
from batchq.simulator.limits import Shape, limit

__all__ = ["FakeClock", "Server", "closed_loop", "sent_rate", "steady_rate"]


class FakeClock:
    """A clock whose sleeps advance it instead of waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await checkpoint()


@dataclass
class Server:
    """What the fake server does with each request: a limit of ``limit`` requests a
    second of ``shape`` (``batchq.simulator.limits``), every request refused with a quota
    429 for ``throttle_for`` seconds from ``throttle_after`` after the first, ``noise``
    refused with 429 at random whatever the rate (before or after the limit counts them),
    503s, dropped connections (answered after ``timeout_s``) and slow answers. 429s come
    back after ``refuse_s``, answers after about ``latency``. Counts what it saw."""

    limit: float | None = None
    shape: Shape = "window"
    throttle_for: float = 0.0
    throttle_after: float = 5.0
    noise: float = 0.0
    noise_first: bool = False
    fail_503: float = 0.0
    drop: float = 0.0
    slow: float = 0.0
    slow_s: float = 3.0
    timeout_s: float = 2.0
    latency: float = 0.05
    refuse_s: float = 0.01
    retry_after: float | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    times: list[float] = field(default_factory=list)  # when each request arrived
    admitted: list[float] = field(default_factory=list)  # when the limit let one through
    limited: list[float] = field(default_factory=list)  # when the limit refused one
    throttled: list[float] = field(default_factory=list)  # when the throttle refused one
    ok: int = 0

    def __post_init__(self) -> None:
        self._limit = limit(self.limit, self.shape) if self.limit is not None else None

    @property
    def limit_429s(self) -> int:
        return len(self.limited)

    @property
    def ends(self) -> float:
        """The share of admitted requests answered ok."""
        return 1 - (self.fail_503 + self.drop + (0 if self.noise_first else self.noise))

    def answer(self, now: float) -> tuple[float, Settled]:
        """(seconds until the answer, what it is) for a request arriving ``now``."""
        self.times.append(now)
        rate_429 = Settled(now, throttled="rate", retry_after=self.retry_after)
        start = self.times[0] + self.throttle_after
        if start <= now < start + self.throttle_for:
            self.throttled.append(now)
            return self.refuse_s, Settled(now, throttled="quota")
        if self.noise_first and self.rng.random() < self.noise:
            return self.refuse_s, rate_429
        if self._limit is not None and not self._limit.admit(now):
            self.limited.append(now)
            return self.refuse_s, rate_429
        self.admitted.append(now)
        roll = self.rng.random()
        for share, answer in (
            (0.0 if self.noise_first else self.noise, (self.refuse_s, rate_429)),
            (self.fail_503, (self.latency, Settled(now))),
            (self.drop, (self.timeout_s, Settled(now))),
            (self.slow, (min(self.slow_s, self.timeout_s), Settled(now))),
        ):
            if roll < share:
                return answer
            roll -= share
        self.ok += 1
        return self.latency * (0.5 + self.rng.random()), Settled(now, 10, 5)


async def closed_loop(
    limits: Limits,
    server: Server,
    *,
    rows: int,
    watch: Callable[[float, RatePacer], None] | None = None,
) -> float:
    """One sender taking every turn the pacer gives (its sleeps move the fake clock), until
    ``rows`` answers are ok; returns the seconds it took. Answers come back to the pacer
    when due (``watch`` is shown the pacer after each). A row whose request failed waits
    out its backoff elsewhere: there are always rows to send, so what is sent is what the
    pacer allows."""
    clock = FakeClock()
    p = RatePacer(replace(limits, concurrency=10**6), clock=clock, sleep=clock.sleep)
    start = clock.now
    answers: list[tuple[float, int, int, Settled]] = []  # a heap by answer time
    count = itertools.count()
    while server.ok < rows:
        reserved = await p.acquire(5, 5)
        while answers and answers[0][0] <= clock.now:
            _, _, held, settled = heapq.heappop(answers)
            p.settle(held, settled)
            if watch is not None:
                watch(clock.now, p)
        after, settled = server.answer(clock.now)
        heapq.heappush(answers, (clock.now + after, next(count), reserved, settled))
    return clock.now - start


def sent_rate(server: Server, start: float, end: float) -> float:
    """Requests per second the server received between ``start`` and ``end``."""
    return sum(1 for t in server.times if start <= t < end) / (end - start)


def steady_rate(server: Server) -> float:
    """Requests per second the limit let through once the run settled: from 10 s after
    the limit first refused one (after a minute bucket's burst) to 2 s before the end; for
    a per-minute window, over its whole minutes but the first and the last."""
    admitted = server.admitted
    first, last = admitted[0], admitted[-1]
    if server.shape == "minute-window":
        minutes = int((last - first) // 60)
        n = sum(1 for t in admitted if first + 60 <= t < first + 60 * minutes)
        return n / (60 * (minutes - 1))
    begin = server.limited[0] if server.shape == "minute-bucket" and server.limited else first
    steady = [t for t in admitted if begin + 10 <= t < last - 2]
    return len(steady) / (steady[-1] - steady[0])
