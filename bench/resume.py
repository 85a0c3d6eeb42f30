"""How long a resume over N finished rows takes to send its first request.

    python bench/resume.py --rows 1000000

Builds an input of N+1000 rows and a state folder holding results for the first N (as
a killed run would have left them: one shard per 5,000 rows), then runs `batchq run` in
a subprocess against the simulator and reports the seconds from process start to the
first request the simulator receives, and to the end of the run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from batchq.config import load_job
from batchq.io.preflight import preflight
from batchq.result import Result
from batchq.simulator import SimConfig, serve_in_thread
from batchq.state import StateDir, manifest_for

SHARD_ROWS = 5_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="finished rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        total = args.rows + 1_000
        source = tmp / "in.jsonl"
        with source.open("wb") as f:
            for i in range(total):
                f.write(orjson.dumps({"id": i, "prompt": f"row {i}"}) + b"\n")
        out = tmp / "out.parquet"
        job = load_job(None, overrides={"input": str(source), "output": str(out), "model": "m"})
        started = time.perf_counter()
        info = preflight(job)
        state = StateDir.open(job, info, manifest=manifest_for(job, info, region="any"))
        for start in range(0, args.rows, SHARD_ROWS):
            rows = range(start, min(start + SHARD_ROWS, args.rows))
            done = [
                Result(row=i, id=str(i), status="ok", model="m", attempts=1, via="live")
                for i in rows
            ]
            state.write(done)
        state.close()
        print(f"state of {args.rows:,} rows built in {time.perf_counter() - started:.1f} s")
        with serve_in_thread(SimConfig()) as sim:
            command = [
                sys.executable,
                "-m",
                "batchq",
                "run",
                "--input",
                str(source),
                "--output",
                str(out),
                "--model",
                "m",
                "--base-url",
                sim.base_url,
                "--quiet",
            ]
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            while sim.stats.requests == 0 and process.poll() is None:
                time.sleep(0.001)
            first = time.perf_counter() - started
            _, err = process.communicate()
            whole = time.perf_counter() - started
            if process.returncode != 0:
                sys.exit(f"batchq failed: {err.decode()}")
        print(
            f"resume over {args.rows:,} finished rows: first request after {first:.2f} s, "
            f"run done (1,000 rows sent, {total:,} merged) after {whole:.2f} s; "
            f"requests sent: {sim.stats.requests:,}"
        )


if __name__ == "__main__":
    main()
