"""The pacer and its ceiling under a fake clock: its sleeps advance the clock instead of
waiting."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field, replace

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from batchq.config import Limits
from batchq.send.ceiling import CUT, CUT_EVERY_S, PLATEAU, PROBE, RECOVER_S, TRIAL_CUT, Ceiling
from batchq.send.limiter import FIRST_COMPLETION_GUESS, RAMP_S, RatePacer, Settled

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
        p.release(reserved, Settled(clock.now))
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
    p.release(a, Settled(clock.now, 10, 2))
    await p.acquire(40, 10)
    assert clock.now == pytest.approx(start + 1.1)


async def test_without_max_tokens_the_completion_guess_learns_from_answers() -> None:
    p, _ = pacer(tpm=60_000, concurrency=100)
    assert await p.acquire(10, None) == 10 + FIRST_COMPLETION_GUESS
    for _ in range(200):
        p.release(await p.acquire(10, None), Settled(0.0, 30, 20))
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
        p.release(first, Settled(p.now()))
        await wait_all_tasks_blocked()
        assert went.is_set()


async def answered_at(p: RatePacer, clock: FakeClock, per_s: float, seconds: float) -> None:
    """Answers coming back ok at ``per_s`` for ``seconds``."""
    for _ in range(int(per_s * seconds)):
        clock.now += 1 / per_s
        p.release(0, Settled(clock.now, 10, 5))


def refuse(p: RatePacer, clock: FakeClock, n: int, retry_after: float | None = None) -> None:
    for _ in range(n):
        p.release(0, Settled(clock.now, throttled="rate", retry_after=retry_after))


async def test_429s_beyond_chance_cut_the_whole_run_to_what_the_server_lets_through() -> None:
    p, clock = pacer(qps=150, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5  # past the ramp
    await answered_at(p, clock, 100, 10)  # the server really lets 100/s through
    assert p.rate(clock.now) == 150
    refuse(p, clock, 2, 1.0)  # two stray 429s among 200 answers: chance, no cut...
    assert p.rate(clock.now) == 150
    refuse(p, clock, 10, 1.0)  # ...a few more: beyond chance. A cut, on trial, held deep
    assert p.rate(clock.now) == pytest.approx(100 * TRIAL_CUT, rel=0.03)  # till judged
    cut = clock.now
    # Not a wall: Retry-After delays only the refused rows, the run goes on at once.
    await send_times(p, clock, 1)
    assert clock.now == pytest.approx(cut)
    # A 429 for a request sent before the cut is the same congestion event: no second cut.
    clock.now += CUT_EVERY_S
    for _ in range(50):
        p.release(0, Settled(cut - 0.01, throttled="rate"))
    assert p.rate(clock.now) == pytest.approx(100 * TRIAL_CUT, rel=0.03)
    # At the lower rate, no 429s: a limit. Kept, from just under the ceiling...
    while p.rate(clock.now) == pytest.approx(100 * TRIAL_CUT, rel=0.03):
        await answered_at(p, clock, 85, 0.1)
    kept = clock.now
    assert kept - cut < 10
    assert p.rate(kept) == pytest.approx(100 * CUT, rel=0.03)
    # ...it recovers as CUBIC does: back at the ceiling after RECOVER_S, flat near it,
    # then faster and faster, never beyond the configured limit.
    assert p.rate(kept + RECOVER_S) == pytest.approx(100, rel=0.03)
    assert p.rate(kept + 2 * RECOVER_S) == pytest.approx(100 * (1 + PROBE), rel=0.03)
    assert p.rate(kept + 10 * RECOVER_S) == 150


async def test_a_wall_of_429s_pauses_the_whole_run_for_retry_after() -> None:
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 300, 2)
    refuse(p, clock, 20, 2.0)  # a few percent: a cut, no pause
    assert p.paused_until < clock.now
    clock.now += CUT_EVERY_S
    refuse(p, clock, 30, 2.0)  # a second later, nothing but 429s: a wall
    cut = clock.now
    assert p.paused_until == pytest.approx(cut + 2.0)
    await send_times(p, clock, 1)
    assert clock.now == pytest.approx(cut + 2.0)


async def test_a_run_without_limits_learns_one_from_its_429s() -> None:
    p, clock = pacer(concurrency=500)
    await send_times(p, clock, 1)
    await answered_at(p, clock, 1000, 2)
    assert p.rate(clock.now) is None
    refuse(p, clock, 400)
    assert p.rate(clock.now) == pytest.approx(1000 * TRIAL_CUT, rel=0.05)


async def until_cut(p: RatePacer, clock: FakeClock, ok: int, refused: int) -> float:
    """Answers at ``ok`` per 0.1 s, and ``refused`` 429s, until the rate is cut."""
    before = p.rate(clock.now)
    for _ in range(100):
        await answered_at(p, clock, ok * 10, 0.1)
        refuse(p, clock, refused)
        if (rate := p.rate(clock.now)) != before:
            assert rate is not None
            return rate
    raise AssertionError("no cut")


async def test_a_cut_that_did_not_make_429s_rarer_is_undone() -> None:
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 300, 2)
    assert await until_cut(p, clock, 27, 3) < 300  # 10 % refused: it cannot tell yet
    for _ in range(30):  # still 10 % refused at the lower rate: the cut did not help
        await answered_at(p, clock, 250, 0.1)
        refuse(p, clock, 3)
    assert p.rate(clock.now) == 300
    assert p.floor == pytest.approx(0.10, abs=0.02)


async def test_a_cut_that_made_429s_rarer_stays() -> None:
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 200, 2)
    after_cut = await until_cut(p, clock, 20, 10)  # a third refused
    assert after_cut < 200
    for _ in range(30):  # at the lower rate, none
        await answered_at(p, clock, 200, 0.1)
    # Kept: from the trial's depth to just under the ceiling.
    assert p.rate(clock.now) == pytest.approx(after_cut / TRIAL_CUT * CUT, rel=0.05)
    assert p.floor == 0.0


@dataclass
class Server:
    """What the fake server does with each request: a sliding one-second window of
    ``limit`` requests, ``noise`` refused with 429 at random whatever the rate (before
    or after the window counts them), 503s, dropped connections (answered after
    ``timeout_s``) and slow answers. Counts what it saw."""

    limit: float | None = None
    noise: float = 0.0
    noise_first: bool = False
    fail_503: float = 0.0
    drop: float = 0.0
    slow: float = 0.0
    slow_s: float = 3.0
    timeout_s: float = 2.0
    latency: float = 0.05
    retry_after: float | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    window: deque[float] = field(default_factory=deque)
    times: list[float] = field(default_factory=list)  # when each request arrived
    admitted: list[float] = field(default_factory=list)  # when the limit let one through
    limit_429s: int = 0
    ok: int = 0

    def answer(self, now: float) -> tuple[float, Settled]:
        """(seconds until the answer, what it is) for a request arriving ``now``."""
        self.times.append(now)
        rate_429 = Settled(now, throttled="rate", retry_after=self.retry_after)
        if self.noise_first and self.rng.random() < self.noise:
            return self.latency, rate_429
        if self.limit is not None:
            while self.window and self.window[0] <= now - 1:
                self.window.popleft()
            if len(self.window) >= self.limit:
                self.limit_429s += 1
                return self.latency, rate_429
            self.window.append(now)
        self.admitted.append(now)
        roll = self.rng.random()
        for share, answer in (
            (0.0 if self.noise_first else self.noise, (self.latency, rate_429)),
            (self.fail_503, (self.latency, Settled(now))),
            (self.drop, (self.timeout_s, Settled(now))),
            (self.slow, (min(self.slow_s, self.timeout_s), Settled(now))),
        ):
            if roll < share:
                return answer
            roll -= share
        self.ok += 1
        return self.latency * (0.5 + self.rng.random()), Settled(now, 10, 5)


async def closed_loop(limits: Limits, server: Server, *, rows: int) -> float:
    """One sender taking every turn the pacer gives (its sleeps move the fake clock), until
    ``rows`` answers are ok; returns the seconds it took. Answers come back to the pacer
    when due. A row whose request failed waits out its backoff elsewhere: there are
    always rows to send, so what is sent is what the pacer allows."""
    clock = FakeClock()
    p = RatePacer(replace(limits, concurrency=10**6), clock=clock, sleep=clock.sleep)
    start = clock.now
    answers: list[tuple[float, int, int, Settled]] = []  # a heap by answer time
    count = itertools.count()
    while server.ok < rows:
        reserved = await p.acquire(5, 5)
        while answers and answers[0][0] <= clock.now:
            _, _, held, settled = heapq.heappop(answers)
            p.release(held, settled)
        after, settled = server.answer(clock.now)
        heapq.heappush(answers, (clock.now + after, next(count), reserved, settled))
    return clock.now - start


def sent_rate(server: Server, start: float, end: float) -> float:
    """Requests per second the server received between ``start`` and ``end``."""
    return sum(1 for t in server.times if start <= t < end) / (end - start)


NOISE = [
    pytest.param(Server(noise=0.05), id="5% 429s"),
    pytest.param(Server(noise=0.10, retry_after=1.0), id="10% 429s, Retry-After"),
    pytest.param(
        Server(noise=0.05, fail_503=0.03, drop=0.02, slow=0.03, retry_after=1.0),
        id="5% 429s, Retry-After, 503s, drops, slow answers",
    ),
    pytest.param(
        Server(noise=0.07, fail_503=0.05, drop=0.03, slow=0.05, latency=0.8),
        id="7% 429s, 503s, drops, slow answers, 800 ms latency",
    ),
]


@pytest.mark.parametrize("server", NOISE)
async def test_random_429s_among_other_faults_do_not_wear_the_rate_down(server: Server) -> None:
    # The reproduction: 250 QPS configured, no limit on the server. The rule before
    # this (a cut to the ok answers' rate) took this run to 87 req/s, then lower.
    elapsed = await closed_loop(Limits(qps=250, concurrency=300), server, rows=8000)
    first = server.times[0]
    last_first_attempt = sorted(server.times)[8000 - 1]  # about the end of the fresh rows
    assert sent_rate(server, first + 3, last_first_attempt) >= 0.9 * 250
    seconds = range(int(first), int(first + elapsed) - 1)
    assert max(sent_rate(server, t, t + 1) for t in seconds) <= 250 * 1.05
    assert server.ok == 8000


LIMITS = [
    pytest.param(Server(limit=100), id="limit"),
    pytest.param(Server(limit=100, retry_after=1.0), id="limit, Retry-After"),
    pytest.param(Server(limit=100, noise=0.05), id="limit, 5% random 429s"),
    pytest.param(
        Server(limit=100, noise=0.05, noise_first=True, retry_after=1.0),
        id="limit, 5% random 429s before it, Retry-After",
    ),
    pytest.param(
        Server(limit=100, noise=0.05, fail_503=0.03, drop=0.02, latency=0.2),
        id="limit, 5% random 429s, 503s, drops, 200 ms latency",
    ),
    # With answers 0.4-1.2 s late, what was let through in the second before a cut is
    # read a latency late: the ramp's first cut read 76 of a limit of 100 on seed 1, and
    # the run held 91 a second for 30 s. Seeds of bench/pacer_seeds.py.
    *(
        pytest.param(
            Server(limit=100, noise=0.05, fail_503=0.03, drop=0.02, latency=0.8, rng=rng),
            id=f"limit, 5% random 429s, 503s, drops, 800 ms latency, seed {seed}",
        )
        for seed, rng in ((seed, random.Random(seed)) for seed in range(6))
    ),
]


@pytest.mark.parametrize("server", LIMITS)
async def test_a_real_limit_is_found_and_held_under_random_429s(server: Server) -> None:
    # Configured at 300 against a server that lets 100 a second through: 6,000 rows.
    elapsed = await closed_loop(Limits(qps=300, concurrency=300), server, rows=6000)
    ideal = (
        6000 / 100 / (1 - (server.noise + server.fail_503 + server.drop) * (1 - server.noise_first))
    )
    admitted = server.admitted
    steady = [t for t in admitted if admitted[0] + 10 <= t < admitted[-1] - 2]
    assert len(steady) / (steady[-1] - steady[0]) >= 95
    assert server.limit_429s < 0.05 * len(server.times)
    assert elapsed <= 1.15 * ideal


async def test_a_burst_429_makes_the_ramp_gentler() -> None:
    # Model Studio's "Request rate increased too quickly": ramp again from half of where
    # the rate stands, over twice as long; a second one within a second changes nothing.
    p, clock = pacer(qps=100, concurrency=500)
    await send_times(p, clock, 1)
    await answered_at(p, clock, 100, RAMP_S)  # the server lets all of it through
    assert p.rate(clock.now) == 100
    burst = clock.now
    p.release(0, Settled(clock.now, throttled="burst"))
    p.release(0, Settled(clock.now, throttled="burst"))
    assert p.rate(burst) == pytest.approx(50)
    assert p.rate(burst + RAMP_S) == pytest.approx(75)
    assert p.rate(burst + 2 * RAMP_S) == 100
    # A rate-limit 429 does not touch the ramp.
    p.release(0, Settled(burst + 2 * RAMP_S, throttled="rate"))
    assert p.rate(burst + 2 * RAMP_S) == 100


def test_a_cut_after_a_step_up_reads_the_new_rate_let_through() -> None:
    # 80 a second for 5 s, then 100 a second (the server's limit), a quarter of what is
    # sent beyond it refused from 6 s on. A count decaying over 2 s still remembers the 80
    # (it read 90 here): every cut after a step up went below the limit.
    ceiling, t, cut = Ceiling(), 0.0, None
    rate, ramping = (lambda now: 300.0), (lambda now: False)
    for n, (until, per_second) in enumerate([(5.0, 80), (6.5, 100)]):
        while t < until and cut is None:
            ceiling.sent(t)
            cut = ceiling.observe(Settled(t, 10, 5), t + 0.05, rate=rate, ramping=ramping)
            if n and t > 6.0 and round(t * per_second) % 4 == 0:
                refused = Settled(t, throttled="rate")
                cut = cut or ceiling.observe(refused, t + 0.05, rate=rate, ramping=ramping)
            t += 1 / per_second
    assert cut is not None
    assert ceiling.rate(t) == pytest.approx(100 * TRIAL_CUT, rel=0.03)


async def test_beyond_a_limit_that_showed_a_cut_does_not_read_it_lower() -> None:
    # The 429s that make a cut are many when random ones happen to come in a cluster, and
    # then the answers let through read low: on the fake server, 85 in the second where a
    # limit of 100 let 94 through. Beyond a limit that showed, a cut goes back near it.
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 200, 2)
    limit = await until_cut(p, clock, 20, 10) / TRIAL_CUT
    for _ in range(30):  # at the lower rate, none refused: a limit, kept
        await answered_at(p, clock, 200, 0.1)
    while (rate := p.rate(clock.now)) is not None and rate < 1.2 * limit:  # probing beyond
        await answered_at(p, clock, limit, 0.1)
    await answered_at(p, clock, 0.8 * limit, 1.0)  # then a second of 80 % answered...
    for _ in range(100):  # ...and on, with many 429s
        await answered_at(p, clock, 0.8 * limit, 0.1)
        refuse(p, clock, 4)
        if (cut := p.rate(clock.now)) is not None and cut < limit:
            break
    assert cut == pytest.approx(CUT * CUT * limit, rel=0.02)  # not CUT x 80 %


async def test_answers_sent_before_a_verdict_still_measure_what_is_let_through() -> None:
    # A verdict on a cut starts the rate's curve again but is no cut: answers to what was
    # sent before it still count. (Ignoring them left a one-second reading a quarter full
    # with 800 ms answers: a cut to 52 of 230, and a run at 46 % of its rate.)
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 200, 2)
    after_cut = await until_cut(p, clock, 20, 10)
    while p.rate(clock.now) == after_cut:  # none refused at the lower rate: a limit, kept
        await answered_at(p, clock, 200, 0.01)
    kept = p.rate(clock.now)
    assert kept == pytest.approx(after_cut / TRIAL_CUT * CUT, rel=0.05)
    # From the verdict on, answers 0.8 s after their requests at 180 a second, then 429s
    # beyond chance.
    for _ in range(180):
        clock.now += 1 / 180
        p.release(0, Settled(clock.now - 0.8, 10, 5))
    for _ in range(40):
        clock.now += 1 / 180
        p.release(0, Settled(clock.now - 0.8, 10, 5))
        p.release(0, Settled(clock.now, throttled="rate"))
        if (rate := p.rate(clock.now)) is not None and rate < kept * 0.9:
            break
    assert rate == pytest.approx(180 * CUT, rel=0.03)  # what got through (not 43 of it)


async def test_429s_of_a_trials_first_second_are_no_wall() -> None:
    # Just after a cut, the server's window still holds the burst that made it: what is
    # sent in that second is refused in bulk whatever the new rate. (Read as a wall, a
    # run's start was cut again to 70 of a limit of 100 and paused: 1.23x the ideal.)
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 200, 2)
    on_trial = await until_cut(p, clock, 20, 10)
    cut = clock.now
    clock.now = cut + CUT_EVERY_S + 0.05
    for i in range(100):  # sent within the second after the cut: 40 % refused
        sent = cut + 0.5 + i * 0.004
        p.release(0, Settled(sent, throttled="rate", retry_after=1.0) if i % 5 < 2
                  else Settled(sent, 10, 5))  # fmt: skip
    assert p.rate(clock.now) == on_trial
    assert p.paused_until < clock.now


async def test_the_rate_settles_just_under_the_ceiling() -> None:
    # A one-second window counts arrivals, which the network bunches: right at the limit,
    # some are refused all the same.
    p, clock = pacer(qps=300, concurrency=500)
    await send_times(p, clock, 1)
    clock.now += 5
    await answered_at(p, clock, 200, 2)
    after_cut = await until_cut(p, clock, 20, 10)
    while p.rate(clock.now) == after_cut:  # none refused at the lower rate: a limit, kept
        await answered_at(p, clock, 200, 0.01)
    ceiling = after_cut / TRIAL_CUT
    assert p.rate(clock.now + RECOVER_S) == pytest.approx(ceiling * PLATEAU, rel=0.002)
