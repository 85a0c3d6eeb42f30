"""When the process itself is in trouble: a reader that went away, a full disk, a
rehearsal's batches, empty inputs. Every case ends with the data intact, nothing paid
twice, no temporary file left, a clear message and the documented exit code."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)]


def command(sim: Any, path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchq", "run", "--input", str(path), "--output", str(out),
            "--base-url", sim.base_url, "--model", "qwen-plus", "--template", "Review: {text}",
            *extra]  # fmt: skip


@pytest.mark.timeout(120)
def test_a_pipe_closed_after_the_first_line_does_not_stop_the_run(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    """``batchq run … 2>&1 | head -1``: progress, warnings and the summary lose their
    reader; the run goes on to its end, its output whole, and exits 0."""
    sim = simulator(latency_ms=20, fail_503=0.05, fail_429=0.05)
    path = write_jsonl(rows(300))
    out = tmp_path / "out.parquet"
    # The log file beside the pipe goes on being written.
    extra = ["--qps", "40", "--max-attempts", "20", "--log-file", str(tmp_path / "run.log")]
    process = subprocess.Popen(command(sim, path, out, *extra), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.strip(), "the run printed nothing"
    process.stdout.close()  # `head -1` read its line and went away
    assert process.wait(timeout=100) == 0
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(300)]
    assert set(df["status"]) == {"ok"}
    assert sim.stats.requests >= 300
    assert '"event":"run_finished"' in (tmp_path / "run.log").read_text()
