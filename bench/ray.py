"""The Ray engine side by side with the local engine and Ray's own ``ray.data.llm`` HTTP
processor, on the same simulator, in one run; and the pacing actor alone.

    python bench/ray.py                 # both scenarios and the actor (about 3 minutes)
    python bench/ray.py --rows 4000     # fewer rows

Needs ``pip install -e '.[ray]'``. One Ray (a head on this machine, started here and
stopped at the end) serves every Ray client, so Ray's start-up is not timed; each client
gets a fresh simulator process. Scenarios:

    limit-400   a 400 QPS sliding-window limit, 50 ms answers; batchq told 600 (it must
                find the limit), ray.data.llm told qps=400 (its own setting; it has no
                way to find a limit): the share of the limit held, and limit 429s
    fast        no limit, no latency: requests per second, and CPU per request (the
                whole machine's CPU time, less the simulator's, over the requests)

The actor alone: one pacing actor, two callers booking chunks of 32 as fast as it
answers for 5 s; the bookings per second, and what that paces at 32 a booking.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "K": "x"}


def machine_cpu_s() -> float:
    """CPU seconds every process of the machine has used (user + system)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # not idle, iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def simulator(*args: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "batchq", "simulate", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().split()[3]


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_stats") as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def batchq(url: str, data: Path, out: Path, qps: float | None, extra: list[str]) -> None:
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
        "--api-key-env",
        "K",
        "--model",
        "qwen-plus",
        "--concurrency",
        "128",
        "--quiet",
        "--restart",
        *extra,
    ]
    command += ["--qps", str(qps)] if qps else []
    subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL)


RAY_DATA_LLM = """
import sys, ray
from ray.data.llm import HttpRequestProcessorConfig, build_processor
url, rows, qps, address = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ray.init(address=address, log_to_driver=False)
config = HttpRequestProcessorConfig(url=url + "/chat/completions", headers={}, qps=qps or None,
                                    concurrency=2, batch_size=64)
processor = build_processor(
    config,
    preprocess=lambda row: dict(payload=dict(model="qwen-plus", messages=[
        {"role": "user", "content": f"prompt {row['id']}"}])),
    postprocess=lambda row: dict(answer=row["http_response"]["choices"][0]["message"]["content"]),
)
processor(ray.data.range(rows)).materialize()
"""


def ray_data_llm(url: str, rows: int, qps: float | None, address: str) -> None:
    command = [sys.executable, "-c", RAY_DATA_LLM, url, str(rows), str(qps or 0), address]
    subprocess.run(
        command,
        check=False,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=900,
    )


def measure(
    client: str, sim_args: list[str], rows: int, qps: float | None, address: str, tmp: Path
) -> dict[str, float]:
    data = tmp / "in.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(rows))
    )
    sim, url = simulator(*sim_args)
    try:
        cpu, sim_cpu, started = machine_cpu_s(), process_cpu_s(sim.pid), time.perf_counter()
        out = tmp / "out.parquet"
        if client == "local":
            batchq(url, data, out, qps, [])
        elif client == "ray x2":
            batchq(
                url, data, out, qps, ["--engine", "ray", "--ray-address", address, "--workers", "2"]
            )
        else:
            ray_data_llm(url, rows, qps, address)
        seconds = time.perf_counter() - started
        used = machine_cpu_s() - cpu - (process_cpu_s(sim.pid) - sim_cpu)
        seen = stats(url)
    finally:
        sim.terminate()
        sim.wait()
    ok = seen["by_status"].get("200", 0)
    per_second = seen["ok_per_second"]
    steady = per_second[3:-3] or per_second
    return {
        "ok": ok,
        "seconds": seconds,
        "req_s": ok / seconds,
        "steady": sum(steady) / max(1, len(steady)),
        "limited": seen["limited"],
        "requests": seen["requests"],
        "cpu_ms": used * 1000 / max(1, seen["requests"]),
    }


PACING = """
import sys, time, ray
from batchq.config import Limits
from batchq.engine.ray_actors import Pacing
ray.init(address=sys.argv[1], log_to_driver=False)
actor = ray.remote(Pacing).options(num_cpus=0).remote(Limits(qps=1e9), None)
ray.get(actor.book.remote(32, 10))

@ray.remote(num_cpus=0)
def caller(actor, until):
    calls = 0
    while time.time() < until:
        ray.get(actor.book.remote(32, 10))
        calls += 1
    return calls

seconds = float(sys.argv[2])
until = time.time() + seconds
print(sum(ray.get([caller.remote(actor, until) for _ in range(2)])) / seconds)
"""


def pacing_actor(address: str, seconds: float = 5.0) -> float:
    """Bookings of 32 per second one pacing actor answers, two callers at once (run
    apart: this file's name hides the ray package from its own imports)."""
    command = [sys.executable, "-c", PACING, address, str(seconds)]
    done = subprocess.run(
        command, check=True, env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bq-bench-", dir="/tmp"))
    port = 41000 + os.getpid() % 1000
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={tmp / 'ray'}",
        ],
        check=True,
        capture_output=True,
        env=ENV,
    )
    address = f"127.0.0.1:{port}"
    try:
        print("limit-400: a 400 QPS limit, 50 ms answers")
        print(
            f"  {'client':<14}{'seconds':>9}{'steady ok/s':>13}{'of limit':>10}"
            f"{'limit 429s':>12}{'req/s':>8}"
        )
        for client, qps in (("local", 600), ("ray x2", 600), ("ray.data.llm", 400)):
            r = measure(
                client, ["--qps", "400", "--latency-ms", "50"], args.rows, qps, address, tmp
            )
            share = r["limited"] / max(1, r["requests"])
            print(
                f"  {client:<14}{r['seconds']:>9.1f}{r['steady']:>13.0f}"
                f"{r['steady'] / 400:>10.0%}{share:>12.1%}{r['req_s']:>8.0f}"
            )
        print("fast: no limit, no latency")
        print(f"  {'client':<14}{'seconds':>9}{'req/s':>8}{'CPU ms/req':>12}")
        rows = args.rows * 2
        for client in ("local", "ray x2", "ray.data.llm"):
            r = measure(client, ["--latency-ms", "0"], rows, None, address, tmp)
            print(f"  {client:<14}{r['seconds']:>9.1f}{r['req_s']:>8.0f}{r['cpu_ms']:>12.2f}")
        rate = pacing_actor(address)
        print(
            f"pacing actor alone: {rate:,.0f} bookings/s of 32: paces up to {rate * 32:,.0f} req/s"
        )
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV)


if __name__ == "__main__":
    main()
