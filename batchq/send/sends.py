"""Requests by when they were sent, in tenths of a second: how many went out and how many
came back 429; what the pacer's ceiling (``batchq.send.ceiling``) reads a limit from.
And the two sums it tests shares and spans with. Pure: every call says when."""

from __future__ import annotations

import math
from collections import Counter

__all__ = ["Sends", "beyond", "span"]

#: A reading over a window is over this long at least (a sliding window's period).
WINDOW_S = 1.0
#: Bins of a binding run hold this many requests at least.
BIN_N = 3
#: Spans grow with a slow rate up to this long.
SPAN_MAX_S = 60.0


def span(seconds: float, requests: int, pace: float) -> float:
    """``seconds``, or as long as ``requests`` take at ``pace`` a second (up to SPAN_MAX_S)."""
    return min(SPAN_MAX_S, max(seconds, requests / pace))


def beyond(
    share: float,
    requests: int,
    than: float,
    by: float,
    than_requests: int | None = None,
    *,
    z: float = 2.0,
) -> bool:
    """Whether ``share`` of ``requests`` is ``than`` + ``by`` or more, beyond chance: ``z``
    standard errors of a share of ``than`` + ``by`` (of the difference of two shares,
    with ``than_requests`` behind ``than``)."""
    most = min(0.99, than + by)
    spread = 1 / requests + (1 / than_requests if than_requests else 0.0)
    return share - than >= by + z * math.sqrt(most * (1 - most) * spread)


class Sends:
    """Requests by when they were sent, in tenths of a second: how many were sent, and
    how many of them came back 429. The last KEEP_S are kept."""

    KEEP_S = 120.0

    def __init__(self) -> None:
        self._sent: Counter[int] = Counter()
        self._refused: Counter[int] = Counter()
        self.first = math.inf  # when the first request went out
        self._sent_total = self._refused_total = 0
        self._oldest = 0

    @property
    def let_through_total(self) -> int:
        """Requests sent in all, less those refused."""
        return self._sent_total - self._refused_total

    def sent(self, at: float) -> None:
        tenth = math.floor(at * 10)
        self._sent[tenth] += 1
        self._sent_total += 1
        self.first = min(self.first, at)
        if tenth - self._oldest > 2 * self.KEEP_S * 10:  # forget what is older than KEEP_S
            self._oldest = tenth - round(self.KEEP_S * 10)
            for bins in (self._sent, self._refused):
                for old in [b for b in bins if b < self._oldest]:
                    del bins[old]

    def refused(self, sent_at: float) -> None:
        self._refused[math.floor(sent_at * 10)] += 1
        self._refused_total += 1

    def counts(self, start: float, end: float) -> tuple[int, int]:
        """(requests sent, of which refused) from ``start`` to ``end``, in whole tenths."""
        tenths = range(math.floor(max(start, self.first) * 10), math.floor(end * 10))
        return sum(self._sent[t] for t in tenths), sum(self._refused[t] for t in tenths)

    def rate(self, start: float, end: float) -> float | None:
        """Requests sent per second from ``start`` to ``end`` (None: none)."""
        start = max(start, self.first)
        sent, _ = self.counts(start, end)
        return sent / (end - start) if sent and end > start else None

    def binding(
        self, start: float, end: float, share: float, tenths: int, least_s: float
    ) -> tuple[float, int] | None:
        """Per second, what was let through of the requests of the bins of ``tenths``
        tenths before ``end`` (back to ``start``) that were refused ``share`` or more each
        (but not all), but the first of them; None when those end there span less than
        ``least_s`` beside the first, or fewer than three bins. With the requests let
        through it was read from."""
        run: list[int] = []  # let through, by bin, from the last back
        last, first = math.floor(end * 10), math.floor(start * 10)
        for bin_end in range(last, first + tenths - 1, -tenths):
            n, r = self.counts((bin_end - tenths) / 10, bin_end / 10)
            if n < BIN_N or r < share * n or r >= n:  # all refused: a wall, not a rate
                break
            run.append(n - r)
        # The run's first bin is where the limit began to bind, part of the way in.
        if len(run) < 3 or (len(run) - 1) * tenths < least_s * 10:
            return None
        let_through = sum(run[:-1])
        return let_through * 10 / ((len(run) - 1) * tenths), let_through

    def refused_run(self, start: float, end: float) -> tuple[float, int]:
        """When the run of tenths before ``end`` (back to ``start``) whose requests were all
        refused began, from its first request, and how many requests it holds."""
        onset, requests = end, 0
        for tenth in range(
            math.floor(end * 10) - 1, math.floor(max(start, self.first) * 10) - 1, -1
        ):
            sent = self._sent[tenth]
            if self._refused[tenth] < sent:
                break
            if sent:
                onset, requests = tenth / 10, requests + sent
        return onset, requests

    def most_let_through(
        self, start: float, end: float, width_s: float = WINDOW_S
    ) -> tuple[float, int]:
        """The most let through in any ``width_s`` from ``start`` to ``end``, per second
        (the whole span's rate when it is shorter), and how many requests that was."""
        start = max(start, self.first)
        tenths, width = range(math.floor(start * 10), math.floor(end * 10)), round(width_s * 10)
        counts = [self._sent[t] - self._refused[t] for t in tenths]
        if len(counts) <= width:
            return (sum(counts) * 10 / len(counts), sum(counts)) if counts else (0.0, 0)
        window = most = sum(counts[:width])
        for i in range(width, len(counts)):
            window += counts[i] - counts[i - width]
            most = max(most, window)
        return most * 10 / width, most
