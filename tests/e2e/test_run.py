"""The real CLI against the simulator on a real loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchq.simulator import SimConfig
from batchq.simulator.server import MODERATION_MARKER

ROOT = Path(__file__).resolve().parents[2]


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review number {i}", "stars": i % 5} for i in range(n)]


def run_args(sim: Any, input_path: Path, output: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--base-url",
        sim.base_url,
        "--model",
        "qwen-plus",
        "--template",
        "Review: {text}",
        "--quiet",
        *extra,
    ]


def test_every_row_gets_its_own_answer_in_input_order(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(latency_ms=5)
    path = write_jsonl(rows(500))
    out = tmp_path / "out.parquet"
    result = cli(*run_args(sim, path, out, "--concurrency", "50", "--system", "Label it."))
    assert result.exit_code == 0, result.output
    assert "done: 500 rows (500 ok, 0 error)" in result.output
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(500)]
    assert df["stars"].to_list() == [i % 5 for i in range(500)]
    assert df["response"].to_list() == [f"echo: Review: review number {i}" for i in range(500)]
    assert set(df["status"]) == {"ok"}
    assert set(df["finish_reason"]) == {"stop"}
    assert set(df["model"]) == {"qwen-plus"}
    assert df["prompt_tokens"].to_list() == [3 + 2 + 3 + 4] * 500  # system 2 words, user 4
    assert (df["completion_tokens"] == 5).all()
    assert (df["total_tokens"] == df["prompt_tokens"] + df["completion_tokens"]).all()
    assert df["request_id"].n_unique() == 500
    assert (df["attempts"] == 1).all()
    assert sim.stats.requests == 500
    assert not (tmp_path / "out.parquet.batchq").exists()
    # Free text keeps no min / max in the metadata (it would be held to the merge's end).
    group = pq.read_metadata(out).row_group(0)
    with_stats = {
        group.column(i).path_in_schema
        for i in range(group.num_columns)
        if group.column(i).is_stats_set
    }
    assert {"stars", "status", "prompt_tokens", "latency_ms"} <= with_stats
    assert not {"id", "text", "response", "request_id", "error_message"} & with_stats


def test_long_rows_make_smaller_row_groups(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    # The merge holds one row group at a time: short rows go 16,384 to a row group, rows
    # of ~12 KB (a 6 KB document and its echo) as many as fit in about 8 MB.
    sim = simulator()
    short, long = tmp_path / "short.parquet", tmp_path / "long.parquet"
    assert cli(*run_args(sim, write_jsonl(rows(1500)), short)).exit_code == 0
    document = "word " * 1200
    path = write_jsonl([{"id": f"r{i}", "text": f"{i} {document}"} for i in range(1500)])
    assert cli(*run_args(sim, path, long)).exit_code == 0
    assert pq.read_metadata(short).num_row_groups == 1
    meta = pq.read_metadata(long)
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    assert len(groups) == 3
    assert {g.num_rows for g in groups[:-1]} == {groups[0].num_rows}
    assert all(6 << 20 < g.total_byte_size <= 8 << 20 for g in groups[:-1]), groups
    df = pl.read_parquet(long)
    assert df["response"].to_list() == [f"echo: Review: {i} {document}" for i in range(1500)]


def test_parquet_input_keeps_its_columns_and_types(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = tmp_path / "in.parquet"
    table = pa.table(
        {
            "id": list(range(300)),
            "text": [f"t{i}" for i in range(300)],
            "score": [i / 2 for i in range(300)],
        }
    )
    pq.write_table(table, path, row_group_size=64)
    out = tmp_path / "out.parquet"
    assert cli(*run_args(sim, path, out)).exit_code == 0
    df = pl.read_parquet(out)
    assert df.schema["id"] == pl.Int64
    assert df.schema["score"] == pl.Float64
    assert df["id"].to_list() == list(range(300))
    assert df["response"].to_list() == [f"echo: Review: t{i}" for i in range(300)]


def test_max_tokens_truncates_with_finish_reason_length(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl([{"prompt": "one two three four five six"}, {"prompt": "hi"}])
    out = tmp_path / "o.parquet"
    result = cli(
        "run",
        "--input",
        path,
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--model",
        "m",
        "--max-tokens",
        "3",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df["row"].to_list() == [0, 1]
    assert df["finish_reason"].to_list() == ["length", "stop"]
    assert df["response"].to_list() == ["echo: one two", "echo: hi"]
    assert df["completion_tokens"].to_list() == [3, 2]


def test_injected_503s_and_500s_are_retried_to_success(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(fail_503=0.2, fail_500=0.1, seed=3)
    path = write_jsonl(rows(300))
    out = tmp_path / "o.parquet"
    result = cli(*run_args(sim, path, out, "--max-attempts", "12"))
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert set(df["status"]) == {"ok"}
    assert df["response"].to_list() == [f"echo: Review: review number {i}" for i in range(300)]
    assert df["attempts"].sum() == sim.stats.requests
    assert sim.stats.by_status[503] > 0
    assert sim.stats.requests == 300 + sim.stats.by_status[503] + sim.stats.by_status[500]


def test_server_rate_limit_429s_are_retried(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(qps=100, retry_after=0.2)
    path = write_jsonl(rows(150))
    out = tmp_path / "o.parquet"
    result = cli(*run_args(sim, path, out, "--max-attempts", "20"))
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert set(df["status"]) == {"ok"}
    assert sim.stats.by_status[429] > 0  # no client limit was set, so the server pushed back
    assert df["attempts"].sum() == sim.stats.requests


def test_a_refused_row_is_recorded_and_the_run_goes_on(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    data = rows(20)
    data[7]["text"] = f"bad {MODERATION_MARKER} words"
    out = tmp_path / "o.parquet"
    result = cli(*run_args(sim, write_jsonl(data), out))
    assert result.exit_code == 0, result.output
    assert "(19 ok, 1 error)" in result.output
    df = pl.read_parquet(out)
    bad = df.row(7, named=True)
    assert (bad["status"], bad["http_status"], bad["error_code"], bad["attempts"]) == (
        "error",
        400,
        "data_inspection_failed",
        1,
    )
    assert bad["response"] is None
    assert sim.stats.requests == 20


def test_auth_failure_stops_with_exit_3_and_never_shows_the_key(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(api_key="the-right-key")
    out = tmp_path / "o.parquet"
    key = "sk-WRONGKEY0123456789"
    result = cli(
        *run_args(sim, write_jsonl(rows(50)), out, "--api-key-env", "MY_KEY"), env={"MY_KEY": key}
    )
    assert result.exit_code == 3
    assert "HTTP 401" in result.output
    assert "rerun" in result.output
    assert key not in result.output
    assert not out.exists()
    for file in (tmp_path / "o.parquet.batchq").rglob("*"):
        if file.is_file():
            assert key.encode() not in file.read_bytes()


def test_right_key_is_sent(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(api_key="the-right-key")
    out = tmp_path / "o.parquet"
    result = cli(
        *run_args(sim, write_jsonl(rows(5)), out, "--api-key-env", "MY_KEY"),
        env={"MY_KEY": "the-right-key"},
    )
    assert result.exit_code == 0, result.output


def test_missing_key_variable_is_exit_2(
    write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    result = cli(
        "run",
        "--input",
        write_jsonl(rows(2)),
        "--model",
        "m",
        "--template",
        "{text}",
        "--api-key-env",
        "BATCHQ_TEST_UNSET_KEY",
    )
    assert result.exit_code == 2
    assert "BATCHQ_TEST_UNSET_KEY is not set" in result.output


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"\n', "line 2: not valid JSON"),
        ('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "line 2, column id: duplicate id"),
        ('{"id": 1, "text": "a"}\n{"id": 2, "body": "b"}\n', "line 2, column text: the template"),
    ],
)
def test_bad_input_sends_nothing_and_exits_2(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path, lines: str, words: str
) -> None:
    sim = simulator()
    path = tmp_path / "in.jsonl"
    path.write_text(lines)
    result = cli(*run_args(sim, path, tmp_path / "o.parquet"))
    assert result.exit_code == 2
    assert f"error: {path}, {words}" in result.output
    assert sim.stats.requests == 0
    assert not (tmp_path / "o.parquet.batchq").exists()


def test_a_completed_job_sends_nothing_when_rerun(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    args = run_args(sim, write_jsonl(rows(30)), tmp_path / "o.parquet")
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 0
    assert "complete already (30 ok, 0 error); nothing sent" in again.output
    assert sim.stats.requests == 30


def test_retry_errors_resends_only_the_failed_rows(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    flaky = simulator(fail_503=0.4, seed=1)
    path = write_jsonl(rows(100))
    out = tmp_path / "o.parquet"
    first = cli(*run_args(flaky, path, out, "--max-attempts", "1"))
    assert first.exit_code == 0
    failed = pl.read_parquet(out).filter(pl.col("status") == "error")["id"].to_list()
    assert 10 < len(failed) < 90

    # The same endpoint, healthy now (another one would be refused: answers of two
    # endpoints are never mixed in one output).
    flaky.simulator.config = SimConfig()
    sent_before = flaky.stats.requests
    second = cli(*run_args(flaky, path, out, "--retry-errors"))
    assert second.exit_code == 0, second.output
    assert flaky.stats.requests - sent_before == len(failed)
    df = pl.read_parquet(out)
    assert set(df["status"]) == {"ok"}
    assert df["id"].to_list() == [f"r{i}" for i in range(100)]
    retried = df.filter(pl.col("id").is_in(failed))
    assert set(retried["attempts"]) == {2}
    assert not (tmp_path / "o.parquet.batchq").exists()


def test_a_completed_output_is_not_silently_reused_for_a_changed_job(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl(rows(10))
    out = tmp_path / "o.parquet"
    assert cli(*run_args(sim, path, out)).exit_code == 0
    changed = cli(*run_args(sim, path, out, "--model", "qwen-max"))
    assert changed.exit_code == 2
    assert '[request].model (was "qwen-plus", now "qwen-max")' in changed.output
    assert "--restart" in changed.output
    restarted = cli(*run_args(sim, path, out, "--model", "qwen-max", "--restart"))
    assert restarted.exit_code == 0
    assert set(pl.read_parquet(out)["model"]) == {"qwen-max"}
    assert sim.stats.requests == 20


def test_quickstart_through_the_installed_command(tmp_path: Path) -> None:
    out = tmp_path / "quickstart.parquet"
    command = [
        sys.executable,
        "-m",
        "batchq",
        "run",
        "jobs/quickstart.toml",
        "--simulate",
        "--output",
        str(out),
        "--qps",
        "1000",
    ]
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "done: 300 rows (300 ok, 0 error), 300 requests sent this run" in done.stdout
    df = pl.read_parquet(out)
    assert df.height == 300
    assert df["response"][0].startswith("echo: Review of ")
