"""Kill the real CLI at random moments; every row must end up exactly once, and no row
whose result was flushed may be requested again."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchq.config import load_job
from batchq.engine.runner import run_job
from batchq.errors import RunStopped
from batchq.events import Event, Flushed

ROOT = Path(__file__).resolve().parents[2]
FAULTS = {"fail_503": 0.04, "fail_500": 0.02, "fail_drop": 0.02, "fail_truncate": 0.02,
          "fail_malformed": 0.01, "fail_429": 0.05}  # fmt: skip


def reply(i: int) -> str:
    return f"echo: Review: review number {i}"


def command(sim: Any, path: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchq",
        "run",
        "--input",
        str(path),
        "--output",
        str(out),
        "--base-url",
        sim.base_url,
        "--model",
        "qwen-plus",
        "--template",
        "Review: {text}",
        "--max-attempts",
        "20",
        "--timeout",
        "5",
        *extra,
    ]


def flushed_rows(out: Path) -> set[int]:
    shards = sorted((out.parent / (out.name + ".batchq") / "shards").glob("[0-9]*.parquet"))
    return {r for s in shards for r in pq.read_table(s, columns=["_row"])["_row"].to_pylist()}


def wait_for_new_flush(out: Path, already: int) -> None:
    deadline = time.monotonic() + 40
    while len(flushed_rows(out)) <= already:
        assert time.monotonic() < deadline, "no flush within 40 s"
        time.sleep(0.05)


def check_output(out: Path, n: int) -> pl.DataFrame:
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(n)]
    assert df["response"].to_list() == [reply(i) for i in range(n)]
    assert set(df["status"]) == {"ok"}
    return df


@pytest.mark.timeout(150)  # about 20 s here; room for a slower or busier CI machine
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_moments_loses_nothing_and_resends_nothing_flushed(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    n = 4000
    sim = simulator(latency_ms=20, seed=seed, **FAULTS)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)])
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--concurrency", "8", "--quiet")
    first_seen: dict[int, int] = {}  # row -> requests for it when it was first seen flushed
    resent = []
    for _ in range(3):
        before = dict(sim.stats.by_prompt)
        process = subprocess.Popen(args, cwd=ROOT, stdout=DEVNULL, stderr=DEVNULL)
        wait_for_new_flush(out, len(first_seen))
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        time.sleep(0.1)  # let the simulator finish answering what was in flight
        flushed = flushed_rows(out)
        assert len(flushed) < n, "the kill should land mid-run"
        counts = sim.stats.by_prompt
        for i in flushed:
            first_seen.setdefault(i, counts[reply(i)])
        # Requested in that run but not flushed: what a later run must send again.
        resent.append(
            sum(
                1
                for i in range(n)
                if i not in flushed and counts[reply(i)] > before.get(reply(i), 0)
            )
        )
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    df = check_output(out, n)
    for i, count in first_seen.items():
        assert sim.stats.by_prompt[reply(i)] == count, f"row {i} was flushed, then sent again"
    # A row's attempts column counts only the attempts of the run that finished it.
    assert df["attempts"].sum() <= sum(sim.stats.by_prompt.values())
    print(f"rows re-sent per kill (seed {seed}): {resent}")
    assert max(resent) <= 8 * 50  # in flight, plus what came back since the last flush


def test_sigint_stops_cleanly_with_130_and_resumes(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    n = 800
    sim = simulator(latency_ms=50)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)])
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--concurrency", "8")
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert "stopping: waiting up to 5 s" in stderr
    assert "rerun the same command to resume" in stderr
    flushed = flushed_rows(out)
    requested_before = sim.stats.requests
    assert len(flushed) == requested_before  # every request in flight was waited for
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {len(flushed):,} rows already done" in done.stderr
    check_output(out, n)
    assert sim.stats.requests == n


def test_a_stop_starts_no_request_more(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    # 40 QPS with rows in backoff (503s): before, the run kept sending at full rate for
    # its 5 s grace (243 requests before the signal, 444 at exit).
    sim = simulator(latency_ms=200, fail_503=0.2, seed=4)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(400)])
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--qps", "40", "--concurrency", "8")
    process = subprocess.Popen(args, cwd=ROOT, stdout=DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while sim.stats.requests < 80:
        assert time.monotonic() < deadline
        assert process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    at_signal = sim.stats.requests
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    # Only what was in flight (8 at most), and what was already on its way when the
    # signal was sent: none at 40 QPS beyond a few.
    assert sim.stats.requests - at_signal <= 8 + 2, (at_signal, sim.stats.requests)
    # What was answered is saved (resuming from it: test_sigint_stops_cleanly...).
    assert 0 < len(flushed_rows(out)) <= sim.stats.requests


def test_sigterm_is_a_stop_too(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=50)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(2000)])
    args = command(sim, path, tmp_path / "out.parquet", "--concurrency", "8", "--quiet")
    process = subprocess.Popen(args, cwd=ROOT, stdout=DEVNULL, stderr=DEVNULL)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    assert process.returncode == 130


def test_faults_that_pass_end_ok_and_faults_that_never_pass_end_as_errors(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path, cli: Any
) -> None:
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(100)])
    sim = simulator(burst_s=0.05, seed=5, **FAULTS)
    out = tmp_path / "o.parquet"
    base = [
        "run",
        "--input",
        path,
        "--output",
        out,
        "--model",
        "m",
        "--template",
        "Review: {text}",
        "--timeout",
        "1",
        "--quiet",
    ]
    assert cli(*base, "--base-url", sim.base_url, "--max-attempts", "30").exit_code == 0
    check_output(out, 100)
    never_passing = [
        ("fail_503", "ServiceUnavailable"),
        ("fail_drop", "ServerDisconnectedError"),
        ("fail_truncate", "invalid_response"),
        ("fail_slow", "timeout"),
        ("fail_malformed", "invalid_response"),
    ]
    for fault, code in never_passing:
        broken = simulator(**{fault: 1.0}, slow_s=2)
        result = cli(
            *base,
            "--base-url",
            broken.base_url,
            "--max-attempts",
            "2",
            "--restart",
            "--concurrency",
            "100",
        )
        assert result.exit_code == 0, (fault, result.output)
        df = pl.read_parquet(out)
        assert set(df["status"]) == {"error"}, fault
        assert set(df["error_code"]) == {code}, fault
        assert set(df["attempts"]) == {2}
        assert broken.stats.requests == 200


@pytest.mark.anyio
async def test_an_unwritable_state_folder_stops_with_exit_3_and_resumes(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=20)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(600)])
    out = tmp_path / "out.parquet"
    job = load_job(
        None,
        overrides={
            "input": str(path),
            "output": str(out),
            "model": "m",
            "template": "Review: {text}",
            "base_url": sim.base_url,
            "concurrency": 8,
        },
    )
    shards = tmp_path / "out.parquet.batchq" / "shards"

    def break_the_disk(event: Event) -> None:
        if isinstance(event, Flushed) and shards.is_dir():
            shards.rename(tmp_path / "aside")
            shards.write_text("not a folder")  # every later write fails, as on a full disk

    with pytest.raises(RunStopped, match="cannot write to the state folder") as caught:
        await run_job(job, api_key=None, sink=break_the_disk)
    assert caught.value.exit_code == 3
    shards.unlink()
    (tmp_path / "aside").rename(shards)
    kept = flushed_rows(out)
    assert kept
    before = dict(sim.stats.by_prompt)
    blocks: list[pa.Table] = []
    summary = await run_job(job, api_key=None, on_results=blocks.append)
    assert summary.ok == 600
    check_output(out, 600)
    # The merge hands every row of the output to on_results (the closing summary's
    # source), the first run's rows too, in output order.
    fed = pa.concat_tables(blocks).column("response").to_pylist()
    assert fed == pq.read_table(out, columns=["response"]).column("response").to_pylist()
    assert all(sim.stats.by_prompt[reply(i)] == before[reply(i)] for i in kept)


def test_a_second_sigint_stops_at_once_leaving_whole_shards(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=50, fail_slow=0.5, slow_s=30)  # half the requests hang
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(2000)])
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--concurrency", "8", "--timeout", "60")
    process = subprocess.Popen(args, cwd=ROOT, stdout=DEVNULL, stderr=DEVNULL)
    wait_for_new_flush(out, 0)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    stopped = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.wait(timeout=10)
    assert process.returncode == 130
    assert time.monotonic() - stopped < 3  # did not wait out the 5 s grace, nor 30 s answers
    flushed = flushed_rows(out)  # every shard reads whole
    assert flushed
    assert not list((tmp_path / "out.parquet.batchq" / "shards").glob(".tmp-*"))
