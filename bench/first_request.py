"""Time to the first request, and peak memory, of a fresh run over a large input.

    python bench/first_request.py --rows 1000000            # time to first request, then stop
    python bench/first_request.py --rows 10000000 --whole   # the whole run: peak RSS at 10M
    python bench/first_request.py --rows 40000 --whole --text-bytes 2000  # long rows
    python bench/first_request.py --rows 1000000 --shape messages          # a messages column
    python bench/first_request.py --rows 1000000 --shape batch-lines       # Batch-API lines

Writes an input of N review rows (id, text, stars; a template job), starts `batchq run`
in a subprocess against the simulator (in this process's thread) and reports the seconds
from process start to the first request the simulator receives, next to the seconds a
bare `python -c "import batchq.cli"` takes on the same machine (the floor: interpreter
and imports). Without --whole the run is stopped by SIGINT two seconds after its first
request; with --whole it runs to the end. Either way the child's peak RSS is reported.
--text-bytes pads each review's text; the simulator echoes the prompt, so the answers
are as long. --shape messages writes each row as a ``messages`` column (a system and a
user message) instead, --shape prompt as a ``prompt`` column, --shape batch-lines as
Batch-API lines (``custom_id``, ``body``); the job then has no template.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from batchq.simulator import SimConfig, serve_in_thread


def write_input(path: Path, rows: int, text_bytes: int = 0, shape: str = "template") -> None:
    pad = (" lorem ipsum" * (text_bytes // 12 + 1))[:text_bytes]

    def row(i: int) -> dict[str, Any]:
        text = f"review {i}: it does what it says{pad}"
        if shape == "messages":
            return {
                "id": f"r{i}",
                "messages": [
                    {"role": "system", "content": "Answer with one word."},
                    {"role": "user", "content": f"Review: {text} ({i % 5} stars)"},
                ],
            }
        if shape == "prompt":
            return {"id": f"r{i}", "prompt": f"Review: {text} ({i % 5} stars)"}
        if shape == "batch-lines":
            message = {"role": "user", "content": f"Review: {text} ({i % 5} stars)"}
            body = {"model": "qwen-plus", "max_tokens": 8, "messages": [message]}
            return {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        return {"id": f"r{i}", "text": text, "stars": i % 5}

    with path.open("wb") as f:
        for start in range(0, rows, 100_000):
            f.write(
                b"".join(
                    orjson.dumps(row(i)) + b"\n" for i in range(start, min(start + 100_000, rows))
                )
            )


def import_seconds() -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import batchq.cli"], check=True)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--whole", action="store_true", help="run to the end")
    parser.add_argument("--text-bytes", type=int, default=0, help="pad each text (and answer)")
    parser.add_argument(
        "--shape", choices=["template", "prompt", "messages", "batch-lines"], default="template"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "in.jsonl", Path(folder) / "out.parquet"
        write_input(source, args.rows, args.text_bytes, args.shape)
        print(f"input: {args.rows:,} rows, {source.stat().st_size / 1e6:,.0f} MB")
        floor = import_seconds()
        with serve_in_thread(SimConfig()) as sim:
            template = ["--template", "Review: {text} ({stars} stars)"]
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
                "qwen-plus",
                "--base-url",
                sim.base_url,
                "--quiet",
                *(template if args.shape == "template" else []),
            ]
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            phases = [0.0, 0.0, 0.0, 0.0]  # three phases' VmRSS, then VmHWM
            watch = threading.Thread(target=watch_rss, args=(process, sim, args.rows, phases))
            watch.start()
            while sim.stats.requests == 0 and process.poll() is None:
                time.sleep(0.001)
            first = time.perf_counter() - started
            if not args.whole:
                time.sleep(2)
                process.send_signal(signal.SIGINT)
            _, err = process.communicate()
            watch.join()
            whole = time.perf_counter() - started
        if process.returncode not in (0, 130):
            sys.exit(f"batchq failed: {err.decode()}")
        peak_mb = max(phases)
    print(f"first request after {first:.2f} s (python + imports alone: {floor:.2f} s)")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print(
            "PYTHONDONTWRITEBYTECODE is set: each run compiles batchq from source, which no "
            "installed copy does (about 0.07 s here); unset it for a user's figure"
        )
    what = "run done" if args.whole else "stopped 2 s after the first request"
    print(
        f"{what} after {whole:.1f} s, {sim.stats.requests:,} requests; "
        f"peak RSS of batchq: {peak_mb:,.0f} MB "
        "(sampled: {:,.0f} MB before the first request, {:,.0f} MB while sending, "
        "{:,.0f} MB after the last request)".format(*phases[:3])
    )


def watch_rss(process: subprocess.Popen[bytes], sim: Any, rows: int, peaks: list[float]) -> None:
    """The child's highest RSS, sampled every 20 ms from /proc, in three phases: before
    its first request (the checks of the input), while requests go out, and after the
    last one (the merge and the summary); and its VmHWM, the kernel's own high-water mark,
    which catches peaks between samples. Not getrusage(RUSAGE_CHILDREN): a forked child's
    ru_maxrss counts the pages it shared with this process before exec (200 MB reported
    for a run that never passed 138 MB, after --text-bytes 2000 had built its input)."""
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            lines = status.read_text().splitlines()
        except OSError:
            break
        kb = {x.split(":")[0]: int(x.split()[1]) for x in lines if x.startswith(("VmRSS", "VmHWM"))}
        if "VmRSS" not in kb:  # a zombie: the run is over
            break
        phase = 0 if sim.stats.requests == 0 else 1 if sim.stats.requests < rows else 2
        peaks[phase] = max(peaks[phase], kb["VmRSS"] / 1024)
        peaks[3] = max(peaks[3], kb["VmHWM"] / 1024)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
