"""Peak RSS of the Python API beside the CLI's, on the same N-row Parquet input.

    python bench/api_memory.py --rows 1000000     # about 3 minutes a run here

Writes an N-row Parquet file (an int id and a review text, as polars writes it), starts
the simulator in this process, and runs the same job three ways, each in a child process
of its own, one after the other: the CLI (``batchq run --input in.parquet``), the API
over ``pl.scan_parquet(in.parquet)`` (a LazyFrame: streamed), and the API over
``pl.read_parquet(in.parquet)`` (a frame in memory). Each child's peak RSS is sampled from
/proc as bench/first_request.py does; for the API, the peak is the child's VmHWM as the
call returns, before the script touches the frame it returns (the N rows with their
result columns, memory-mapped: its pages count once they are read). The phases are
sampled VmRSS: before the first request (staging the data, the checks), while sending,
and after the last request (the merge, the mapped frame, then the script's use of it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import polars as pl
from first_request import watch_rss

from batchq.simulator import SimConfig, serve_in_thread

API = """
import resource, sys, time
import polars as pl
import batchq
source = pl.scan_parquet(sys.argv[2]) if sys.argv[3] == "lazy" else pl.read_parquet(sys.argv[2])
out = batchq.run(source, provider="custom", base_url=sys.argv[1], model="qwen-plus",
                 template="Review: {text}", progress=False)
status = open("/proc/self/status").read().splitlines()  # before the frame is touched
print("call_mb=" + next(x.split()[1] for x in status if x.startswith("VmHWM")))
print(f"child_mb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")  # staging's
assert out.height == int(sys.argv[4]) and out["status"].eq("ok").all(), out["status"].value_counts()
print(f"frame_mb={out.estimated_size() / 2**20}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--runs",
        default="cli,lazy,eager",
        help="which runs, of cli, lazy, eager (default: all three)",
    )
    args = parser.parse_args()
    n, runs = args.rows, args.runs.split(",")
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in.parquet"
        pl.DataFrame(
            {"id": range(n), "text": [f"review number {i}: fine" for i in range(n)]}
        ).write_parquet(source)
        print(f"input: {n:,} rows, {source.stat().st_size / 1e6:,.1f} MB of Parquet")
        script = Path(folder) / "api.py"
        script.write_text(textwrap.dedent(API))
        results = {}
        with serve_in_thread(SimConfig()) as sim:
            cli = [
                sys.executable,
                "-m",
                "batchq",
                "run",
                "--input",
                str(source),
                "--output",
                str(Path(folder) / "cli.parquet"),
                "--model",
                "qwen-plus",
                "--base-url",
                sim.base_url,
                "--template",
                "Review: {text}",
                "--quiet",
            ]
            api = [sys.executable, str(script), sim.base_url, str(source)]
            for name, command in (
                ("CLI", cli),
                ("API, LazyFrame", [*api, "lazy", str(n)]),
                ("API, DataFrame", [*api, "eager", str(n)]),
            ):
                if {"CLI": "cli", "API, LazyFrame": "lazy"}.get(name, "eager") not in runs:
                    continue
                env = {"XDG_CACHE_HOME": str(Path(folder) / f"cache-{len(results)}")}
                results[name] = peak, phases, seconds, frame, child = measure(command, sim, n, env)
                returned = f"; the frame it returns holds {frame:,.0f} MB" if frame else ""
                if child:
                    returned += f"; its largest child process (staging) peaked at {child:,.0f} MB"
                print(
                    f"{name:>15}: peak RSS {peak:,.0f} MB in {seconds:.0f} s (sampled: "
                    "{:,.0f} MB before the first request, {:,.0f} MB while sending, "
                    "{:,.0f} MB after the last request){}".format(*phases[:3], returned),
                    flush=True,
                )
    if "CLI" not in results:
        return
    base = results["CLI"][0]
    for name, (peak, phases, _, _, _) in results.items():
        print(
            f"{name:>15}: {peak / base:.2f}x the CLI's peak; while sending "
            f"{phases[1] / results['CLI'][1][1]:.2f}x"
        )


def measure(
    command: list[str], sim: object, rows: int, env: dict[str, str]
) -> tuple[float, list[float], float, float, float]:
    """The child's peak RSS, its three phases' (MB), seconds, the frame's MB, and the
    peak of the largest process the API started (staging a LazyFrame), in MB."""
    started = time.perf_counter()
    before = sim.stats.requests  # type: ignore[attr-defined]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env}
    )
    phases = [0.0, 0.0, 0.0, 0.0]
    watch = threading.Thread(target=watch_rss, args=(process, _Since(sim, before), rows, phases))
    watch.start()
    out, err = process.communicate()
    watch.join()
    if process.returncode != 0:
        sys.exit(f"{command[1]} failed: {err.decode()}")
    found = re.search(r"frame_mb=([\d.]+)", out.decode())
    frame = float(found.group(1)) if found else 0.0
    call = re.search(r"call_mb=(\d+)", out.decode())  # the API's peak when the call returned
    peak = int(call.group(1)) / 1024 if call else max(phases)
    child = re.search(r"child_mb=(\d+)", out.decode())
    grandchild = int(child.group(1)) / 1024 if child else 0.0
    return peak, phases, time.perf_counter() - started, frame, grandchild


class _Since:
    """The simulator's request count from ``before`` on, as watch_rss reads it."""

    def __init__(self, sim: object, before: int) -> None:
        self._sim, self._before = sim, before

    @property
    def stats(self) -> _Since:
        return self

    @property
    def requests(self) -> int:
        return self._sim.stats.requests - self._before  # type: ignore[attr-defined, no-any-return]


if __name__ == "__main__":
    main()
