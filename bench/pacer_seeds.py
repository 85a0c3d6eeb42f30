"""The pacer alone, on the fake clock of tests/component/fake_server.py, over seeds of each
cell: no network, no simulator, about a minute on two cores.

    python -m bench.pacer_seeds               # six seeds of every cell
    python -m bench.pacer_seeds --seeds 3 --rows 6000 bucket

Limit cells: a server letting 100 requests/s through, in each shape of
``batchq.simulator.limits`` (a sliding second, a token bucket of a second's worth, one of
a minute's worth, a fixed budget per minute), answers after 30 ms or 800 ms, with and
without 5 % of requests refused at random on top (and a few mixes of other faults); clients
told 300, 3,000 rows (15,000 for a minute's shapes, which take minutes to show); and a
limit of 4 a second in each shape, clients told 10, as many rows in proportion. Each
prints, per seed: time / ideal time, 429s the limit refused / requests, the rate the limit
let through once the run settled as a share of the limit. Targets: ≤ 1.15x, < 5 %, ≥ 95 %.

Noise cells: no limit, a share refused at random among other faults, clients told 250,
8,000 rows: the rate sent from 3 s after the first request to the last first attempt,
against 250. Target: ≥ 0.90.

Heal cells: 100 a second, then every request refused with a quota 429 for 8 s: seconds
from the throttle's end until a whole second sends 95 or more again. Target: ≤ 10.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from batchq.config import Limits
from tests.component.fake_server import Server, closed_loop, sent_rate, steady_rate

LIMITS: dict[str, dict[str, Any]] = {
    f"{shape}, {latency * 1000:.0f} ms{', 5% 429s' if noise else ''}": {
        "limit": 100, "shape": shape, "latency": latency, "noise": noise, "retry_after": 1.0,
    }
    for shape in ("window", "bucket", "minute-bucket", "minute-window")
    for latency in (0.03, 0.8)
    for noise in (0.0, 0.05)
}  # fmt: skip
LIMITS |= {
    f"{shape}, 4 a second (told 10)": {
        "limit": 4,
        "shape": shape,
        "latency": 0.3,
        "retry_after": 1.0,
        "told": 10,
    }
    for shape in ("window", "bucket", "minute-bucket", "minute-window")
}
LIMITS |= {
    "window, 10% 429s": {"limit": 100, "noise": 0.10, "latency": 0.03, "retry_after": 1.0},
    "bucket, 10% 429s": {
        "limit": 100,
        "shape": "bucket",
        "noise": 0.10,
        "latency": 0.03,
        "retry_after": 1.0,
    },
    "window, 5% 429s before it": {
        "limit": 100,
        "noise": 0.05,
        "noise_first": True,
        "retry_after": 1.0,
    },
    "window, 5% 429s, 503s, drops, 200 ms": {
        "limit": 100,
        "noise": 0.05,
        "fail_503": 0.03,
        "drop": 0.02,
        "latency": 0.2,
    },
    "window, 5% 429s, 503s, drops, 800 ms": {
        "limit": 100,
        "noise": 0.05,
        "fail_503": 0.03,
        "drop": 0.02,
        "latency": 0.8,
    },
}
NOISE: dict[str, dict[str, Any]] = {
    "5% 429s": {"noise": 0.05},
    "10% 429s, Retry-After": {"noise": 0.10, "retry_after": 1.0},
    "5% 429s, 503s, drops, slow": {"noise": 0.05, "fail_503": 0.03, "drop": 0.02, "slow": 0.03,
                                   "retry_after": 1.0},
    "7% 429s, 503s, drops, slow, 800 ms": {"noise": 0.07, "fail_503": 0.05, "drop": 0.03,
                                           "slow": 0.05, "latency": 0.8},
}  # fmt: skip
HEAL: dict[str, dict[str, Any]] = {
    f"quota 429s for 8 s, {latency * 1000:.0f} ms": {
        "throttle_for": 8.0, "throttle_after": 10.0, "latency": latency,
    }
    for latency in (0.03, 0.8)
}  # fmt: skip


def limited(faults: dict[str, Any], seed: int, rows: int) -> str:
    faults = dict(faults)
    told = faults.pop("told", 300)
    server = Server(rng=random.Random(seed), **faults)
    assert server.limit is not None
    rows = rows * round(server.limit) // 100  # the same minute or so at any limit
    rows = 5 * rows if server.shape.startswith("minute") else rows
    elapsed = asyncio.run(closed_loop(Limits(qps=told), server, rows=rows))
    ideal = rows / server.limit / server.ends
    share = server.limit_429s / len(server.times)
    return f"{elapsed / ideal:.2f}x {share:5.1%} {steady_rate(server) / server.limit:6.1%}"


def noisy(faults: dict[str, Any], seed: int, rows: int) -> str:
    server = Server(rng=random.Random(seed), **faults)
    asyncio.run(closed_loop(Limits(qps=250), server, rows=8000))
    first, last = server.times[0], sorted(server.times)[8000 - 1]
    return f"{sent_rate(server, first + 3, last) / 250:.3f}"


def healed(faults: dict[str, Any], seed: int, rows: int) -> str:
    server = Server(rng=random.Random(seed), **faults)
    asyncio.run(closed_loop(Limits(qps=100), server, rows=4000))
    end = server.times[0] + server.throttle_after + server.throttle_for
    tenths = range(round(end * 10), round((end + 120) * 10))
    back = next((t / 10 for t in tenths if sent_rate(server, t / 10, t / 10 + 1) >= 95), None)
    return f"{back - end:5.1f} s" if back is not None else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="?", default="", help="cells whose name holds this")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=3000, help="rows of a limit cell")
    args = parser.parse_args()
    cells: list[tuple[str, Callable[[dict[str, Any], int, int], str], dict[str, Any]]] = [
        *((name, limited, faults) for name, faults in LIMITS.items()),
        *((name, noisy, faults) for name, faults in NOISE.items()),
        *((name, healed, faults) for name, faults in HEAL.items()),
    ]
    with ProcessPoolExecutor(2) as pool:
        runs = [
            (name, [pool.submit(run, faults, seed, args.rows) for seed in range(args.seeds)])
            for name, run, faults in cells
            if args.only in name
        ]
        for name, futures in runs:
            print(f"{name:<40}", "  ".join(f.result() for f in futures), flush=True)


if __name__ == "__main__":
    main()
