"""The pacer alone, on the fake clock of tests/component/test_limiter.py, over six seeds
of each fault mix: no network, no simulator, a few seconds.

    python -m bench.pacer_seeds

For a server limited to 100 requests/s (clients told 300; 6,000 rows) it prints, per
seed, (time / ideal time, 429s the limit refused / requests, requests the limit let
through per second in the steady part); for a server with no limit that refuses a share
at random (clients told 250; 8,000 rows), the rate sent from 3 s after the first request
to the last first attempt, against 250. The targets: within 1.15x, under 5 %, at least
95; and at least 0.90.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from batchq.config import Limits
from tests.component.test_limiter import Server, closed_loop, sent_rate

LIMITS = {
    "limit": {},
    "limit, Retry-After": {"retry_after": 1.0},
    "limit, 5% random 429s": {"noise": 0.05},
    "limit, 5% random 429s before it": {"noise": 0.05, "noise_first": True, "retry_after": 1.0},
    "limit, 5% 429s, 503s, drops, 200 ms": {"noise": 0.05, "fail_503": 0.03, "drop": 0.02,
                                            "latency": 0.2},
    "limit, 5% 429s, 503s, drops, 800 ms": {"noise": 0.05, "fail_503": 0.03, "drop": 0.02,
                                            "latency": 0.8},
}  # fmt: skip
NOISE = {
    "5% random 429s": {"noise": 0.05},
    "10% random 429s, Retry-After": {"noise": 0.10, "retry_after": 1.0},
    "5% 429s, 503s, drops, slow": {"noise": 0.05, "fail_503": 0.03, "drop": 0.02, "slow": 0.03,
                                   "retry_after": 1.0},
    "7% 429s, 503s, drops, slow, 800 ms": {"noise": 0.07, "fail_503": 0.05, "drop": 0.03,
                                           "slow": 0.05, "latency": 0.8},
}  # fmt: skip


def limited(faults: dict[str, Any], seed: int) -> str:
    server = Server(limit=100, rng=random.Random(seed), **faults)
    elapsed = asyncio.run(closed_loop(Limits(qps=300, concurrency=300), server, rows=6000))
    ends = 1 - (server.fail_503 + server.drop + (0 if server.noise_first else server.noise))
    admitted = server.admitted
    steady = [t for t in admitted if admitted[0] + 10 <= t < admitted[-1] - 2]
    let_through = len(steady) / (steady[-1] - steady[0])
    share = server.limit_429s / len(server.times)
    return f"{elapsed / (60 / ends):.2f}x {share:5.1%} {let_through:5.1f}"


def noisy(faults: dict[str, Any], seed: int) -> str:
    server = Server(rng=random.Random(seed), **faults)
    asyncio.run(closed_loop(Limits(qps=250, concurrency=300), server, rows=8000))
    first, last = server.times[0], sorted(server.times)[8000 - 1]
    return f"{sent_rate(server, first + 3, last) / 250:.3f}"


def main() -> None:
    for name, faults in LIMITS.items():
        print(f"{name:<40}", "  ".join(limited(faults, seed) for seed in range(6)))
    for name, faults in NOISE.items():
        print(f"{name:<40}", "  ".join(noisy(faults, seed) for seed in range(6)))


if __name__ == "__main__":
    main()
