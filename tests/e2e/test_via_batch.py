"""``batchq run --via batch`` against the simulator's Batch API: the rows through files and
batches, what a batch did not finish sent live, nothing uploaded or created twice
whatever is killed when, and the remote files deleted after."""

from __future__ import annotations

import json
import os
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

from batchq.simulator.content import MODERATION_MARKER

ENV = {"DASHSCOPE_API_KEY": "sk-simulated"}
ROOT = Path(__file__).resolve().parents[2]


def rows(n: int, *, flagged: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "id": f"r{i}",
            "text": MODERATION_MARKER if i in flagged else f"review {i}",
            "model": "qwen-turbo" if i % 5 == 0 else "qwen-plus",
        }
        for i in range(n)
    ]


def args(sim: Any, source: Path, out: Path, *more: str) -> list[str]:
    return [
        "run",
        "--input",
        str(source),
        "--output",
        str(out),
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--api-key-env",
        "DASHSCOPE_API_KEY",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--via",
        "batch",
        "--poll-s",
        "0.1",
        *more,
    ]


def test_a_run_via_batch_answers_through_files_and_finishes_the_rest_live(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    sim = simulator(
        batch_seconds=0.3,
        batch_fail_lines=0.05,
        fail_503=0.05,
        fail_drop=0.02,
        fail_429=0.05,
        seed=4,
    )
    source = write_jsonl(rows(600, flagged=(7, 300)))
    out = tmp_path / "out.parquet"
    prices.write_text(
        "".join(
            f'[models."{m}".any]\ntiers = [{{ input = 1.0, output = 2.0 }}]\n'
            for m in ("qwen-plus", "qwen-turbo")
        )
    )
    result = cli(*args(sim, source, out, "--concurrency", "8", "--prices", prices), env=ENV)
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert frame["id"].to_list() == [f"r{i}" for i in range(600)]
    refused = frame.filter(pl.col("status") == "error")
    assert refused["id"].to_list() == ["r7", "r300"]  # a 400 in the batch is final
    assert set(refused["error_code"]) == {"data_inspection_failed"}
    ok = frame.filter(pl.col("status") == "ok")
    assert (ok["response"] == "echo: " + ok["id"].str.replace("r", "review ")).all()
    assert ok.filter(pl.col("id") == "r5")["model"].item() == "qwen-turbo"
    live = frame.filter(pl.col("via") == "live")
    # The lines the batch failed with a 500 (5 %) went live, and only they.
    assert 10 <= live.height <= 60, live.height
    assert sim.stats.by_prompt.keys() == {
        f"echo: {t}" for t in live["id"].str.replace("r", "review ")
    }
    batch = sim.simulator.batch
    assert (batch.stats.uploads, batch.stats.creates) == (2, 2)  # one file a model
    assert batch.files == {}  # inputs, outputs and error files deleted on the provider
    assert frame.filter(pl.col("via") == "batch")["attempts"].unique().to_list() == [1]
    # The cost column, at the price file's prices: a batch row at half a live row's
    # price, error rows at nothing, and its sum what `batchq cost` totals.
    live_price = (ok["prompt_tokens"] * 1.0 + ok["completion_tokens"] * 2.0) / 1e6
    share = pl.when(ok["via"] == "batch").then(0.5).otherwise(1.0)
    assert ok.select(pl.col("cost") - live_price * share)["cost"].abs().max() < 1e-12
    assert refused["cost"].to_list() == [0.0, 0.0]
    report = json.loads(cli("cost", out, "--json", "--prices", prices).output)
    assert frame["cost"].sum() == pytest.approx(report["totals"]["USD"])
    assert "-> " in result.output
    assert not out.with_name("out.parquet.batchq").exists()


def test_a_batch_run_writes_the_live_runs_columns(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    """The same two-model job live and via batch: every output column the same, byte for
    byte, but ``via``, ``latency_ms``, ``request_id`` and the Batch API's part of the usage
    (all of it); ``cost`` at the Batch share."""
    sim = simulator(batch_seconds=0.2)
    source = write_jsonl(rows(120, flagged=(9,)))
    prices = tmp_path / "prices.toml"
    prices.write_text(
        "".join(
            f'[models."{m}"]\ntiers = [{{ input = 1.0, output = 2.0 }}]\n'
            for m in ("qwen-plus", "qwen-turbo")
        )
    )
    frames = {}
    for via in ("live", "batch"):
        out = tmp_path / f"{via}.parquet"
        command = args(sim, source, out, "--prices", prices)
        command = command if via == "batch" else [a for a in command if a not in ("--via", "batch")]
        result = cli(*command, env=ENV)
        assert result.exit_code == 0, result.output
        frames[via] = pl.read_parquet(out)
    live, batch = frames["live"], frames["batch"]
    assert (live["via"] == "live").all()
    assert (batch["via"] == "batch").all()
    assert set(batch["model"]) == {"qwen-plus", "qwen-turbo"}
    assert batch["latency_ms"].is_null().all()
    assert batch.filter(pl.col("status") == "ok")["request_id"].is_not_null().all()
    assert (batch["cost"] - live["cost"] * 0.5).abs().max() < 1e-15  # type: ignore[operator]
    assert live.filter(pl.col("status") == "error")["id"].to_list() == ["r9"]
    ok = batch.filter(pl.col("status") == "ok")
    assert ok["batch_prompt_tokens"].equals(ok["prompt_tokens"])
    assert ok["batch_completion_tokens"].equals(ok["completion_tokens"])
    assert live["batch_prompt_tokens"].is_null().all()
    apart = (
        "via",
        "latency_ms",
        "request_id",
        "cost",
        "batch_prompt_tokens",
        "batch_completion_tokens",
    )
    same = [c for c in live.columns if c not in apart]
    assert batch.columns == live.columns
    differ = [c for c in same if not batch[c].equals(live[c])]
    assert differ == [], (batch.select(differ).head(3), live.select(differ).head(3))
    assert batch.schema == live.schema


@pytest.mark.parametrize("step", ["upload", "create", "poll", "download"])
def test_a_kill_at_each_remote_step_resumes_without_doing_it_twice(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    step: str,
) -> None:
    """kill -9 once the provider has done ``step`` but before batchq heard of it (the
    answer stalls), or while it waits; the same command again does nothing twice."""
    stall = step if step != "poll" else None
    sim = simulator(batch_seconds=0.5 if step != "poll" else 3.0, stall=stall, stall_s=60)
    source = write_jsonl(rows(200))
    out = tmp_path / "out.parquet"
    command = [sys.executable, "-m", "batchq", *args(sim, source, out)]
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **ENV}, stdout=DEVNULL, stderr=DEVNULL
    )
    calls = sim.simulator.batch.stats.calls
    deadline = time.monotonic() + 30
    while calls[step] < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert calls[step] >= 1
    result = cli(*args(sim, source, out), env=ENV)
    assert result.exit_code == 0, result.output
    assert (calls["upload"], calls["create"]) == (2, 2)  # two models: two files, no more
    frame = pl.read_parquet(out)
    assert frame.height == 200
    assert (frame["status"] == "ok").all()
    assert (frame["via"] == "batch").all()
    assert sim.stats.requests == 0
    assert sim.simulator.batch.files == {}


def test_no_wait_then_status_a_refused_live_run_and_the_collect(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(batch_seconds=1.0)
    source = write_jsonl(rows(100))
    out = tmp_path / "out.parquet"
    submitted = cli(*args(sim, source, out, "--no-wait"), env=ENV)
    assert submitted.exit_code == 0, submitted.output
    assert "submitted: 2 batches run on the provider (100 rows); collect them" in submitted.output
    assert not out.exists()
    status = cli(
        "batch",
        "status",
        "--input",
        source,
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--json",
        env=ENV,
    )
    assert status.exit_code == 0, status.output
    listed = [json.loads(line) for line in status.output.splitlines()]
    assert {b["model"] for b in listed} == {"qwen-plus", "qwen-turbo"}
    assert all(b["batch_id"].startswith("batch_") and b["counts"]["total"] for b in listed)
    live = [a for a in args(sim, source, out) if a not in ("--via", "batch")]
    refused = cli(*live, env=ENV)
    assert refused.exit_code == 2
    assert "pay for their rows twice" in refused.output
    assert sim.stats.requests == 0
    collected = cli(*args(sim, source, out), env=ENV)
    assert collected.exit_code == 0, collected.output
    assert pl.read_parquet(out).height == 100
    assert sim.simulator.batch.stats.creates == 2


def test_an_expired_batch_keeps_its_half_then_none_leaves_the_rest_pending(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(batch_seconds=0.2, batch_expire=True)
    source = write_jsonl(rows(200))
    out = tmp_path / "out.parquet"
    left = cli(*args(sim, source, out, "--then", "none"), env=ENV)
    assert left.exit_code == 0, left.output
    assert "100 rows stay pending" in left.output
    assert not out.exists()
    again = cli(*args(sim, source, out, "--then", "batch"), env=ENV)  # 3 rounds, each half
    assert again.exit_code == 0, again.output
    frame = pl.read_parquet(out)
    assert (frame["status"] == "ok").all()
    assert frame.height == 200
    counts = dict(frame.group_by("via").len().iter_rows())
    assert counts["batch"] == 100 + 50 + 25 + 12
    assert counts["live"] == 13


def test_a_batch_that_fails_validation_is_said_and_its_rows_go_live(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(batch_invalid=True)
    source = write_jsonl(rows(30))
    out = tmp_path / "out.parquet"
    result = cli(*args(sim, source, out), env=ENV)
    assert result.exit_code == 0, result.output
    assert "failed validation: All requests in a batch file must use the same model" in (
        result.output
    )
    frame = pl.read_parquet(out)
    assert (frame["via"] == "live").all()
    assert (frame["status"] == "ok").all()
    assert sim.simulator.batch.files == {}  # the uploads deleted all the same


def test_a_window_the_provider_does_not_take_is_refused_before_any_upload(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    source = write_jsonl(rows(5))
    out = tmp_path / "out.parquet"
    refused = cli(*args(sim, source, out, "--window", "48h"), env=ENV)
    assert refused.exit_code == 2
    assert "give 24h" in refused.output
    studio = sim.base_url.replace("/v1", "/compatible-mode/v1")
    week = cli(
        *args(sim, source, out, "--window", "7d", "--base-url", studio, "--keep-remote"), env=ENV
    )
    assert week.exit_code == 0, week.output
    kept = sorted(f["purpose"] for f in sim.simulator.batch.files.values())
    assert kept == ["batch", "batch", "batch_output", "batch_output"]  # inputs and outputs
    too_long = cli(
        *args(sim, source, tmp_path / "b.parquet", "--window", "400h", "--base-url", studio),
        env=ENV,
    )
    assert too_long.exit_code == 2
    assert "24h to 336h" in too_long.output
    assert sim.simulator.batch.stats.uploads == 2  # the 7d run's two files alone


def test_cancel_collects_what_the_batches_finished(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(batch_seconds=4.0)
    source = write_jsonl(rows(100))
    out = tmp_path / "out.parquet"
    assert cli(*args(sim, source, out, "--no-wait"), env=ENV).exit_code == 0
    time.sleep(1.0)  # about a quarter done
    job = [
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
    ]
    cancelled = cli("batch", "cancel", *job, env=ENV)
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled 2 batches" in cancelled.output
    assert "rows stay pending" in cancelled.output
    live = cli(*[a for a in args(sim, source, out) if a not in ("--via", "batch")], env=ENV)
    assert live.exit_code == 0, live.output
    frame = pl.read_parquet(out)
    counts = dict(frame.group_by("via").len().iter_rows())
    assert 5 <= counts["batch"] <= 60
    assert counts["batch"] + counts["live"] == 100
    assert sim.simulator.batch.stats.creates == 2


@pytest.mark.anyio
async def test_the_simulators_batch_api_holds_the_providers_rules(
    simulator: Callable[..., Any], tmp_path: Path
) -> None:
    from batchq.batch.remote import Remote
    from batchq.errors import RunStopped

    sim = simulator(batch_seconds=0.05)
    two_models = tmp_path / "two.jsonl"
    two_models.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": m, "messages": [{"role": "user", "content": "hi"}]},
                }
            )
            + "\n"
            for i, m in enumerate(["qwen-plus", "qwen-turbo"])
        )
    )
    async with Remote(sim.base_url, api_key=None) as remote:
        file = await remote.upload(two_models, "batchq-t-r1-001.jsonl")
        assert (await remote.find_file("batchq-t-r1-001.jsonl"))["id"] == file["id"]  # type: ignore[index]
        assert await remote.find_file("another.jsonl") is None
        with pytest.raises(RunStopped, match="completion_window 48h is not valid"):
            await remote.create(file["id"], "48h", {})
        created = await remote.create(file["id"], "24h", {"batchq_run": "t", "batchq_file": "1"})
        assert (await remote.find_batch({"batchq_run": "t"}))["id"] == created["id"]  # type: ignore[index]
        assert await remote.find_batch({"batchq_run": "other"}) is None
        failed = await remote.batch(created["id"])
        assert failed["status"] == "failed"
        assert failed["errors"]["data"][0]["code"] == "model_mismatch"
    studio = sim.base_url.replace("/v1", "/compatible-mode/v1")
    async with Remote(studio, api_key=None) as remote:
        week = await remote.create(file["id"], "336h", {})
        assert week["expires_at"] - week["created_at"] == 336 * 3600


def test_ctrl_c_while_waiting_stops_waiting_not_the_batches(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(batch_seconds=60.0)
    source = write_jsonl(rows(50))
    command = [sys.executable, "-m", "batchq", *args(sim, source, tmp_path / "out.parquet")]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **ENV},
        stdout=DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    calls = sim.simulator.batch.stats.calls
    deadline = time.monotonic() + 30
    while calls["poll"] < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 130, err
    assert "2 batches keep running on the provider (they are not cancelled)" in err
    assert calls["cancel"] == 0
    assert all(b.data["status"] == "in_progress" for b in sim.simulator.batch.batches.values())
