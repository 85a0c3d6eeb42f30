"""What the server lets through, learned from its 429s: the ceiling on the pacer's rate,
and the share of 429s that comes at any rate (the floor). No I/O and no clock of its
own: every call says when it is (the pacer's clock).

    ceiling(t) = ceiling / (1 − floor) × PLATEAU × cubic(t − cut)
    cubic(t) = 1 + a × ((t − K) / K)³,   K = RECOVER_S + 2 × latency,
               a = 1 − CUT below the ceiling (t < K), PROBE beyond it
    while a cut is on trial: ceiling / (1 − floor) × (CUT, or TRIAL_CUT until a limit
    has shown), flat

A limit shows itself as 429s whose share grows with the rate; a server that refuses a
steady share at random (capacity throttling, another job on the account, a gateway)
refuses that share at any rate. So:

- ``floor`` is the share of 429s that comes at any rate (noise); 0 until learned.
- A cut is made when the 429s of the last METER_S exceed the floor by CUT_SHARE and by
  CUT_Z standard errors (RAMP_CUT_SHARE while ramping up), at most once per CUT_EVERY_S
  plus twice the answers' latency, counting only requests sent since the last cut. The
  ceiling is the rate of answers that were not 429 over the last WINDOW_S, ``accepted``
  (an error or a dropped connection was let through all the same: only the ok answers
  would read low under faults, and every cut would go deeper; and not a decaying count,
  which after a step up still reads the rate before it), kept as such: rate() divides
  by 1 − floor. Once the answers to what was sent before a cut are in, a cut that is
  kept is raised to the most let through in any second of the few before it, counted by
  when the requests were sent (answers a latency late read the rate of a latency ago).
- A cut is a trial. The requests sent from TRIAL_DELAY_S after it (a server's window
  still counts what was sent before) until enough are in to tell the two predictions
  apart are the sample, judged once answered: noise predicts the share of 429s of the
  LONG_S before the cut, a limit the share that lets as many through as before (the
  floor, for a cut deep enough). Nearer the limit's, the cut stays; nearer the noise's,
  it was not needed and is undone: back to the rate it was made from. Either way the
  sample's 429s teach the floor (a sample still refused in bulk, a wall, teaches
  nothing: that cut was too shallow). Without this, a steady 5 % of random 429s slowed
  a run with no limit to 3 % of its speed (tests/component/test_limiter.py).
- Once a limit has shown, 429s while probing beyond its ceiling cut at once, with no
  trial: the same limit again, or one between it and here.
- After a kept cut the rate recovers as TCP CUBIC's window does (RFC 9438): from CUT of
  the ceiling back to it in K, flat near it, then faster and faster beyond it (at
  PROBE: 429s beyond a limit come the answers' latency and the counts' memory late).
- A ``Retry-After`` delays its own row (the caller's backoff); it pauses the whole run
  only when the 429s show a wall (WALL_SHARE or more beyond the floor).

The pacer (``batchq.send.limiter``) takes the lower of its own rate (limits, ramp) and this
ceiling; it reports each request sent (``sent``) and each one settled (``observe``).
So a run configured above the server's real limit settles at it instead of cycling
through 429 storms; a run with no limit set learns one from its 429s; random 429s are
retried row by row and do not wear the rate down.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["Ceiling", "Cut", "Settled", "Throttle"]

CUT, RECOVER_S, CUT_EVERY_S = 0.97, 3.0, 1.0
#: Beyond the ceiling, the rate grows as PROBE × u³ (u in K): 1 % over it after 2K, 54 %
#: after 4K, twice it after 4.7K. Slower than back up to it: 429s beyond a limit come
#: with the answers' latency and the counts' memory, and the overshoot meanwhile is paid.
PROBE = 0.02
#: Until a limit has shown, a cut on trial holds the rate this far below the ceiling: a
#: limit then shows plainly (a ceiling read from a window that let a burst through can
#: still be above the limit).
TRIAL_CUT = 0.85
MIN_RATE = 0.5
#: Where the rate settles, as a share of the ceiling: a server's one-second window counts
#: arrivals, which the network bunches, so a rate right at its limit is refused now and
#: then all the same (bench/throughput.py overload-noise: limit 429s 1.8-4.8 % of
#: requests over 4 seeds at 1.0, 1.5-4.4 % at 0.99). Since a kept cut reads what was let
#: through by send time (``_let_through_before``) the rate settles nearer the limit: at
#: 0.99, two fake-clock seeds of 36 refused 5.1 % (python -m bench.pacer_seeds).
PLATEAU = 0.98
#: 429s must exceed the floor by this share of recent answers before the rate is cut...
CUT_SHARE = 0.02
#: ...and by this many standard errors of that share.
CUT_Z = 2.0
#: While the rate ramps up, by this share: 5-10 % of random 429s do not cut the ramp
#: short; a limit the ramp crosses soon refuses more than that.
RAMP_CUT_SHARE = 0.15
#: Answers are counted over about this long (the time constant of a decaying count).
METER_S = 2.0
#: ...and over this long for what noise predicts after a cut (a share refused at any rate).
LONG_S = 10.0
#: The accepted rate is measured over at least this long before it sets a ceiling.
MEASURE_S = 0.5
#: Requests that judge a cut: enough to put HELPED_Z standard errors between each
#: prediction and the middle, within these bounds.
VERDICT_N, VERDICT_MAX_N, HELPED_Z = 120, 500, 2.0
#: What a server lets through is read from the answers of about this long: a window's
#: period (a decaying count remembers the rate before a step up, which a sliding window
#: lets through for a period after it: the reading would be the old rate, not the limit).
WINDOW_S = 1.0
#: A cut kept reads what was let through from the requests sent this long before it.
LOOKBACK_S = 3.0
#: The requests that judge a cut are those sent from this long after it.
TRIAL_DELAY_S = 1.0
#: 429s this share beyond the floor are a wall: the whole run waits out Retry-After.
WALL_SHARE = 0.2
#: The floor is learned from about this many recent answers (older ones count half).
FLOOR_N = 4000

#: The kind of a 429: a request-rate limit, a burst limit, or token quota throttling.
Throttle = Literal["rate", "burst", "quota"]


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
    """A cut of the whole run's rate: the share of 429s that made it, and until when
    every sender waits (a wall's Retry-After; None: no pause)."""

    share: float
    pause_until: float | None


@dataclass(slots=True)
class _Trial:
    """A cut on trial: what it replaced (to undo it), the 429s that made it, and what
    came of the requests sent in the window after it."""

    ceiling: float | None  # the ceiling before the cut
    share: float  # of 429s that made the cut, over ``answers`` (a decaying count)
    answers: float
    limit_share: float  # of 429s a limit predicts after the cut: as many let through
    before: float | None  # the rate the cut was made from
    since: float  # the requests sent from then until then are the sample
    made_at: float  # when the cut was made
    until: float
    noise_share: float = 0.0  # of 429s noise predicts: as over LONG_S before the cut
    sent: int = 0
    accepted: int = 0
    refused: int = 0

    def sample(self) -> float:
        """Requests that tell the two predictions apart (HELPED_Z errors from each to the
        middle), between VERDICT_N and VERDICT_MAX_N."""
        low, high = self.limit_share, self.noise_share
        errors = math.sqrt(low * (1 - low)) + math.sqrt(high * (1 - high))
        n = (HELPED_Z * errors / (high - low)) ** 2
        return min(VERDICT_MAX_N, max(VERDICT_N, n))

    def holds(self, sent_at: float) -> bool:
        return self.since <= sent_at < self.until


class Ceiling:
    """The ceiling and the floor; see the module doc."""

    def __init__(self) -> None:
        self._ceiling: float | None = None  # the rate let through, as cut to
        # when the rate was last cut (answers to requests sent before say nothing new), and
        # where the rate's curve starts from (a cut, or a verdict on one)
        self._cut_at = self._curve_at = self._last_cut = -math.inf
        self.cuts = 0  # how many cuts were made: a booking made before one is void
        self._trial: _Trial | None = None
        self._limit_seen = False  # whether a cut has been kept
        self._noise: list[float] = [0.0, 0.0]  # 429s and answers the floor is learned from
        self._sent, self._refused = _Meter(), _Meter()
        self._accepted = _Meter(window=WINDOW_S)
        # the share of 429s over a longer span, never restarted: what noise predicts
        self._long = (_Meter(LONG_S), _Meter(LONG_S))  # answers let through, 429s
        self._measure_from = -math.inf  # answers to requests sent before count for nothing
        self._latency = 0.0  # seconds from send to answer, a moving average
        # answers that were not 429 by when their request was sent, in tenths of a second
        self._let_through: Counter[int] = Counter()
        self.undone: str | None = None  # what the last undone cut says, once

    @property
    def floor(self) -> float:
        """The share of requests found to be refused at any rate (noise)."""
        refused, answers = self._noise
        return refused / answers if answers else 0.0

    def rate(self, now: float) -> float | None:
        """The ceiling's rate at ``now`` (None: no ceiling)."""
        if self._ceiling is None:
            return None
        ceiling = max(MIN_RATE, self._ceiling / (1 - self.floor))
        if self._trial is not None:  # held there: one rate is judged
            return ceiling * (CUT if self._limit_seen else TRIAL_CUT)
        k = self._recover_s
        u = (max(0.0, now - self._curve_at) - k) / k
        return ceiling * PLATEAU * (1 + (1 - CUT if u < 0 else PROBE) * u**3)

    def sent(self, at: float) -> None:
        """A request went out at ``at``."""
        self._sent.add(at)
        if self._trial is not None and self._trial.holds(at):
            self._trial.sent += 1

    def paused(self, until: float) -> None:
        """Every sender waits until ``until``: what is let through is measured afresh from
        then on, from requests sent after it (a rate measured across a pause reads low)."""
        self._measure_from = max(self._measure_from, until)
        self._accepted.restart(until)
        self._refused.restart(until)

    def observe(
        self, settled: Settled, now: float, *, rate: Callable[[float], float | None],
        ramping: Callable[[float], bool],
    ) -> Cut | None:  # fmt: skip
        """Learn from a request settled at ``now``; a Cut when the whole run must slow.
        ``rate(t)`` is the pacer's rate, ``ramping(t)`` whether it was ramping up (asked
        only when a 429 may cut)."""
        self.undone = None
        if settled.throttled is None:  # 429s come back fast; what matters is the answers
            self._latency += 0.05 * (now - settled.sent_at - self._latency)
        refused = settled.throttled is not None
        self._long[refused].add(now)
        if not refused:
            self._count_let_through(settled.sent_at, now)
        if settled.sent_at < self._cut_at:
            return None  # sent before the last cut: what it says is already answered
        if settled.sent_at >= self._measure_from:
            (self._refused if refused else self._accepted).add(now)
        if (trial := self._trial) is not None:
            if trial.holds(settled.sent_at):
                if refused:
                    trial.refused += 1
                else:
                    trial.accepted += 1
            # All (but stragglers) of the window's requests answered: a sample of what was
            # sent, not of what came back first (429s come back faster than answers).
            if now >= trial.until and trial.accepted + trial.refused >= 0.9 * trial.sent:
                self._judge(now)
        if not refused:
            return None
        return self._consider_cut(now, settled.retry_after, rate, ramping)

    def _consider_cut(
        self, now: float, retry_after: float | None, rate: Callable[[float], float | None],
        ramping: Callable[[float], bool],
    ) -> Cut | None:  # fmt: skip
        """Cut when the 429s lately exceed the floor (see the module doc)."""
        if now - self._last_cut < CUT_EVERY_S + 2 * self._latency:
            # The same congestion event: one cut is enough. And until the answers to what
            # was sent since have had time to come, the 429s (fast) outnumber them.
            return None
        refused, accepted = self._refused.count(now), self._accepted.count(now)
        if refused < 2:
            return None
        if accepted and now - self._accepted.since < MEASURE_S:
            return None  # too few answers yet to say what the server lets through
        answers, floor = refused + accepted, self.floor
        share = refused / answers
        error = math.sqrt(max(floor, 0.01) * (1 - floor) / answers)
        least = RAMP_CUT_SHARE if ramping(now) else CUT_SHARE
        if share - floor < least + CUT_Z * error:
            return None  # within what the floor and chance explain: each row backs off alone
        if self._trial is not None and share - floor < WALL_SHARE:
            return None  # a cut is on trial, and these 429s do not say it was too shallow
        current = rate(now)
        let_through = self._accepted.recent(now) if accepted else None
        if let_through is None:  # nothing got through: halve what is being sent
            let_through = (current or self._sent.rate(now) or 2 * MIN_RATE) / 2 * (1 - floor)
        elif (
            current is not None and self._ceiling is None and share < RAMP_CUT_SHARE
            and ramping(now - METER_S)
        ):  # fmt: skip
            # The answers of a rate that was ramping up (a decaying count remembers METER_S)
            # read low; a few 429s say the rate now is nearly all let through.
            let_through = max(let_through, current * (1 - share))
        # Kept as the rate let through; rate() divides by (1 - floor), as the floor learns.
        ceiling = let_through if current is None else min(current * (1 - floor), let_through)
        old = self._ceiling
        probing = self._limit_seen and self._trial is None
        if probing and old is not None and current is not None and current * (1 - floor) > old:
            # Beyond a limit that showed itself, 429s again: the same limit, or one between
            # it and here. Cut with no trial: were these 429s noise after all, a cut below
            # the ceiling will be tried. The rate was at or over the ceiling for the whole
            # count: what it let through reads true, but never below the limit that showed
            # (the cut comes when 429s are many, which random ones make them at times: the
            # answers let through then read low, 85 where a limit of 100 let 94 through).
            # Read by when the requests were sent, from those whose answers are in: by when
            # they came, answers a latency apart bunch, and read over the limit.
            if sent := self._let_through_before(now - 2 * self._latency):
                ceiling = min(current * (1 - floor), sent)
            self._ceiling, self._cut_at = max(ceiling, CUT * old), now
            self._curve_at = now
        else:
            self._start_trial(now, ceiling, share, answers, current)
        self._last_cut = now
        self.cuts += 1
        # Only answers to requests sent from now on measure the new rate.
        self._accepted.restart(now)
        self._refused.restart(now)
        wall = retry_after and share - floor >= WALL_SHARE
        return Cut(share, now + retry_after if wall and retry_after else None)

    @property
    def _recover_s(self) -> float:
        """K: the later 429s are seen (the answers' latency), the slower the rate probes."""
        return RECOVER_S + 2 * self._latency

    def _start_trial(
        self, now: float, ceiling: float, share: float, answers: float, current: float | None
    ) -> None:
        """Cut to ``ceiling`` (as the rate let through), on trial (see ``_judge``)."""
        floor = self.floor
        # A cut made while another is on trial keeps that one: it was too shallow, not wrong.
        before = current if current is not None else self._sent.rate(now)
        # The sample starts a while after the cut: a server's window still counts what was
        # sent before it (a second, for a per-second limit).
        since = now + TRIAL_DELAY_S
        trial = _Trial(self._ceiling, share, answers, floor, before, since, now, math.inf)
        self._ceiling, self._cut_at, self._trial = ceiling, now, trial
        self._curve_at = now
        # Nor do the 429s of what is sent in that while say the cut was too shallow: the
        # window still holds the burst that made the cut (a run's first second, under a
        # loaded CPU: 20 % refused after the cut, read as a wall, cut to 70 of a limit
        # of 100 and paused, and the run took 1.23x the ideal).
        self._measure_from = max(self._measure_from, since)
        after = min(self.rate(now) or MIN_RATE, current or math.inf)
        if before:
            trial.limit_share = min(0.98, max(floor, 1 - (1 - share) * before / after))
        accepted_long, refused_long = (m.count(now) for m in self._long)
        noise = refused_long / (accepted_long + refused_long)
        trial.noise_share = min(1.0, max(noise, trial.limit_share + CUT_SHARE / 2))
        trial.until = since + max(MEASURE_S, trial.sample() / after)

    def _count_let_through(self, sent_at: float, now: float) -> None:
        bins = self._let_through
        bins[math.floor(sent_at * 10)] += 1
        if len(bins) > 20 * LONG_S:
            old = math.floor((now - LONG_S) * 10)
            for tenth in [b for b in bins if b < old]:
                del bins[tenth]

    def _let_through_before(self, at: float) -> float:
        """The most the server let through in any WINDOW_S of the LOOKBACK_S before
        ``at``, per second, by when the requests were sent: answers that were not 429.
        A limit lets through at most its rate in any window, and all of it in one the
        rate was over it; the window that ends at a cut reads low when the rate was still
        rising into it (or the answers come a latency late).
        """
        bins, tenths = self._let_through, round(WINDOW_S * 10)
        counts = [bins[b] for b in range(math.floor((at - LOOKBACK_S) * 10), math.floor(at * 10))]
        sums = [sum(counts[i : i + tenths]) for i in range(len(counts) - tenths + 1)]
        return max(sums, default=0) / WINDOW_S

    def _judge(self, now: float) -> None:
        """The verdict on the cut on trial. Noise predicts the share of 429s after the cut
        that came before it (over LONG_S); a limit predicts the share that lets as many
        through as before (the floor, once the cut is deep enough). The share after
        decides by which it is nearer; still a wall, the cut was too shallow and stays."""
        trial, self._trial = self._trial, None
        assert trial is not None
        answers = trial.accepted + trial.refused
        after = trial.refused / answers if answers else trial.share
        middle = (trial.limit_share + trial.noise_share) / 2
        if after - self.floor >= WALL_SHARE:
            return  # still refused in bulk: the cut was too shallow, the next goes deeper
        # Either way the rate on trial was under any limit, or there is none: its 429s are
        # what comes at any rate.
        self._learn_floor(trial.refused, answers)
        if after < middle:
            # A limit: from the trial's rate to just under the ceiling, and on from there.
            # The ceiling is at least the most let through in a second before the cut, now
            # that those answers are in: read at the cut, with answers a latency late, it
            # was the rate of a latency before (with 800 ms answers, the ramp's first cut
            # read 76 of a limit of 100, and the run held 91 a second for 30 s).
            if self._ceiling is not None:
                self._ceiling = max(self._ceiling, self._let_through_before(trial.made_at))
            # Only the curve starts again: answers to what was sent before still count (a
            # verdict is no cut; with 800 ms answers, ignoring them left the next cut's
            # one-second reading a quarter full: 52 of 230, and a run at 46 % of its rate).
            self._curve_at, self._limit_seen = now, True
            return
        # Back to the rate the cut was made from (or to no ceiling, if there was none), and
        # flat there for a while: it is where 429s were not yet the rate's doing.
        if trial.ceiling is None or trial.before is None:
            self._ceiling, self._curve_at = None, -math.inf
        else:
            self._ceiling = trial.before * (1 - self.floor)
            self._curve_at = now - self._recover_s
        self.undone = f"429s at {self.floor:.1%} of requests whatever the rate are not a limit"

    def _learn_floor(self, refused: float, answers: float) -> None:
        noise = self._noise
        if noise[1] + answers > FLOOR_N:  # older answers count half: the floor may move
            noise[0], noise[1] = noise[0] / 2, noise[1] / 2
        noise[0] += refused
        noise[1] += answers


class _Meter:
    """Events per second, as a count decaying with a time constant of ``span`` seconds;
    with ``window``, also as the events of the last ``window`` seconds (``recent``)."""

    def __init__(self, span: float = METER_S, *, window: float | None = None) -> None:
        self._span, self._window = span, window
        self._count, self._at, self._since = 0.0, -math.inf, math.inf
        self._times: deque[float] = deque()

    @property
    def since(self) -> float:
        """When counting started (inf before the first event)."""
        return self._since

    def add(self, now: float) -> None:
        self._count = self._count * math.exp(min(0.0, self._at - now) / self._span) + 1.0
        self._at = max(self._at, now)
        self._since = min(self._since, now)
        if self._window is not None:
            times = self._times
            times.append(now)
            while times[0] <= now - self._window:
                times.popleft()

    def restart(self, at: float) -> None:
        """Count from zero from ``at`` on."""
        self._count, self._at, self._since = 0.0, at, math.inf
        self._times.clear()

    def count(self, now: float) -> float:
        """Events in about the last ``span`` seconds."""
        return self._count * math.exp(min(0.0, self._at - now) / self._span) if self._count else 0.0

    def rate(self, now: float) -> float | None:
        """Events per second lately (None before the first): the decaying count, corrected
        for having started from zero, over at least a tenth of a second."""
        if self._since == math.inf or now < self._since:
            return None
        span = self._span
        return self.count(now) / span / (1 - math.exp(-max(0.1, now - self._since) / span))

    def recent(self, now: float) -> float | None:
        """Events per second over the last ``window`` seconds, once counted that long (till
        then, ``rate``)."""
        window = self._window
        if window is None or now - self._since < window:
            return self.rate(now)
        times = self._times
        while times and times[0] <= now - window:
            times.popleft()
        return len(times) / window
