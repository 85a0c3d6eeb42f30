"""Pure: how long to wait before the next attempt.

    delay(attempt) = max(retry_after, uniform(0, min(cap, base * 2 ** (attempt - 1))))

``attempt`` is the number of attempts already made (1 after the first failure). Full
jitter (AWS Architecture Blog, "Exponential Backoff And Jitter") spreads retries of many
rows evenly instead of in synchronized waves; a server's ``Retry-After`` is a floor.
"""

from __future__ import annotations

import email.utils
import random
import time

__all__ = ["backoff_delay", "parse_retry_after"]


def backoff_delay(
    attempt: int,
    *,
    retry_after: float | None = None,
    base: float = 0.5,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after ``attempt`` failed attempts.

    >>> backoff_delay(3, rng=random.Random(0)) <= 2.0
    True
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    jitter = (rng or random).uniform(0, ceiling)
    return max(retry_after or 0.0, jitter)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent
    or unreadable. Negative values become 0."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
