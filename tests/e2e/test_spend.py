"""Spend control through the real CLI against the simulator: a hard budget counted with
every request in flight at its worst case, and the cost column."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import polars as pl
import pytest

ENV = {"DASHSCOPE_API_KEY": "sk-simulated"}
ROOT = Path(__file__).resolve().parents[2]
#: 50 output tokens at $1,000 per 1M: $0.05 a request, the prompt free.
PRICES = '[models."qwen-plus"]\ntiers = [{ input = 0.0, output = 1000.0 }]\n'


def test_a_budget_counts_each_request_in_flight_at_its_worst_case(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    # Answers as long as max_tokens allows (the simulator cuts the echo at 50 words), so a
    # request costs its worst case: 64 of them in flight at once would spend $3.20.
    sim = simulator(latency_ms=300, fail_503=0.1, fail_429=0.05, seed=2)
    words = " ".join(f"w{i}" for i in range(80))
    source = write_jsonl([{"id": f"r{i}", "text": f"{i} {words}"} for i in range(200)])
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    out = tmp_path / "out.parquet"
    flags = [
        "run",
        "--input",
        source,
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--max-tokens",
        "50",
        "--concurrency",
        "64",
        "--prices",
        prices,
    ]
    stopped = cli(*flags, "--max-cost", "1.02", env=ENV)
    assert stopped.exit_code == 3, stopped.output
    assert "$1.0000 billed so far, of --max-cost $1.0200" in stopped.output
    assert "rerun with a higher --max-cost to go on" in stopped.output
    answered = sim.stats.by_status[200]
    assert answered == 20  # the server's own count: 20 x $0.05 <= $1.02, never 21
    resumed = cli(*flags, "--max-cost", "2.04", env=ENV)
    assert resumed.exit_code == 3, resumed.output
    assert "budget: $1.0000 of $2.0400 spent so far" in resumed.output
    assert sim.stats.by_status[200] == 40
    status = json.loads(cli("status", out, "--prices", prices, "--json").output)
    assert status["ok"] == 40
    finished = cli(*flags, "--max-cost", "100", env=ENV)
    assert finished.exit_code == 0, finished.output
    frame = pl.read_parquet(out)
    assert frame["cost"].sum() == pytest.approx(sim.stats.by_status[200] * 0.05)
    assert sim.stats.by_status[200] == 200


def test_a_budget_on_an_unpriced_model_is_refused_before_sending(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y", "model": "my-llama"}]
    source = write_jsonl(rows)
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    refused = cli(
        "run",
        "--input",
        source,
        "--output",
        tmp_path / "o.parquet",
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--max-cost",
        "1",
        "--prices",
        prices,
        env=ENV,
    )
    assert refused.exit_code == 2, refused.output
    assert "'my-llama' has none in the price table" in refused.output
    assert sim.stats.requests == 0
    assert not (tmp_path / "o.parquet.batchq").exists()


def test_dedupe_sends_each_distinct_request_once_across_a_kill(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(latency_ms=40, fail_503=0.05, fail_drop=0.02, fail_429=0.03, seed=5)
    rows = [{"id": f"r{i}", "text": f"review {i % 150}"} for i in range(1500)]
    rows[7]["system_note"] = "a column the template does not use: the body is the same"
    source = write_jsonl(rows)
    out = tmp_path / "out.parquet"
    command = [
        sys.executable,
        "-m",
        "batchq",
        "run",
        "--input",
        str(source),
        "--output",
        str(out),
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--dedupe",
        "--concurrency",
        "8",
        "--qps",
        "100",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=DEVNULL, stderr=DEVNULL)
    shards = out.with_name("out.parquet.batchq") / "shards"
    deadline = time.monotonic() + 30
    while not any(shards.glob("[0-9]*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = sum(sim.stats.by_prompt.values())
    assert 0 < len(sim.stats.by_prompt) < 150  # killed half-way
    resumed = cli(*command[3:], env=ENV)
    assert resumed.exit_code == 0, resumed.output
    frame = pl.read_parquet(out)
    assert (frame["status"] == "ok").all()
    assert frame["response"].to_list() == [f"echo: review {i % 150}" for i in range(1500)]
    assert sim.stats.by_prompt.keys() == {f"echo: review {i}" for i in range(150)}
    copies = frame.filter(pl.col("via") == "dedupe")
    assert copies.height == 1350
    assert copies["attempts"].unique().to_list() == [0]
    assert copies["cost"].drop_nulls().unique().to_list() in ([], [0.0])
    answered_ok = sim.stats.by_status[200]
    assert 150 <= answered_ok <= 150 + 8  # at most the 8 in flight at the kill answered twice
    assert before <= sum(sim.stats.by_prompt.values())


@pytest.mark.parametrize("shape", ["short", "long", "mixed", "label"])
def test_a_sampled_estimate_is_within_15_percent_of_the_real_cost(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    shape: str,
) -> None:
    import random

    rng = random.Random(shape)
    length = {
        "short": lambda: rng.randint(1, 4),
        "long": lambda: rng.randint(60, 90),
        "mixed": lambda: int(rng.paretovariate(1.5) * 5),
        "label": lambda: int(rng.paretovariate(1.5) * 5),
    }[shape]
    rows = [{"id": f"r{i}", "text": " ".join(["word"] * length())} for i in range(600)]
    source = write_jsonl(rows)
    sim = simulator(fail_503=0.05, fail_429=0.03, seed=3)
    out = tmp_path / "out.parquet"
    job = [
        "--input",
        source,
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--provider",
        "dashscope-intl",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
    ]
    if shape == "label":  # answers of one length (cut at 2 words), prompts of any
        job += ["--max-tokens", "2"]
    estimated = cli("estimate", *job, "--sample", "40", env=ENV)
    assert estimated.exit_code == 0, estimated.output
    assert "40 sampled, sent for real" in estimated.output
    figure = re.search(
        r"cost: about \$([\d.]+) \(95 %: \$([\d.]+) to \$([\d.]+)\)", estimated.output
    )
    assert figure is not None, estimated.output
    sampled_200s = sim.stats.by_status[200]
    assert sampled_200s == 40
    ran = cli("run", *job, env=ENV)
    assert ran.exit_code == 0, ran.output
    assert sim.stats.by_status[200] == 600  # the sample's rows were not paid for again
    real = pl.read_parquet(out)["cost"].sum()
    assert abs(float(figure.group(1)) - real) / real < 0.15, (figure.group(0), real)
