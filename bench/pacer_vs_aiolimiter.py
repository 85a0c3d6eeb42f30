"""batchq's pacer (a GCRA timeline) beside aiolimiter's leaky bucket, on the real clock.

    pip install -e '.[bench]'
    python bench/pacer_vs_aiolimiter.py

64 workers take turns as fast as each limiter lets them for a few seconds, with no
server: what is measured is the sending pattern. Model Studio enforces RPM / 60 and
TPM / 60 per second and rejects sudden surges, so what matters is the most requests in
any 100 ms and in the first second, against the configured rate; and the CPU a turn
costs (the event loop's wake-ups included). ``AsyncLimiter(rate, period)`` lets its
whole capacity through at once: a QPM limit is a minute's budget in the first instant.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
from aiolimiter import AsyncLimiter

from batchq.config import Limits
from batchq.send.limiter import RatePacer, Settled

WORKERS = 64


async def pattern(acquire: Callable[[], Awaitable[None]], seconds: float) -> list[float]:
    """The instants the workers got their turns, from the first one, for ``seconds``."""
    times: list[float] = []
    start = time.monotonic()

    async def worker() -> None:
        while time.monotonic() - start < seconds:
            await acquire()
            times.append(time.monotonic() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(WORKERS):
            tg.start_soon(worker)
    return times


def most_in(times: list[float], window: float) -> int:
    best, low = 0, 0
    for high, at in enumerate(times):
        while times[low] <= at - window:
            low += 1
        best = max(best, high - low + 1)
    return best


async def measure(
    name: str, rate_per_s: float, make: Callable[[], Callable[[], Awaitable[None]]], seconds: float
) -> None:
    acquire = make()
    cpu = time.process_time()
    times = sorted(await pattern(acquire, seconds))
    cpu_us = (time.process_time() - cpu) * 1e6 / max(1, len(times))
    times = [t for t in times if t < seconds]  # not the turns booked before the end
    first = sum(1 for t in times if t < 1.0)
    print(
        f"{name:<34} {len(times) / seconds:>7.1f}/s {most_in(times, 0.1):>6} "
        f"{first:>8} {cpu_us:>8.1f}   (rate {rate_per_s:g}/s: {rate_per_s / 10:g} a 100 ms)"
    )


def pacer(limits: Limits) -> Callable[[], Callable[[], Awaitable[None]]]:
    def make() -> Callable[[], Awaitable[None]]:
        p = RatePacer(limits)

        async def acquire() -> None:
            reserved = await p.acquire(10, 10)
            p.settle(reserved, Settled(p.now(), 20, 10))

        return acquire

    return make


def bucket(rate: float, period: float) -> Callable[[], Callable[[], Awaitable[None]]]:
    def make() -> Callable[[], Awaitable[None]]:
        limiter = AsyncLimiter(rate, period)
        return limiter.acquire

    return make


async def main() -> None:
    print(f"{'limiter':<34} {'rate':>9} {'max/100ms':>6} {'first 1 s':>8} {'CPU µs':>8}")
    await measure("batchq pacer, qps 200", 200, pacer(Limits(qps=200)), 4)
    await measure("aiolimiter AsyncLimiter(200, 1)", 200, bucket(200, 1), 4)
    await measure("batchq pacer, qpm 1200", 20, pacer(Limits(qpm=1200)), 4)
    await measure("aiolimiter AsyncLimiter(1200, 60)", 20, bucket(1200, 60), 4)


if __name__ == "__main__":
    anyio.run(main)
