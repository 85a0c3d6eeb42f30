from __future__ import annotations

import random

from batchq.send.retry import backoff_delay, parse_retry_after


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 30.0)]:
        delays = [backoff_delay(attempt, rng=rng) for _ in range(500)]
        assert max(delays) <= ceiling
        assert max(delays) > ceiling * 0.9  # spread over the whole range, not clustered
        assert min(delays) < ceiling * 0.1


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(1)
    assert all(backoff_delay(1, retry_after=3.0, rng=rng) == 3.0 for _ in range(100))


def test_retry_after_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0)
    assert when == 10.0
