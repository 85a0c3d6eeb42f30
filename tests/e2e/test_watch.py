"""Watching a run and pricing it: `status`, `cost`, `estimate`, the summary, `--log-file`,
through the real CLI (and against the simulator where a run is needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchq.cli.progress import money

ROOT = Path(__file__).resolve().parents[2]
# Runs use the dashscope-intl preset (so they are priced), which needs its key variable;
# the simulator takes any key.
ENV = {**os.environ, "DASHSCOPE_API_KEY": "sk-simulated"}


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
        "--provider",
        "dashscope-intl",
        "--model",
        "qwen-plus",
        "--template",
        "Review: {text}",
        *extra,
    ]


def shards(out: Path) -> list[Path]:
    return sorted((out.parent / (out.name + ".batchq") / "shards").glob("[0-9]*.parquet"))


def wait_for_a_flush(out: Path) -> None:
    deadline = time.monotonic() + 40
    while not shards(out):
        assert time.monotonic() < deadline, "no flush within 40 s"
        time.sleep(0.05)


# --- cost, checked against a bill computed by hand ------------------------------------

USD_PER_M = {  # (input, output, thinking output) per 1M tokens: the qwen-plus / qwen3-max
    ("qwen-plus", 1): (0.4, 1.2, 4.0),  # Singapore rows of the built-in table, by tier
    ("qwen-plus", 2): (1.2, 3.6, 12.0),
    ("qwen3-max", 2): (2.4, 12.0, 12.0),
}
ROWS = [  # model, label, status, prompt, cached, completion, reasoning tokens, tier
    ("qwen-plus", "positive", "ok", 1000, 0, 100, None, 1),
    ("qwen-plus", "negative", "ok", 300_000, 100, 50, None, 2),  # above 256K: tier 2
    ("qwen-plus", "positive", "ok", 100, 0, 1000, 800, 1),  # thinking mode
    ("qwen3-max", "neutral", "ok", 40_000, 0, 10, 0, 2),  # 32K..128K: tier 2
    ("qwen-plus", None, "error", None, None, None, None, 1),  # failed: nothing billed
    ("mystery-model", "positive", "ok", 10, 0, 10, None, 1),  # unpriced
]


def by_hand(row: tuple[Any, ...]) -> float:
    model, _, status, prompt, cached, completion, reasoning, tier = row
    if status != "ok":
        return 0.0
    inp, out, thinking = USD_PER_M[model, tier]
    paid = (prompt - cached) * inp + cached * inp * 0.2
    return (paid + completion * (thinking if reasoning else out)) / 1e6


def write_output(path: Path) -> None:
    columns = list(zip(*ROWS, strict=True))
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(len(ROWS))],
            "model": pa.array(columns[0], pa.string()),
            "label": pa.array(columns[1], pa.string()),
            "status": pa.array(columns[2], pa.string()),
            "prompt_tokens": pa.array(columns[3], pa.int64()),
            "cached_tokens": pa.array(columns[4], pa.int64()),
            "completion_tokens": pa.array(columns[5], pa.int64()),
            "reasoning_tokens": pa.array(columns[6], pa.int64()),
            "reasoning": pa.array(["thought" if r[6] else None for r in ROWS], pa.string()),
            "attempts": pa.array([1] * len(ROWS), pa.int32()),
        }
    )
    pq.write_table(table, path)


def test_cost_matches_a_bill_computed_by_hand(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    write_output(out)
    result = cli("cost", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    lines = {line["key"]: line for line in report["lines"]}
    plus = [r for r in ROWS if r[0] == "qwen-plus"]
    assert lines["qwen-plus"]["cost"] == pytest.approx(sum(by_hand(r) for r in plus))
    assert lines["qwen-plus"]["rows"] == 4
    assert lines["qwen-plus"]["error"] == 1
    assert lines["qwen-plus"]["cached_tokens"] == 100
    assert lines["qwen-plus"]["reasoning_tokens"] == 800
    assert lines["qwen3-max"]["cost"] == pytest.approx(by_hand(ROWS[3]))
    assert lines["mystery-model"]["cost"] is None
    assert report["unpriced"] == ["mystery-model"]
    bill = sum(by_hand(r) for r in ROWS if r[0] != "mystery-model")
    assert report["totals"]["USD"] == pytest.approx(bill)

    table = cli("cost", out)
    assert table.exit_code == 0
    assert "mystery-model" in table.output
    assert "unpriced" in table.output
    assert f"${bill:,.4f}" in table.output

    labels = json.loads(cli("cost", out, "--by", "label", "--json").output)
    positive = [line for line in labels["lines"] if line["key"] == "positive"]
    priced = next(line for line in positive if line["currency"] == "USD")
    assert priced["cost"] == pytest.approx(by_hand(ROWS[0]) + by_hand(ROWS[2]))
    assert any(line["currency"] is None for line in positive)  # the unpriced model's row
    text = cli("cost", out, "--by", "label").output
    positive_row = next(x for x in text.splitlines() if x.startswith("positive"))
    assert positive_row.split()[1] == "3"  # rows: the two qwen-plus rows and the unpriced one
    assert positive_row.endswith(f"${by_hand(ROWS[0]) + by_hand(ROWS[2]):.4f} + 1 rows unpriced")


def test_cost_with_a_price_file_and_a_missing_column(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    write_output(out)
    prices = tmp_path / "p.toml"
    prices.write_text('[models."mystery-model".any]\ntiers = [{ input = 1000, output = 0 }]\n')
    report = json.loads(cli("cost", out, "--prices", prices, "--json").output)
    mystery = next(line for line in report["lines"] if line["key"] == "mystery-model")
    assert mystery["cost"] == pytest.approx(10 * 1000 / 1e6)
    assert report["unpriced"] == []
    missing = cli("cost", out, "--by", "colour")
    assert missing.exit_code == 2
    assert "no column 'colour'" in missing.output


def test_cost_and_status_of_nothing_say_what_to_give(cli: Any, tmp_path: Path) -> None:
    for verb in ("cost", "status"):
        result = cli(verb, tmp_path / "nothing.parquet")
        assert result.exit_code == 2
        assert "no results at" in result.output
        assert "Give the output file, the state folder or the job file" in result.output


# --- a real run: summary, status while running / after kill -9 / finished ------------


@pytest.mark.timeout(150)
def test_status_of_a_running_a_killed_and_a_finished_run(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    n = 600
    sim = simulator(latency_ms=40)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)])
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--concurrency", "4", "--quiet")
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, env=ENV)
    try:
        wait_for_a_flush(out)
        running = cli("status", out)
        assert running.exit_code == 0, running.output
        assert f"running (pid {process.pid})" in running.output
        assert "last flush" in running.output
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    crashed = cli("status", tmp_path / "out.parquet.batchq", "--json")
    s = json.loads(crashed.output)
    flushed = sum(pq.read_metadata(p).num_rows for p in shards(out))
    assert s["state_of_run"] == "stopped"
    assert s["pid"] == process.pid  # named in the lock file, which nobody holds now
    assert s["done"] == flushed
    assert s["remaining"] == n - flushed
    assert s["total_rows"] == n
    text = cli("status", out).output
    assert f"it crashed or was killed (pid {process.pid} died holding the lock)" in text
    assert "Resume with: batchq run --input" in text
    assert "--quiet" in text

    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    summary = done.stdout
    assert f"done: {n:,} rows ({n:,} ok, 0 error)" in summary
    assert "completion (0 reasoning); cost: $" in summary
    finished = json.loads(cli("status", out, "--json").output)
    assert finished["state_of_run"] == "finished"
    assert finished["done"] == finished["ok"] == n
    report = json.loads(cli("cost", out, "--json").output)
    assert finished["costs"]["USD"] == pytest.approx(report["totals"]["USD"])
    assert report["region"] == "intl"
    # The closing summary is summed by the merge as it writes, over the rows of both runs:
    # the same figures `cost` reads back from the file.
    (line,) = report["lines"]
    assert line["rows"] == n
    assert (
        f"tokens billed: {line['prompt_tokens']:,} prompt (0 cached) + "
        f"{line['completion_tokens']:,} completion (0 reasoning); "
        f"cost: {money(report['totals']['USD'], 'USD')}"
    ) in summary


# --- estimate -------------------------------------------------------------------------


def test_estimate_sends_nothing_and_brackets_the_real_cost(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    rows = [{"id": f"r{i}", "text": "a fairly ordinary review " * (i % 7 + 1)} for i in range(200)]
    path = write_jsonl(rows)
    out = tmp_path / "o.parquet"
    flags = [
        "--input",
        path,
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--provider",
        "dashscope-intl",
        "--model",
        "qwen-plus",
        "--template",
        "Review: {text}",
        "--max-tokens",
        "64",
        "--qps",
        "40",
    ]
    estimate = cli("estimate", *flags)
    assert estimate.exit_code == 0, estimate.output
    assert sim.stats.requests == 0
    assert not out.exists()
    assert "200 rows" in estimate.output
    assert "at most 12,800 completion tokens (max_tokens)" in estimate.output
    assert "wall time: about 0 min 06 s at the configured qps limit" in estimate.output
    assert "through the Batch API (50% price)" in estimate.output
    low, high = _dollars(estimate.output.split("cost: ")[1].split(";")[0])

    assert cli("run", *flags, "--quiet", env=ENV).exit_code == 0
    actual = json.loads(cli("cost", out, "--json").output)["totals"]["USD"]
    assert low <= actual <= high

    uncapped = cli("estimate", *flags[:-4], "--qps", "40")
    assert "completion unbounded: 200 rows have no max_tokens" in uncapped.output


def _dollars(text: str) -> tuple[float, float]:
    low, high = text.split(" to ")
    return float(low.strip(" $")), float(high.split()[0].strip("$"))


# --- the log file and the progress lines ----------------------------------------------


def test_log_file_and_plain_progress_lines(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(fail_503=0.2, qps=60, retry_after=0.5, seed=3)
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(300)])
    out = tmp_path / "o.parquet"
    log = tmp_path / "run.log"
    args = command(sim, path, out, "--qps", "150", "--log-file", str(log), "--max-attempts", "12")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = {r["event"] for r in records}
    assert {"run_started", "retry", "flush", "run_finished"} <= kinds
    retries = [r for r in records if r["event"] == "retry"]
    assert {r["http_status"] for r in retries} <= {429, 503}
    assert any(r["http_status"] == 429 and r["retry_after"] == 0.5 for r in retries)
    assert all(r["reason"] and r["row"].startswith("r") for r in retries)
    assert sum(r["rows"] for r in records if r["event"] == "flush") == 300
    # Plain lines on stderr (not a terminal): the start, then rows / rate / cost / ETA.
    assert "300 rows, 300 to send" in done.stderr
    if "rows/s" in done.stderr:  # a line is printed every 5 s; a fast run may finish first
        assert "× 429" in done.stderr
        assert "cost $" in done.stderr
