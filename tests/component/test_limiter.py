"""The pacer under a fake clock: its sleeps advance the clock instead of waiting. Its
ceiling (what the server lets through, learned from 429s) is tested in test_ceiling.py."""

from __future__ import annotations

import heapq
import itertools

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from batchq.config import Limits
from batchq.send.limiter import FIRST_COMPLETION_GUESS, RAMP_S, RatePacer, Settled
from tests.component.fake_server import FakeClock

pytestmark = pytest.mark.anyio


def pacer(**limits: float) -> tuple[RatePacer, FakeClock]:
    clock = FakeClock()
    return RatePacer(Limits(**limits), clock=clock, sleep=clock.sleep), clock  # type: ignore[arg-type]


async def send_times(p: RatePacer, clock: FakeClock, n: int, *, tokens: int = 0) -> list[float]:
    times = []
    for _ in range(n):
        reserved = await p.acquire(tokens, 0)
        times.append(clock.now)
        p.settle(reserved, Settled(clock.now))
    return times


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_a_per_minute_limit_is_spent_evenly_after_the_ramp() -> None:
    p, clock = pacer(qpm=600)  # 10/s: one every 0.1 s, never 600 at once
    times = await send_times(p, clock, 60)
    steady = [t for t in times if t - times[0] > RAMP_S + 0.2]
    assert steady
    assert set(gaps(steady)) == {0.1}


async def test_the_run_ramps_up_over_its_first_seconds() -> None:
    p, clock = pacer(qps=20)
    times = await send_times(p, clock, 80)
    first, later = gaps(times)[0], gaps(times)[-1]
    assert first == pytest.approx(1 / (20 * 0.25))  # starts at a quarter of the rate
    assert later == pytest.approx(1 / 20)
    assert gaps(times) == sorted(gaps(times), reverse=True)  # only ever speeds up
    assert sum(1 for t in times if t - times[0] < 1.0) < 20


async def test_the_lowest_of_qps_and_qpm_wins() -> None:
    p, clock = pacer(qps=50, qpm=600)
    times = await send_times(p, clock, 60)
    assert gaps(times)[-1] == pytest.approx(0.1)


async def test_tokens_are_reserved_and_corrected_by_usage() -> None:
    p, clock = pacer(tpm=6000, concurrency=10)  # 100 tokens/s
    start = clock.now
    a = await p.acquire(40, 10)  # reserves 50 tokens: 0.5 s of the token timeline
    assert (a, clock.now) == (50, start)
    await p.acquire(40, 10)
    assert clock.now == pytest.approx(start + 0.5)
    await p.acquire(40, 10)
    assert clock.now == pytest.approx(start + 1.0)
    # The first answer used 10 tokens, not 50: 0.4 s of budget comes back.
    p.settle(a, Settled(clock.now, 10, 2))
    await p.acquire(40, 10)
    assert clock.now == pytest.approx(start + 1.1)


async def test_without_max_tokens_the_completion_guess_learns_from_answers() -> None:
    p, _ = pacer(tpm=60_000, concurrency=100)
    assert await p.acquire(10, None) == 10 + FIRST_COMPLETION_GUESS
    for _ in range(200):
        p.settle(await p.acquire(10, None), Settled(0.0, 30, 20))
    assert await p.acquire(10, None) == pytest.approx(30, abs=2)


class VirtualTime:
    """A clock for many tasks: when all are blocked, time jumps to the next wake-up."""

    def __init__(self) -> None:
        self.now = 100.0
        self._wakeups: list[tuple[float, int, anyio.Event]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        event = anyio.Event()
        heapq.heappush(self._wakeups, (self.now + seconds, id(event), event))
        await event.wait()

    async def drive(self) -> None:
        while True:
            await wait_all_tasks_blocked()
            if not self._wakeups:
                return
            self.now, _, event = heapq.heappop(self._wakeups)
            event.set()


async def test_concurrent_requests_cannot_overrun_the_token_budget() -> None:
    clock = VirtualTime()
    p = RatePacer(Limits(tpm=600, concurrency=50), clock=clock, sleep=clock.sleep)  # 10 tokens/s
    start = clock.now
    sent: list[float] = []

    async def one() -> None:
        await p.acquire(5, 5)
        sent.append(clock.now - start)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
        tg.start_soon(clock.drive)
    assert len(sent) == 20
    assert max(sent) == pytest.approx(19.0)
    # 20 requests of 10 tokens at 10 tokens/s: never more than 10 tokens in any second.
    for second in range(20):
        assert sum(1 for t in sent if second <= t < second + 1) <= 1


async def test_the_concurrency_cap_holds_requests_until_a_release() -> None:
    p, _ = pacer(concurrency=2)
    first = await p.acquire(1, 1)
    await p.acquire(1, 1)
    went = anyio.Event()

    async def third() -> None:
        await p.acquire(1, 1)
        went.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await wait_all_tasks_blocked()
        assert not went.is_set()
        p.settle(first, Settled(p.now()))
        await wait_all_tasks_blocked()
        assert went.is_set()


async def test_a_burst_429_makes_the_ramp_gentler() -> None:
    # Model Studio's "Request rate increased too quickly": ramp again from half of where
    # the rate stands, over twice as long; a second one within a second changes nothing.
    p, clock = pacer(qps=100, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += RAMP_S
    assert p.rate(clock.now) == 100
    burst = clock.now
    p.settle(0, Settled(clock.now, throttled="burst"))
    p.settle(0, Settled(clock.now, throttled="burst"))
    assert p.rate(burst) == pytest.approx(50)
    assert p.rate(burst + RAMP_S) == pytest.approx(75)
    assert p.rate(burst + 2 * RAMP_S) == 100
