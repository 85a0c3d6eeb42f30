"""Peak memory of the merge alone: state folder -> output Parquet, for N rows.

    python bench/merge_memory.py --rows 10000000

Writes an N-row input and a state folder of finished rows (7,000 a shard, in order, as a
run at about 7,000 rows/s leaves them), then merges them in this process and reports the
seconds and the peak RSS before and after the merge (fed to the cost tally that gives a
run its closing summary, as in a run), then reads the output back as `batchq cost` does.
Compare with bench/first_request.py --whole, whose peak includes the sending phase.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # as the console entry sets it

import orjson

from batchq import memory
from batchq.config import load_job
from batchq.io.preflight import preflight
from batchq.money.pricing import PriceTable
from batchq.money.report import CostTally, cost_report, find_results
from batchq.output.merge import merge_output
from batchq.result import Result
from batchq.state import StateDir, manifest_for

SHARD_ROWS = 7_000


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    memory.few_arenas()  # as the console entry does, before Arrow's threads allocate
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    n = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "in.jsonl", Path(folder) / "out.parquet"
        with source.open("wb") as f:
            for i in range(n):
                f.write(orjson.dumps({"id": f"r{i}", "text": f"review {i}", "stars": i % 5}))
                f.write(b"\n")
        overrides = {"input": str(source), "output": str(out), "model": "m", "template": "{text}"}
        job = load_job(None, overrides=overrides)
        info = preflight(job)
        manifest = manifest_for(job, info, region="intl")
        state = StateDir.open(job, info, manifest=manifest)
        for start in range(0, n, SHARD_ROWS):
            state.write(
                [
                    Result(
                        row=i,
                        id=f"r{i}",
                        status="ok",
                        model="m",
                        attempts=1,
                        via="live",
                        response=f"echo: review {i}",
                        finish_reason="stop",
                        prompt_tokens=10,
                        completion_tokens=8,
                        total_tokens=18,
                        request_id=f"chatcmpl-{i}",
                        latency_ms=1.0,
                        http_status=200,
                    )
                    for i in range(start, min(start + SHARD_ROWS, n))
                ]
            )
        before = peak_mb()
        started = time.perf_counter()
        tally = CostTally(PriceTable.load(), "intl")  # the run's closing summary, fed as
        merge_output(state, info, out, manifest=manifest, on_block=tally.add)
        seconds = time.perf_counter() - started
        state.close()
        merged = peak_mb()
        started = time.perf_counter()
        cost_report(find_results(out), PriceTable.load())  # what `batchq cost` reads back
        again = time.perf_counter() - started
    print(
        f"{n:,} rows: merge {seconds:.1f} s; peak RSS {before} MB before it, {merged} MB "
        f"after it; `batchq cost` on the output: {again:.1f} s, peak {peak_mb()} MB"
    )


if __name__ == "__main__":
    main()
