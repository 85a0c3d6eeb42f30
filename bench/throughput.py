"""Side-by-side throughput of batchq and peer clients against the simulator, in one run.

    python bench/throughput.py              # every scenario (about 4 minutes)
    python bench/throughput.py raw-256      # one of them
    python bench/throughput.py raw-256 --rows 10000   # another number of rows
    python bench/throughput.py --cookbook-script api_request_parallel_processor.py

Each client run gets a fresh simulator process pinned to core 0 (``taskset``) while the
client is pinned to core 1, and is timed as a whole process: wall seconds, CPU seconds
(user + system, from wait4), peak RSS. The simulator's own counters give the requests
and 429s it saw. Scenarios:

    raw-256     no limit, zero latency, 256 requests in flight
    raw-2000    the same with 2,000 in flight
    limit-200   a 200 QPS limit, 800 ms lognormal latency, a server limited to 250 QPS
    overload    clients set to 300 QPS against a server limited to 100 QPS, Retry-After 1,
                5,000 rows (ideal: 50 s)
    overload-noise  the same with 5 % of requests refused with 429 at random on top
                (ideal: 52.6 s)
    overload-800  a 100 QPS limit, answers after 800 ms (constant), clients told 300,
                3,000 rows (ideal: 30 s)
    bucket      a token bucket of 100 a second (burst 100) and 5 % random 429s, clients
                told 300, 3,000 rows (ideal: 31.6 s)
    minute-bucket  a bucket of 240 refilling 4 a second (a per-minute quota, as a third
                party's OpenAI mock enforces it), clients told 10, 600 rows
    minute-window  a fixed budget of 6,000 a minute, clients told 300, 12,000 rows
    heal        100 QPS configured, every request refused with insufficient_quota from
                5 s to 13 s: seconds from the throttle's end back to 95 % of the rate
    noise       clients set to 250 QPS against a server with no limit that refuses 5 %
                with 429 at random (Retry-After 1) and answers 3 % with 503, drops 2 %
                and answers 3 % after 3 s: the rate sent (retries included) from 3 s
                after the first request to the last first attempt, against 250

Clients: batchq (the CLI, writing Parquet and checkpoints), reference (bare aiohttp +
uvloop + orjson: the floor), cookbook (the openai-cookbook parallel processor's approach,
re-implemented in peers.py), cookbook-script (that script itself, only with
``--cookbook-script PATH``), openai-sdk (AsyncOpenAI + semaphore + aiolimiter, as many
users write it; skipped unless ``pip install openai`` was run in this environment).
bench/README.md says how to install the peers' packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


PEERS = ("cookbook", "cookbook-script", "openai-sdk")


@dataclass(frozen=True)
class Scenario:
    rows: int
    in_flight: int
    sim: tuple[str, ...]
    qps: float | None = None
    clients: tuple[str, ...] = ("batchq", "reference", *PEERS)


SCENARIOS = {
    "raw-256": Scenario(20_000, 256, ()),
    "raw-2000": Scenario(20_000, 2000, ()),
    "limit-200": Scenario(8_000, 400, ("--latency-ms", "800", "--qps", "250"), qps=200,
                          clients=("batchq", *PEERS)),
    "overload": Scenario(5_000, 300, ("--qps", "100", "--retry-after", "1"), qps=300,
                         clients=("batchq", *PEERS)),
    "overload-noise": Scenario(5_000, 300, ("--qps", "100", "--retry-after", "1",
                                            "--fail-429", "0.05"), qps=300,
                               clients=("batchq", *PEERS)),
    "noise": Scenario(5_000, 64, ("--fail-429", "0.05", "--retry-after", "1", "--fail-503",
                                  "0.03", "--fail-drop", "0.02", "--fail-slow", "0.03",
                                  "--slow-s", "3", "--seed", "3"), qps=250,
                      clients=("batchq", *PEERS)),
    "overload-800": Scenario(3_000, 300, ("--qps", "100", "--retry-after", "1", "--latency-ms",
                                          "800", "--latency-sigma", "0"), qps=300,
                             clients=("batchq", *PEERS)),
    "bucket": Scenario(3_000, 300, ("--qps", "100", "--limit-shape", "bucket", "--retry-after",
                                    "1", "--fail-429", "0.05"), qps=300,
                       clients=("batchq", *PEERS)),
    "minute-bucket": Scenario(600, 20, ("--qpm", "240", "--limit-shape", "minute-bucket",
                                        "--retry-after", "1"), qps=10,
                              clients=("batchq", *PEERS)),
    "minute-window": Scenario(12_000, 300, ("--qps", "100", "--limit-shape", "minute-window",
                                            "--retry-after", "1"), qps=300,
                              clients=("batchq", *PEERS)),
    "heal": Scenario(3_000, 64, ("--quota-for", "8", "--quota-after", "5"), qps=100,
                     clients=("batchq", *PEERS)),
}  # fmt: skip
#: The limit each scenario's server enforces (requests/s), and the share of its answers
#: that end ok; the heal scenario's throttle (from, to, in whole seconds of the run).
LIMITED = {
    "overload": (100, 1.0),
    "overload-noise": (100, 0.95),
    "overload-800": (100, 1.0),
    "bucket": (100, 0.95),
    "minute-bucket": (4, 1.0),
    "minute-window": (100, 1.0),
}
HEAL = (5, 13)


def pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() else []


def start_simulator(args: tuple[str, ...]) -> tuple[subprocess.Popen[str], str]:
    command = [*pin(0), sys.executable, "-m", "batchq", "simulate", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # "batchq simulator on http://127.0.0.1:PORT/v1 ..."
    return process, line.split()[3]


def stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_stats") as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def client_command(
    client: str, url: str, data: Path, out: Path, s: Scenario, script: str | None
) -> list[str]:
    if client == "batchq":
        command = [
            sys.executable,
            "-m",
            "batchq",
            "run",
            "--input",
            str(data),
            "--output",
            str(out),
            "--base-url",
            url,
            "--model",
            "qwen-plus",
            "--concurrency",
            str(s.in_flight),
            "--max-attempts",
            "30",
            "--quiet",
            "--restart",
        ]
    else:
        command = [
            sys.executable,
            str(HERE / "peers.py"),
            client,
            url,
            str(data),
            "--in-flight",
            str(s.in_flight),
        ]
        command += ["--script", script] if client == "cookbook-script" and script else []
    return [*pin(1), *command, *(["--qps", str(s.qps)] if s.qps else [])]


def run_one(
    client: str, s: Scenario, data: Path, tmp: Path, script: str | None
) -> dict[str, float] | None:
    if client == "cookbook-script" and not script:
        return None
    if client == "openai-sdk":
        try:
            import openai  # noqa: F401
        except ImportError:
            return None
    sim, url = start_simulator(s.sim)
    try:
        started = time.perf_counter()
        command = client_command(client, url, data, tmp / "out.parquet", s, script)
        with open(tmp / "stderr.txt", "w+b") as log:  # the cookbook logs a line a request
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
            _, status, usage = os.wait4(process.pid, 0)
            log.seek(0)
            errors = log.read()[-500:].decode(errors="replace")
        seconds = time.perf_counter() - started
        seen = stats(url)
    finally:
        sim.terminate()
        sim.wait()
    if status != 0:
        print(f"  {client} failed: {errors}", file=sys.stderr)
    by_status: dict[str, int] = seen["by_status"]  # type: ignore[assignment]
    per_second: list[int] = seen["ok_per_second"]  # type: ignore[assignment]
    steady = per_second[3:-3] or per_second  # leave out the ramp and the tail
    requests = int(seen["requests"])  # type: ignore[call-overload]
    received: list[int] = seen["received_per_second"]  # type: ignore[assignment]
    firsts: list[int] = seen["first_per_second"]  # type: ignore[assignment]
    last_first = max((i for i, n in enumerate(firsts) if n), default=len(received))
    sending = received[3:last_first] or received  # 3 s in, to the last first attempt
    return {
        "ok": by_status.get("200", 0),
        "seconds": seconds,
        "req_s": by_status.get("200", 0) / seconds,
        "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000 / max(requests, 1),
        "rss_mb": usage.ru_maxrss / 1024,
        "429s": by_status.get("429", 0),
        "requests": requests,
        "steady_req_s": sum(steady) / max(len(steady), 1),
        "sent_req_s": sum(sending) / max(len(sending), 1),
        "limited": int(seen["limited"]),  # type: ignore[call-overload]
        "limited_start": sum(seen.get("limited_per_second", [])[:5]),  # type: ignore[call-overload]
        "back_s": next(
            (i - HEAL[1] for i in range(HEAL[1], len(received)) if received[i] >= 95), -1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[])
    parser.add_argument(
        "--cookbook-script",
        metavar="PATH",
        help="the openai-cookbook's api_request_parallel_processor.py, "
        "run as the cookbook-script client (see bench/README.md)",
    )
    parser.add_argument("--rows", type=int, help="rows of each scenario's input")
    args = parser.parse_args()
    names = args.scenarios or list(SCENARIOS)
    print(
        f"{'scenario':<10} {'client':<15} {'ok rows':>8} {'s':>7} {'req/s':>8} "
        f"{'CPU ms/req':>10} {'RSS MB':>7} {'429s':>6}  vs reference / target"
    )
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for name in names:
            s = SCENARIOS[name]
            if args.rows:
                s = dataclasses.replace(s, rows=args.rows)
            data = tmp / f"{name}.jsonl"
            data.write_text(
                "".join(
                    json.dumps({"id": i, "prompt": f"Label review {i}: fine"}) + "\n"
                    for i in range(s.rows)
                )
            )
            results = {c: run_one(c, s, data, tmp, args.cookbook_script) for c in s.clients}
            for client, r in results.items():
                if r is None:
                    print(f"{name:<10} {client:<15} ({MISSING[client]})")
                    continue
                against = verdict(name, s, r, results.get("reference"))
                print(
                    f"{name:<10} {client:<15} {r['ok']:>8,.0f} {r['seconds']:>7.1f} "
                    f"{r['req_s']:>8,.0f} {r['cpu_ms']:>10.3f} {r['rss_mb']:>7.0f} "
                    f"{r['429s']:>6,.0f}  {against}"
                )
            ours = results.get("batchq")
            for peer in ("cookbook", "cookbook-script") if name.startswith("raw") else ():
                if ours and (theirs := results.get(peer)):
                    print(
                        f"{name:<10} batchq req/s = {ours['req_s'] / theirs['req_s']:.1f}× {peer}'s"
                    )


MISSING = {
    "openai-sdk": "not installed: pip install openai",
    "cookbook-script": "not run: give --cookbook-script PATH",
}


def verdict(name: str, s: Scenario, r: dict[str, float], ref: dict[str, float] | None) -> str:
    if name.startswith("raw") and ref is not None:
        return f"CPU {r['cpu_ms'] / ref['cpu_ms']:.2f}×, req/s {r['req_s'] / ref['req_s']:.2f}×"
    if name == "limit-200":
        return f"steady {r['steady_req_s'] / 200:.1%} of 200 QPS (whole run {r['req_s'] / 200:.1%})"
    if name in LIMITED:
        limit, ends = LIMITED[name]
        ideal = s.rows / limit / ends
        share = r["limited"] / max(r["requests"], 1)
        return (
            f"time {r['seconds'] / ideal:.2f}× the ideal {ideal:.1f} s, limit 429s "
            f"{share:.1%} of requests ({r['limited_start']:.0f} of {r['limited']:.0f} in "
            f"the first 5 s), steady {r['steady_req_s']:.1f} ok/s"
        )
    if name == "heal":
        back = r["back_s"]
        when = f"{back:.0f} s" if back >= 0 else "never"
        return f"back to 95 % of 100 QPS {when} after the throttle's end"
    if name == "noise":
        return f"sent {r['sent_req_s'] / 250:.1%} of 250 QPS from 3 s to the last first attempt"
    return ""


if __name__ == "__main__":
    main()
