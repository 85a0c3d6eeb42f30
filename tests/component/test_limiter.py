"""The pacer under a fake clock: its sleeps advance the clock instead of waiting."""

from __future__ import annotations

import heapq
import itertools
from collections import deque

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from batchq.config import Limits
from batchq.limiter import CUT, FIRST_COMPLETION_GUESS, RAMP_S, RECOVER, RatePacer

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await checkpoint()


def pacer(**limits: float) -> tuple[RatePacer, FakeClock]:
    clock = FakeClock()
    return RatePacer(Limits(**limits), clock=clock, sleep=clock.sleep), clock  # type: ignore[arg-type]


async def send_times(p: RatePacer, clock: FakeClock, n: int, *, tokens: int = 0) -> list[float]:
    times = []
    for _ in range(n):
        reserved = await p.acquire(tokens, 0)
        times.append(clock.now)
        p.release(reserved, None, None)
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
    p.release(a, 10, 2)
    await p.acquire(40, 10)
    assert clock.now == pytest.approx(start + 1.1)


async def test_without_max_tokens_the_completion_guess_learns_from_answers() -> None:
    p, _ = pacer(tpm=60_000, concurrency=100)
    assert await p.acquire(10, None) == 10 + FIRST_COMPLETION_GUESS
    for _ in range(200):
        p.release(await p.acquire(10, None), 30, 20)
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
        p.release(first, None, None)
        await wait_all_tasks_blocked()
        assert went.is_set()


async def answered_at(p: RatePacer, clock: FakeClock, per_s: float, seconds: float) -> None:
    """Answers coming back ok at ``per_s`` for ``seconds``."""
    for _ in range(int(per_s * seconds)):
        clock.now += 1 / per_s
        p.release(0, 10, 5)


async def test_a_429_cuts_the_whole_run_to_just_under_what_the_server_answers() -> None:
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5  # past the ramp
    await answered_at(p, clock, 100, 3)  # the server really serves 100/s
    assert p.rate(clock.now) == 300
    p.penalise(1.0, sent_at=clock.now)  # one stray 429 among 100 answers ok: no cut...
    assert p.rate(clock.now) == 300
    for _ in range(4):  # ...but a few percent of the answers are: a limit
        p.penalise(1.0, sent_at=clock.now)
    assert p.rate(clock.now) == pytest.approx(95, rel=0.02)
    # Every sender waits out Retry-After.
    cut = clock.now
    await send_times(p, clock, 1)
    assert clock.now == pytest.approx(cut + 1.0)
    # A 429 for a request sent before the cut is the same congestion event: no second cut.
    for _ in range(10):
        p.penalise(None, sent_at=cut - 0.01)
    clock.now = cut + 2.0
    assert p.rate(clock.now) == pytest.approx(100 * (CUT + RECOVER * 2 * 1.2), rel=0.02)
    # Then it recovers, slowly near the ceiling (back to it after about 18 s), faster
    # the longer all is well, and never beyond the configured limit.
    clock.now = cut + 18
    assert p.rate(clock.now) == pytest.approx(100, rel=0.02)
    clock.now = cut + 200
    assert p.rate(clock.now) == 300


async def test_a_run_without_limits_learns_one_from_its_first_429() -> None:
    p, clock = pacer(concurrency=500)
    await send_times(p, clock, 1)
    await answered_at(p, clock, 1000, 2)
    assert p.rate(clock.now) is None
    for _ in range(40):
        p.penalise(None, sent_at=clock.now)
    assert p.rate(clock.now) == pytest.approx(950, rel=0.02)


async def test_after_a_cut_sending_restarts_from_the_end_of_the_pause_at_the_new_rate() -> None:
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 100, 3)
    for _ in range(5):
        p.penalise(2.0, sent_at=clock.now)
    pause_end = clock.now + 2.0
    times = await send_times(p, clock, 3)
    assert times[0] == pytest.approx(pause_end)
    assert gaps(times) == [pytest.approx(1 / p.rate(t), rel=0.01) for t in times[:2]]
    assert 1 / gaps(times)[0] == pytest.approx(95, rel=0.03)


async def served(
    p: RatePacer,
    clock: FakeClock,
    seconds: float,
    *,
    refuse: float,
    capacity: float = 1000,
    server_qps: float | None = None,
    retry_after: float | None = None,
    latency: float = 0.05,
) -> list[float]:
    """A closed loop on the fake clock, 10 ms a step: the client sends at the pacer's rate
    (at most ``capacity``: what its concurrency allows) except while paused; answers come
    back ``latency`` later. The server refuses a share ``refuse`` of all requests at
    random, and what goes beyond ``server_qps``, with ``retry_after``. Returns the number
    of requests sent in each second."""
    owed = refused_owed = 0.0
    in_flight: deque[tuple[float, bool, float]] = deque()  # (answered at, refused, sent at)
    per_second, sent = [], 0
    for step in range(int(seconds * 100)):
        clock.now += 0.01
        while in_flight and in_flight[0][0] <= clock.now:
            _, refused, sent_at = in_flight.popleft()
            if refused:
                p.penalise(retry_after, sent_at=sent_at)
            else:
                p.release(0, 10, 5)
        if clock.now >= p.paused_until:
            rate = min(p.rate(clock.now) or capacity, capacity)
            share = refuse
            if server_qps is not None and rate > server_qps:
                share = max(share, 1 - server_qps / rate)
            owed += rate * 0.01
            while owed >= 1:
                owed -= 1
                refused_owed += share
                refused = refused_owed >= 1
                refused_owed -= refused
                in_flight.append((clock.now + latency, refused, clock.now))
                sent += 1
        if step % 100 == 99:
            per_second.append(sent)
            sent = 0
    return per_second


@pytest.mark.parametrize(("refuse", "retry_after"), [(0.05, None), (0.10, None), (0.05, 1.0)])
async def test_random_429s_at_any_rate_do_not_wear_the_run_down(
    refuse: float, retry_after: float | None
) -> None:
    # A server that refuses a steady share at random, whatever the rate: a cut does not
    # make those 429s rarer, so after a first cut or two they become the floor and the
    # run goes back to full speed (before the floor, 5 % of 429s took it to 3 %).
    p, clock = pacer(concurrency=500)
    await send_times(p, clock, 1)
    clock.now += RAMP_S
    rates = await served(p, clock, 120, refuse=refuse, retry_after=retry_after)
    assert min(rates[5:]) > 600  # after the first cuts and their pauses
    assert sum(rates[-30:]) / 30 > 990


async def test_a_real_limit_is_still_found_under_random_429s() -> None:
    p, clock = pacer(concurrency=500)
    await send_times(p, clock, 1)
    clock.now += RAMP_S
    rates = await served(p, clock, 120, refuse=0.05, server_qps=400)
    late = rates[-60:]
    assert 360 < sum(late) / len(late) < 440
    assert max(late) < 480


async def test_a_limit_under_the_configured_rate_is_held_without_429_storms() -> None:
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += RAMP_S
    rates = await served(p, clock, 60, refuse=0.0, server_qps=100)
    assert all(90 < r < 110 for r in rates[5:])


async def test_a_run_without_limits_reads_the_server_over_half_a_second_before_cutting() -> None:
    # It starts at full concurrency: the first answers, a few milliseconds' worth, would
    # read as a tenth of what the server serves (the cut went to 41/s against 400).
    p, clock = pacer(concurrency=500)
    await send_times(p, clock, 1)
    clock.now += RAMP_S
    rates = await served(p, clock, 30, refuse=0.0, server_qps=400)
    assert all(360 < r < 440 for r in rates[2:])
