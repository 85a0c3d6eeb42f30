"""Every request parameter, streaming, tools, n > 1 and Model Studio's rules, through the
real CLI against the simulator, which records the bodies it receives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DASHSCOPE_API_KEY": "sk-simulated"}
TOOLS = [{"type": "function", "function": {
    "name": "label", "description": "Record the label.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]  # fmt: skip


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)]


def run(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchq", "run", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_parameter_reaches_the_server_from_the_job_or_the_row(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator()
    data = rows(20)
    for i, row in enumerate(data):
        row["seed"] = 1000 + i  # a column named after a request field overrides the job
    path = write_jsonl(data)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    job = tmp_path / "job.toml"
    job.write_text(f"""
input = "{path}"
output = "{tmp_path / "out.parquet"}"
[request]
provider = "dashscope-intl"
base_url = "{sim.base_url}"
model = "qwen-plus"
template = "Review: {{text}}"
max_tokens = 50
temperature = 0.3
top_p = 0.9
presence_penalty = 1.5
seed = 7
stop = ["END"]
n = 1
response_format = {{ type = "json_object" }}
enable_search = true
tools = "{tools}"
tool_choice = "auto"
""")
    done = run(job, "--quiet", "--param", "parallel_tool_calls=false")
    assert done.returncode == 0, done.stderr
    assert len(sim.stats.bodies) == 20
    for body in sim.stats.bodies:
        assert body["max_tokens"] == 50
        assert body["temperature"] == 0.3
        assert body["top_p"] == 0.9
        assert body["presence_penalty"] == 1.5
        assert body["stop"] == ["END"]
        assert body["n"] == 1
        assert body["response_format"] == {"type": "json_object"}
        assert body["enable_search"] is True
        assert body["tools"] == TOOLS
        assert body["tool_choice"] == "auto"
        assert body["parallel_tool_calls"] is False
    assert sorted(b["seed"] for b in sim.stats.bodies) == list(range(1000, 1020))
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert set(df["finish_reason"]) == {"tool_calls"}
    assert df["response"].is_null().all()
    calls = [orjson.loads(c) for c in df["tool_calls"]]
    assert [c[0]["function"]["name"] for c in calls] == ["label"] * 20
    assert [orjson.loads(c[0]["function"]["arguments"]) for c in calls] == [
        {"text": f"Review: review number {i}"} for i in range(20)
    ]


def test_streaming_n_choices_and_cut_streams_end_in_the_same_columns(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=20, fail_truncate=0.1, seed=5)
    path = write_jsonl(rows(200))
    out = tmp_path / "out.parquet"
    done = run(
        "--input",
        path,
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--model",
        "m",
        "--template",
        "Review: {text}",
        "--param",
        "stream=true",
        "--param",
        "n=3",
        "--quiet",
        "--max-attempts",
        "10",
    )
    assert done.returncode == 0, done.stderr
    assert all(
        b["stream"] is True and b["stream_options"] == {"include_usage": True}
        for b in sim.stats.bodies
    )
    df = pl.read_parquet(out)
    assert set(df["status"]) == {"ok"}
    assert df["response"].to_list() == [f"echo: Review: review number {i}" for i in range(200)]
    assert df["choices"].to_list()[7] == [
        "echo: Review: review number 7",
        "echo: Review: review number 7 (2)",
        "echo: Review: review number 7 (3)",
    ]
    assert (df["completion_tokens"] == 5 + 6 + 6).all()  # usage from the final chunk
    assert df["ttft_ms"].is_not_null().all()
    assert (df["ttft_ms"] <= df["latency_ms"]).all()
    assert (df["attempts"] > 1).sum() > 5  # cut streams were retried, then assembled whole


def test_qwen3_hybrid_rule_said_once_and_what_happens_without_it(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl(rows(30))
    common = [
        "--input",
        path,
        "--base-url",
        sim.base_url,
        "--model",
        "qwen3-32b",
        "--template",
        "Review: {text}",
    ]
    out = tmp_path / "ms.parquet"
    done = run(*common, "--output", out, "--provider", "dashscope-intl")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("qwen3-32b is a Qwen3 hybrid model called without streaming") == 1
    assert all(b["enable_thinking"] is False for b in sim.stats.bodies)
    assert set(pl.read_parquet(out)["status"]) == {"ok"}

    # A server that is not Model Studio gets what the user wrote; the simulator refuses as
    # Model Studio would, and the refusal is recorded on each row, never retried.
    plain = tmp_path / "plain.parquet"
    assert run(*common, "--output", plain, "--quiet").returncode == 0
    df = pl.read_parquet(plain)
    assert set(df["status"]) == {"error"}
    assert set(df["error_code"]) == {"invalid_parameter_error"}
    assert set(df["attempts"]) == {1}


def test_stream_only_models_are_streamed_with_reasoning_captured(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator()
    out = tmp_path / "out.parquet"
    done = run(
        "--input",
        write_jsonl(rows(10)),
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--provider",
        "dashscope-intl",
        "--model",
        "qwq-plus",
        "--template",
        "{text}",
    )
    assert done.returncode == 0, done.stderr
    assert "qwq-plus answers only streamed" in done.stderr
    assert all(b["stream"] is True for b in sim.stats.bodies)
    df = pl.read_parquet(out)
    assert df["reasoning"].to_list() == [f"thinking about: review number {i}" for i in range(10)]
    assert (df["reasoning_tokens"] == 5).all()
    assert (df["completion_tokens"] == 4 + 5).all()
    assert df["response"].to_list()[3] == "echo: review number 3"


def test_out_of_range_values_are_refused_before_sending(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator()
    data = rows(5)
    data[3]["top_p"] = 1.5
    path = write_jsonl(data)
    done = run(
        "--input",
        path,
        "--output",
        tmp_path / "o.parquet",
        "--base-url",
        sim.base_url,
        "--provider",
        "dashscope",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
    )
    assert done.returncode == 2
    assert "line 4" in done.stderr
    assert "top_p = 1.5 is outside (0, 1], the range Model Studio accepts" in done.stderr
    assert sim.stats.requests == 0


def test_keep_raw_adds_the_responses_as_received(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl(rows(10))
    common = [
        "--input",
        path,
        "--base-url",
        sim.base_url,
        "--model",
        "m",
        "--template",
        "{text}",
        "--quiet",
    ]
    plain, raw, streamed = (tmp_path / f"{n}.parquet" for n in ("plain", "raw", "streamed"))
    assert run(*common, "--output", plain).returncode == 0
    assert "raw" not in pl.read_parquet(plain).columns
    assert run(*common, "--output", raw, "--keep-raw").returncode == 0
    df = pl.read_parquet(raw)
    bodies = [orjson.loads(r) for r in df["raw"]]
    assert [b["id"] for b in bodies] == df["request_id"].to_list()
    assert [b["choices"][0]["message"]["content"] for b in bodies] == df["response"].to_list()
    assert (
        run(*common, "--output", streamed, "--keep-raw", "--param", "stream=true").returncode == 0
    )
    first = pl.read_parquet(streamed)["raw"][0]
    assert first.startswith("data: {")
    assert first.rstrip().endswith("data: [DONE]")
    # An error row keeps the error's body as received.
    failing = simulator(fail_500=1.0)
    errors = tmp_path / "errors.parquet"
    done = run(
        "--input",
        path,
        "--base-url",
        failing.base_url,
        "--model",
        "m",
        "--template",
        "{text}",
        "--quiet",
        "--output",
        errors,
        "--keep-raw",
        "--max-attempts",
        "1",
    )
    assert done.returncode == 0, done.stderr
    df = pl.read_parquet(errors)
    assert set(df["status"]) == {"error"}
    assert all(orjson.loads(r)["error"]["message"] for r in df["raw"])
