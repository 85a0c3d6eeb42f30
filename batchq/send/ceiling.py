"""What the server lets through, learned from its 429s: the ceiling on the pacer's rate,
and the share of 429s that comes at any rate (the floor). No I/O and no clock of its
own: every call says when it is (the pacer's clock).

A limit shows itself as 429s whose share grows with the rate; a server that refuses a
steady share at random (capacity throttling, another job on the account, a gateway)
refuses that share at any rate; a throttle (a shared account's spike, a quota refilling)
refuses everything for a while, then ends. The ceiling is in one of five phases:

    phase       the rate it allows (÷ (1 − floor), the floor's lower bound: a ceiling is
                kept as the rate let through)
    FREE        none: the pacer's own
    TRIAL       ceiling × depth, flat, until the verdict (depth TRIAL_CUT from FREE, CUT
                once a limit has shown)
    HOLD        ceiling × PLATEAU × cubic(t − the curve's start)
    BLOCKED     halving every HALF_S from the rate it was entered at, down to BLOCKED_RATE
    RECOVERING  doubling every DOUBLE_S from where the block left it, up to the rate
                before the block

    cubic(t) = 1 − (1 − CUT) × ((K − t) / K)³          up to the ceiling (t < K)
             = 1 + PROBE × ((t − K) / (K × patience))³   then beyond it
    K = RECOVER_S + 2 × horizon, or the period of a per-minute limit; patience is
    MIN_PATIENCE, doubled each time the limit is confirmed, up to MAX_PATIENCE

It moves between them so:

    FREE ─────429s beyond the floor─────▶ TRIAL ──verdict: a limit──▶ HOLD ◀─┐ 429s probing
      ▲                                   │  ▲                        │  └──┘ beyond it: cut
      └──verdict: noise (back to the rate ┘  └──429s under the ceiling┘
         it was cut from; HOLD if one was kept)
    any phase ──everything sent refused──▶ BLOCKED ──an answer let through──▶ RECOVERING
    RECOVERING ──back at the rate before──▶ the phase before the block (FREE or HOLD)
    RECOVERING ──429s beyond the floor──▶ TRIAL (everything refused: BLOCKED)

Everything is counted by when requests were sent, in tenths of a second: a 429 comes back
fast and an answer a latency late, so among the answers in, 429s are too many for a
while after any change, and what was let through reads as the rate of a latency ago. A
request sent longer ago than the ``horizon`` (twice the time a 429 takes to come back)
and not refused was let through (an error or a dropped connection too: the limit let
it pass). The rules:

- ``floor`` is the share of 429s that comes at any rate (noise); 0 until learned.
- A cut is made when the 429s among the requests of the last METER_S exceed the floor by
  CUT_SHARE (RAMP_CUT_SHARE while ramping up) and CUT_Z standard errors of that share,
  and, with no ceiling in force (below a wall), the share of the LONG_S before by as
  much: a share that has not grown is noise. With no ceiling in force, after the ramp,
  requests judged so teach the floor once they are older than METER_S (a limit that
  begins shows at the front first). At most one cut per
  CUT_EVERY_S plus twice the horizon, counting only requests sent since the last (at
  least MIN_REQUESTS of them).
- A cut reads what the server lets through: the requests sent while the limit was
  binding (the last tenths before the horizon refused SATURATED_SHARE beyond the floor,
  at least SATURATED_S of them), less those refused, but not in the WINDOW_S after
  sending began again (a sliding window emptied lets its whole limit through at once,
  then next to nothing till that second ends); when too few tenths show it, the most
  let through in a WINDOW_S. A token bucket lets its burst through once, and only the
  rate it refills at after that: a reading never starts before the previous cut.
- A cut is a trial. The requests sent from TRIAL_DELAY_S after it (a server's window
  still counts what was sent before) until enough are in to tell two predictions apart
  are the sample: noise predicts the share of 429s of the LONG_S before the cut, a limit
  the share that lets as many through as before (the floor, for a cut deep enough).
  Nearer the limit's, the cut stays (HOLD); nearer the noise's, it was not needed and is
  undone. Either way the sample's 429s teach the floor; a sample still refused in bulk
  (a wall) teaches nothing: that cut was too shallow, and the next goes deeper.
- In HOLD, 429s while probing beyond the ceiling cut at once with no trial, to the most
  let through in any WINDOW_S of the LOOKBACK_S before the horizon. Probing costs 429s
  (and a token bucket filled while the rate was under it lets a burst through that reads
  high), so a limit kept again within CONFIRM_SHARE of the last is probed more slowly.
- Everything sent since the last cut refused is a block: nothing to read, so the rate
  halves every HALF_S until an answer comes back, then doubles every DOUBLE_S back to the
  rate held before the block (a throttle that ends is not a limit). A second block ended
  within PERIOD_MAX_S of the first reads what was let through from the first's end to
  its start over the time between the two ends: a fixed per-minute window lets a
  minute's worth through from the minute's start, then nothing till the minute ends.
  When that is less than the rate before, it is the ceiling to come back to, probed as
  slowly as that period.
- A ``Retry-After`` delays its own row (the caller's backoff); it pauses the whole run
  only when the 429s are a wall (WALL_SHARE or more beyond the floor, beyond chance).

The pacer (``batchq.send.limiter``) takes the lower of its own rate (limits, ramp) and this
ceiling; it reports each request sent (``sent``) and each one settled (``observe``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from batchq.send.sends import BIN_N, WINDOW_S, Sends, beyond, span

__all__ = ["Ceiling", "Cut", "Phase", "Raise", "Settled", "Throttle"]

CUT, RECOVER_S, CUT_EVERY_S = 0.97, 3.0, 1.0
#: Beyond the ceiling, the rate grows as PROBE × u³ (u in K): 1 % over it after 2K, 54 %
#: after 4K, twice it after 4.7K. Slower than back up to it: the overshoot is paid.
PROBE = 0.02
#: Until a limit has shown, a cut on trial holds the rate this far below the ceiling, so
#: that a limit shows plainly.
TRIAL_CUT = 0.85
MIN_RATE = 0.5
#: Where the rate settles, as a share of the ceiling: a server's one-second window counts
#: arrivals, which the network bunches, so a rate right at its limit is refused now and
#: then all the same.
PLATEAU = 0.98
#: 429s must exceed the floor by this share of recent requests before the rate is cut...
CUT_SHARE = 0.02
#: ...and by this many standard errors of that share.
CUT_Z = 2.0
#: ...or SURE_Z against a share known well (the floor of a limit held, the share of the
#: LONG_S before): the test runs at every 429, and at CUT_Z chance alone would cut about
#: once a minute under 5 % of random 429s.
SURE_Z = 3.0
#: While the rate ramps up, by this share: 5-10 % of random 429s do not cut the ramp
#: short; a limit the ramp crosses soon refuses more than that.
RAMP_CUT_SHARE = 0.15
#: The share of 429s is counted over the requests of about this long...
METER_S = 2.0
#: ...and over this long for what noise predicts after a cut (a share refused at any rate).
LONG_S = 10.0
#: ...and only once the requests counted span this long.
MEASURE_S = 0.5
#: Requests that judge a cut: enough to put HELPED_Z standard errors between each
#: prediction and the middle, within these bounds (FIRST_VERDICT_N for the verdict that
#: teaches the floor, when its sample holds 429s).
VERDICT_N, FIRST_VERDICT_N, VERDICT_MAX_N, HELPED_Z = 120, 400, 500, 2.0
#: A probing cut reads what was let through from the requests sent this long before it.
LOOKBACK_S = 3.0
#: The requests that judge a cut are those sent from this long after it.
TRIAL_DELAY_S = 1.0
#: 429s this share beyond the floor are a wall: the whole run waits out Retry-After.
WALL_SHARE = 0.2
#: The floor is learned from about this many recent requests (older ones count half).
FLOOR_N = 4000
#: While blocked the rate halves every HALF_S down to BLOCKED_RATE (what keeps asking
#: whether the block has ended); once answers come back it doubles every DOUBLE_S.
HALF_S, BLOCKED_RATE, DOUBLE_S = 0.25, 1.0, 0.5
#: Two blocks this close read the rate let through between them (a per-minute limit)...
PERIOD_MAX_S = 150.0
#: ...which is a limit when it is below this share of the rate before the block.
PERIOD_SHARE = 0.95
#: 429s are compared with the share of the LONG_S before when it holds this many requests.
STEADY_N = 100
#: At a slow rate the spans grow (up to SPAN_MAX_S): a share is counted over COUNT_N
#: requests at least, a rate read in bins of BIN_N requests at least (WINDOW_S, a sliding
#: window's period, or READ_N requests), a trial lasts TRIAL_MAX_S at most, however few
#: requests it judges.
COUNT_N, READ_N, TRIAL_MAX_S = 40, 20, 20.0
#: ...and the LONG_S and LOOKBACK_S spans hold these many.
LONG_N, LOOKBACK_N = 200, 30
#: A cut needs this many requests counted, unless all were refused; a run of MEASURE_S
#: whose BLOCK_N requests or more were all refused is a block at once.
MIN_REQUESTS, BLOCK_N = 10, 5
#: The horizon is at least this long: a 429 not yet back is presumed on its way.
MIN_HORIZON_S = 0.05
#: Tenths of a second whose 429s are this share beyond the floor were sent while a limit
#: was binding; SATURATED_S of them in a row are read alone.
SATURATED_SHARE, SATURATED_S = 0.2, 0.2
#: A limit found is probed beyond MIN_PATIENCE times as slowly as it recovers up to it;
#: a trial that keeps the ceiling within CONFIRM_SHARE of the last one kept confirms it:
#: the rate then probes twice as slowly again, up to MAX_PATIENCE times.
MIN_PATIENCE, CONFIRM_SHARE, MAX_PATIENCE = 2, 0.05, 16

#: The kind of a 429: a request-rate limit, a burst limit, or token quota throttling.
Throttle = Literal["rate", "burst", "quota"]


class Phase(enum.Enum):
    """The ceiling's phase (see the module doc)."""

    FREE = "free"
    TRIAL = "trial"
    HOLD = "hold"
    BLOCKED = "blocked"
    RECOVERING = "recovering"


@dataclass(frozen=True, slots=True)
class Settled:
    """What one attempt came to, as the pacer needs to know it: when it was sent (the
    pacer's clock), the tokens its answer reports (``used`` total and ``completion``,
    None without an answer), and, for a 429, its kind and ``Retry-After``."""

    sent_at: float
    used: int | None = None
    completion: int | None = None
    throttled: Throttle | None = None
    retry_after: float | None = None


class Cut(NamedTuple):
    """A cut of the whole run's rate: the share of 429s that made it, until when every
    sender waits (a wall's Retry-After; None: no pause), and whether everything was
    refused (a block: the rate halves until answers come back)."""

    share: float
    pause_until: float | None
    blocked: bool = False


class Raise(NamedTuple):
    """The whole run's rate goes up, to ``to`` (None: the pacer's own), and why."""

    to: float | None
    why: str


@dataclass(frozen=True, slots=True)
class _Before:
    """What a block interrupted: its ceiling (None: FREE, else HOLD), the rate to recover
    to, and the period its limit was read over (0: a second's window)."""

    ceiling: float | None
    rate: float
    period: float = 0.0


@dataclass(slots=True)
class _Block:
    """A block: what it interrupted, when it began and from what rate; once answers came
    back, when and from what rate the rate recovers."""

    before: _Before
    since: float
    from_rate: float
    let_through: int  # requests let through in all when it began
    healed_at: float = math.inf
    heal_rate: float = BLOCKED_RATE


@dataclass(slots=True)
class _Trial:
    """A cut on trial: what it replaced (to undo it), the 429s that made it, and what
    came of the requests sent in the window after it."""

    ceiling: float | None  # the ceiling before the cut (None: there was none)
    depth: float  # the share of the ceiling held while on trial
    share: float  # of 429s that made the cut, over ``requests``
    requests: int
    limit_share: float  # of 429s a limit predicts after the cut: as many let through
    before: float | None  # the rate the cut was made from
    since: float  # the requests sent from then until then are the sample
    period: float = 0.0  # of the per-minute limit it was cut under (0: none)
    until: float = math.inf
    noise_share: float = 0.0  # of 429s noise predicts: as over LONG_S before the cut
    sent: int = 0
    refused: int = 0

    def sample(self, least: int = VERDICT_N) -> float:
        """Requests that tell the two predictions apart (HELPED_Z errors from each to the
        middle), between ``least`` and VERDICT_MAX_N."""
        low, high = self.limit_share, self.noise_share
        errors = math.sqrt(low * (1 - low)) + math.sqrt(high * (1 - high))
        n = (HELPED_Z * errors / (high - low)) ** 2
        return min(VERDICT_MAX_N, max(least, n))

    def holds(self, sent_at: float) -> bool:
        return self.since <= sent_at < self.until


class Ceiling:
    """The ceiling and the floor; see the module doc."""

    def __init__(self) -> None:
        self.phase = Phase.FREE
        self._ceiling: float | None = None  # the rate let through (TRIAL, HOLD)
        self._curve_at = -math.inf  # where HOLD's curve starts (a cut, or a verdict)
        self._period = 0.0  # HOLD: the period its limit was read over (0: a second)
        self._kept: float | None = None  # the last ceiling a trial kept
        self._patience = MIN_PATIENCE  # K's multiple: grows as the limit is confirmed
        self._trial: _Trial | None = None  # TRIAL
        self._block: _Block | None = None  # BLOCKED, RECOVERING
        self._last_heal: tuple[float, int] | None = None  # when, and let through by then
        self._cut_at = -math.inf  # when the rate was last cut
        self._count_from = -math.inf  # 429s of requests sent before count for nothing
        self._quiet_until = -math.inf  # when sending last began again after none at all
        self._count_s = METER_S  # how long a share of 429s takes to count, at the rate sent
        self.changes = 0  # cuts and raises: a booking made before one is void
        self._noise: list[float] = [0.0, 0.0]  # 429s and requests the floor is learned from
        self._learned_to = -math.inf  # requests sent before taught the floor already
        self._sends = Sends()
        self._refusal_s = 0.0  # how long a 429 takes to come back: a moving average

    @property
    def floor(self) -> float:
        """The share of requests found to be refused at any rate (noise)."""
        refused, requests = self._noise
        return refused / requests if requests else 0.0

    @property
    def _floor_low(self) -> float:
        """The floor less CUT_Z standard errors: what turns a rate let through into one to
        send (a floor read high by chance would send over the limit all run long)."""
        floor, requests = self.floor, self._noise[1]
        return (
            max(0.0, floor - CUT_Z * math.sqrt(floor * (1 - floor) / requests)) if requests else 0.0
        )

    def rate(self, now: float) -> float | None:
        """The ceiling's rate at ``now`` (None: no ceiling)."""
        match self.phase:
            case Phase.FREE:
                return None
            case Phase.TRIAL:
                assert self._trial is not None
                return self._held() * self._trial.depth
            case Phase.HOLD:
                k, t = self._recover_s, max(0.0, now - self._curve_at)
                if t < k:
                    return self._held() * PLATEAU * (1 - (1 - CUT) * ((k - t) / k) ** 3)
                return self._held() * PLATEAU * (1 + PROBE * ((t - k) / (k * self._patience)) ** 3)
            case Phase.BLOCKED:
                assert self._block is not None
                halved = self._block.from_rate * math.pow(0.5, (now - self._block.since) / HALF_S)
                return max(BLOCKED_RATE, halved)
            case Phase.RECOVERING:
                assert self._block is not None
                block = self._block
                doubled = block.heal_rate * math.pow(2, max(0.0, now - block.healed_at) / DOUBLE_S)
                return min(block.before.rate, doubled)

    def _held(self) -> float:
        assert self._ceiling is not None
        return max(MIN_RATE, self._ceiling / (1 - self._floor_low))

    @property
    def _horizon(self) -> float:
        """Requests sent longer ago than this and not refused were let through."""
        return max(MIN_HORIZON_S, 2 * self._refusal_s)

    @property
    def _recover_s(self) -> float:
        """K: the later 429s are seen, and the longer the period of the limit, the
        slower the rate comes back to the ceiling (and probes beyond it)."""
        return max(RECOVER_S + 2 * self._horizon, self._period, self._count_s)

    def sent(self, at: float) -> None:
        """A request went out at ``at``."""
        if self._sends.first == math.inf:
            self._quiet_until = at
        self._sends.sent(at)
        if self._trial is not None and self._trial.holds(at):
            self._trial.sent += 1
        if self.phase is Phase.RECOVERING:
            assert self._block is not None
            if (self.rate(at) or 0) >= self._block.before.rate:
                self._resume(self._block.before, at)

    def paused(self, until: float) -> None:
        """Every sender waits until ``until``: 429s are counted afresh from requests sent
        after it (a rate measured across a pause reads low)."""
        self._count_from = max(self._count_from, until)
        self._quiet_until = max(self._quiet_until, until)

    def observe(
        self,
        settled: Settled,
        now: float,
        *,
        rate: Callable[[float], float | None],
        ramping: Callable[[float], bool],
    ) -> Cut | Raise | None:
        """Learn from a request settled at ``now``; a Cut when the whole run must slow, a
        Raise when it may go faster. ``rate(t)`` is the pacer's rate, ``ramping(t)``
        whether it was ramping up (asked only when a 429 may cut)."""
        refused = settled.throttled is not None
        if refused:
            self._refusal_s += 0.05 * (now - settled.sent_at - self._refusal_s)
            self._sends.refused(settled.sent_at)
            if self._trial is not None and self._trial.holds(settled.sent_at):
                self._trial.refused += 1
        if self.phase is Phase.BLOCKED:
            if refused or settled.sent_at < self._cut_at:
                return None
            return self._heal(now, rate)
        raised = self._judge(now) if self._trial is not None else None
        if refused and settled.sent_at >= self._cut_at:
            return self._consider_cut(now, settled.retry_after, rate, ramping) or raised
        return raised

    def _consider_cut(
        self,
        now: float,
        retry_after: float | None,
        rate: Callable[[float], float | None],
        ramping: Callable[[float], bool],
    ) -> Cut | None:
        """Cut when the 429s lately exceed the floor (see the module doc)."""
        horizon = self._horizon
        end = now - horizon
        current = rate(now)
        onset, walled = self._sends.refused_run(self._cut_at, end)
        if walled >= BLOCK_N and end - onset >= MEASURE_S:  # a wall: no need to wait
            return self._block_now(now, current, retry_after)
        if now - self._cut_at < CUT_EVERY_S + 2 * horizon:
            return None  # the same congestion event: one cut is enough
        pace = max(MIN_RATE, current or self._sends.rate(end - METER_S, end) or MIN_RATE)
        self._count_s = span(METER_S, COUNT_N, pace)
        start = max(self._count_from, end - self._count_s, self._sends.first)
        if end - start < MEASURE_S:
            return None  # too few requests yet to say what the server lets through
        requests, refused = self._sends.counts(start, end)
        if refused < 3 or (refused < requests and requests < MIN_REQUESTS):
            return None  # too few to tell (everything refused is a block, however few)
        floor, share = self.floor, refused / requests
        long_s = span(LONG_S, LONG_N, pace)
        before, refused_before = self._sends.counts(max(self._count_from, start - long_s), start)
        history = before >= STEADY_N  # enough to tell a share that grew from a steady one
        # While ramping up, or with no ceiling yet and no history to compare with, only a
        # clear excess: 5-10 % of random 429s do not cut the run short; a limit the ramp
        # crosses soon refuses more.
        noise = self.phase is Phase.FREE and history and not ramping(now)
        least = CUT_SHARE if noise or self.phase is not Phase.FREE else RAMP_CUT_SHARE
        z = SURE_Z if self.phase is Phase.HOLD else CUT_Z
        cut = beyond(share, requests, floor, least, z=z)
        wall = beyond(share, requests, floor, WALL_SHARE, z=z)
        if self._trial is not None and not (
            wall and beyond(share, requests, self._trial.noise_share, CUT_SHARE, z=z)
        ):
            # A cut is on trial: only a wall beyond what noise predicts says it was too
            # shallow (a share refused at any rate stays: its verdict undoes the cut).
            return None
        if cut and not wall:
            # With no ceiling in force, as many 429s as before are noise, not a limit.
            earlier = refused_before / before if history else 0.0
            cut = not noise or beyond(share, requests, earlier, CUT_SHARE, before, z=SURE_Z)
        if not cut:
            if noise and start > self._learned_to:
                # What was sent before this window was judged noise while it was the window
                # (its front, where a limit would begin, is never learned from): it is what
                # comes at any rate. Each request once.
                learn = self._sends.counts(max(self._learned_to, self._count_from), start)
                self._learn_floor(*reversed(learn))
                self._learned_to = start
            return None  # within what the floor and chance explain: each row backs off alone
        if refused >= requests:  # everything refused: nothing to read
            return self._block_now(now, current, retry_after)
        if self._probing(current):
            self._probe_cut(now, end, current, pace)
        else:
            # Since the last cut, the most let through in a WINDOW_S (the first cut reads
            # only the last: before it, a bucket may still have let its burst through).
            reach = WINDOW_S if self.phase is Phase.FREE else span(LOOKBACK_S, LOOKBACK_N, pace)
            read, count = self._read(max(self._count_from, end - reach), end, pace)
            # Kept as the rate let through; rate() divides by (1 - floor), as floor learns.
            ceiling = read if current is None else min(current * (1 - self._floor_low), read)
            # As deep below it as it may be read high: a standard error of ``count``.
            deep = 1 - 1 / math.sqrt(count) if count else 0.0
            self._start_trial(now, ceiling, share, requests, current, long_s, deep)
        self._cut(now)
        return Cut(share, now + retry_after if wall and retry_after else None)

    def _cut(self, now: float) -> None:
        # A server's window still counts what was sent before the cut for a while: 429s
        # of what is sent meanwhile say nothing of the new rate.
        self._cut_at, self._count_from = now, max(self._count_from, now + TRIAL_DELAY_S)
        self.changes += 1

    def _block_now(self, now: float, current: float | None, retry_after: float | None) -> Cut:
        self._enter_block(now, current)
        self._cut(now)
        return Cut(1.0, now + retry_after if retry_after else None, blocked=True)

    def _probing(self, current: float | None) -> bool:
        """In HOLD, beyond the ceiling: 429s there are the same limit, or one between it
        and here."""
        if self.phase is not Phase.HOLD or current is None:
            return False
        assert self._ceiling is not None
        return current * (1 - self._floor_low) > self._ceiling

    def _probe_cut(self, now: float, end: float, current: float | None, pace: float) -> None:
        """A cut with no trial (see ``_probing``), to the most let through in a WINDOW_S
        of the LOOKBACK_S before ``end``: the rate was at or over the ceiling all along,
        so a window that let less through was one where it was under the limit."""
        assert current is not None
        self._curve_at = now
        if self._period:  # a per-minute limit is not read in a second: the same again
            return
        lookback = span(LOOKBACK_S, LOOKBACK_N, pace)
        read, _ = self._read(max(self._count_from, end - lookback), end, pace)
        ceiling = current * (1 - self._floor_low)
        self._ceiling = min(ceiling, read) if read else ceiling

    def _read(self, start: float, end: float, pace: float) -> tuple[float, int]:
        """What the server lets through, per second, from the requests sent from ``start``
        to ``end`` at about ``pace`` a second: while the limit was binding, else the most
        in a WINDOW_S (in bins and windows that hold a few requests each at that pace);
        and how many requests let through it was read from."""
        tenths = math.ceil(BIN_N / pace * 10)
        # A sliding window emptied (before the first request, by a block or a pause) lets
        # its whole limit through at once, then next to nothing till that second ends.
        fresh = max(start, self._quiet_until + WINDOW_S)
        binding = self._sends.binding(fresh, end, self.floor + SATURATED_SHARE, tenths, SATURATED_S)
        if binding is not None:
            return binding
        return self._sends.most_let_through(start, end, span(WINDOW_S, READ_N, pace))

    def _start_trial(
        self,
        now: float,
        ceiling: float,
        share: float,
        requests: int,
        current: float | None,
        long_s: float,
        deep: float,
    ) -> None:
        """Cut to ``ceiling`` (as the rate let through), on trial (see ``_judge``)."""
        floor = self.floor
        before = current if current is not None else self._sends.rate(now - METER_S, now)
        if self._trial is not None:  # a cut on trial was too shallow, not wrong: its undo
            replaced, depth = self._trial.ceiling, self._trial.depth
        elif self._block is not None:  # recovering from a block: what the block interrupted
            replaced = self._block.before.ceiling
            depth = TRIAL_CUT if replaced is None else CUT
        else:
            replaced, depth = self._ceiling, CUT if self.phase is Phase.HOLD else TRIAL_CUT
        # The sample starts a while after the cut: a server's window still counts what was
        # sent before it (a second, for a per-second limit). Nor do the 429s of what is
        # sent in that while say the cut was too shallow.
        since = now + TRIAL_DELAY_S
        period = self._period if self.phase is Phase.HOLD else 0.0
        depth = min(depth, deep)
        trial = _Trial(replaced, depth, share, requests, floor, before, since, period)
        self.phase, self._trial, self._block, self._ceiling = Phase.TRIAL, trial, None, ceiling
        after = min(self.rate(now) or MIN_RATE, current or math.inf)
        if before:
            trial.limit_share = min(0.98, max(floor, 1 - (1 - share) * before / after))
        end = now - self._horizon
        healed = self._last_heal[0] if self._last_heal is not None else -math.inf
        requests_long, refused_long = self._sends.counts(max(end - long_s, healed), end)
        noise = refused_long / requests_long if requests_long else share
        trial.noise_share = min(1.0, max(noise, trial.limit_share + CUT_SHARE / 2))
        trial.until = since + max(MEASURE_S, min(TRIAL_MAX_S, trial.sample() / after))

    def _judge(self, now: float) -> Raise | None:
        """The verdict on the cut on trial, once its sample is in. Noise predicts the share
        of 429s after the cut that came before it (over LONG_S); a limit predicts the
        share that lets as many through as before (the floor, once the cut is deep
        enough). The share after decides by which it is nearer; still a wall beyond what
        noise predicts, the cut was too shallow and is tried again from now (a deeper cut
        follows)."""
        trial = self._trial
        assert trial is not None
        if now < trial.until + self._horizon:
            return None
        after = trial.refused / trial.sent if trial.sent else trial.share
        rate = self.rate(now) or MIN_RATE
        wall = after - self.floor >= WALL_SHARE
        if wall and beyond(after, trial.sent, trial.noise_share, CUT_SHARE):
            trial.since, trial.sent, trial.refused = now, 0, 0
            trial.until = now + max(MEASURE_S, min(TRIAL_MAX_S, trial.sample() / rate))
            return None
        first = trial.refused and not self._noise[1] and trial.sent < FIRST_VERDICT_N / 2
        if first and now - trial.since < TRIAL_MAX_S:
            # The first verdict teaches the floor: with 429s in its sample, a larger one.
            more = (FIRST_VERDICT_N - trial.sent) / rate
            trial.until = min(trial.since + TRIAL_MAX_S, now + more)
            return None
        limit = after < (trial.limit_share + trial.noise_share) / 2
        # Either way the rate on trial was under any limit, or there is none: its 429s are
        # what comes at any rate.
        self._learn_floor(trial.refused, trial.sent)
        self._trial = None
        self.changes += 1
        if limit:  # from the trial's rate to just under the ceiling, and on from there
            self._confirm(self._ceiling)
            self.phase, self._curve_at, self._period = Phase.HOLD, now, trial.period
            return Raise(
                self.rate(now), f"a limit of about {self._held():,.1f} req/s: holding just under it"
            )
        # Back to the rate the cut was made from (or to no ceiling, if there was none), and
        # flat there for a while: it is where 429s were not yet the rate's doing.
        if trial.ceiling is None or trial.before is None:
            self.phase, self._ceiling = Phase.FREE, None
        else:
            self._ceiling, self._period = trial.before * (1 - self._floor_low), trial.period
            self.phase, self._curve_at = Phase.HOLD, now - self._recover_s
        why = (
            f"429s at {self.floor:.1%} of requests whatever the rate are not a limit "
            "(their rows are retried one by one)"
        )
        return Raise(self.rate(now), why)

    def _confirm(self, ceiling: float | None) -> None:
        """A trial kept ``ceiling``: the same limit as last time probes more slowly."""
        assert ceiling is not None
        kept, self._kept = self._kept, ceiling
        if kept is not None and abs(ceiling - kept) <= CONFIRM_SHARE * kept:
            self._patience = min(MAX_PATIENCE, 2 * self._patience)
        else:
            self._patience = MIN_PATIENCE

    def _enter_block(self, now: float, current: float | None) -> None:
        """Everything sent since the last cut refused: halve until answers come back."""
        before = self._interrupted(current, now)
        if before.period:  # probing beyond a per-minute limit ran into it again
            self._patience = min(MAX_PATIENCE, 2 * self._patience)
        from_rate = current if current is not None else self._sends.rate(now - METER_S, now)
        self.phase, self._trial = Phase.BLOCKED, None
        # Everything sent since the block's onset was refused: let through by then is by now.
        let_through = self._sends.let_through_total
        self._block = _Block(before, now, max(BLOCKED_RATE, from_rate or 0.0), let_through)

    def _interrupted(self, current: float | None, now: float) -> _Before:
        """What a block interrupts: the phase before it, and the rate to come back to."""
        sending = current if current is not None else self._sends.rate(now - METER_S, now)
        sending = max(BLOCKED_RATE, sending or 0.0)
        if self._block is not None:  # blocked again while recovering: the same as before
            return self._block.before
        if self._trial is not None:  # a trial's cut was the block's start: before it
            trial = self._trial
            if trial.ceiling is None:
                return _Before(None, trial.before or sending)
            return _Before(trial.ceiling, trial.ceiling / (1 - self._floor_low) * PLATEAU)
        if self.phase is Phase.HOLD:
            return _Before(self._ceiling, self._held() * PLATEAU, self._period)
        return _Before(None, sending)

    def _heal(self, now: float, rate: Callable[[float], float | None]) -> Raise:
        """An answer let through while blocked: the block is over; recover. A second
        heal within PERIOD_MAX_S of the last reads what was let through from that one to
        this block: a fixed per-minute window lets its budget through from the minute's
        start, then refuses till the next (see the module doc)."""
        block = self._block
        assert block is not None
        last, self._last_heal = self._last_heal, (now, self._sends.let_through_total)
        if last is not None and not block.before.period and now - last[0] <= PERIOD_MAX_S:
            read, low = (block.let_through - last[1]) / (now - last[0]), self._floor_low
            if read < PERIOD_SHARE * block.before.rate * (1 - low):
                # The minute's start went by before this heal: the reading is a bound that
                # a minute at that rate stays within, so the rate settles at it, not under.
                block.before = _Before(read / PLATEAU, read / (1 - low), now - last[0])
        block.healed_at = self._quiet_until = now
        block.heal_rate = rate(now) or BLOCKED_RATE
        self.phase = Phase.RECOVERING
        self._cut_at = self._count_from = now
        self.changes += 1
        return Raise(block.before.rate, "answers are back")

    def _resume(self, before: _Before, now: float) -> None:
        """Back at the rate a block interrupted: the phase it interrupted."""
        self._block = None
        if before.ceiling is None:
            self.phase, self._ceiling = Phase.FREE, None
            return
        self.phase, self._ceiling, self._period = Phase.HOLD, before.ceiling, before.period
        self._curve_at = now - self._recover_s  # at the plateau

    def _learn_floor(self, refused: float, requests: float) -> None:
        noise = self._noise
        if noise[1] + requests > FLOOR_N:  # older requests count half: the floor may move
            noise[0], noise[1] = noise[0] / 2, noise[1] / 2
        noise[0] += refused
        noise[1] += requests
