"""export-batch -> a provider's Batch API (faked here) -> import-batch -> the same output,
with the rows the provider did not answer finished by a live run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import orjson
import polars as pl
import pytest

from batchq.simulator.content import completion

N = 3000
ENV = {"DASHSCOPE_API_KEY": "sk-simulated"}


def provider(lines: list[dict[str, Any]], rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    """A Batch API: answer each request line; lose 1 %, refuse 1 % (a 400, final), fail
    1 % as a live run would retry (a 500) and expire 1 % (batch_expired)."""
    output, errors = [], []
    failures = [
        (400, "data_inspection_failed", "inappropriate content"),
        (500, "InternalError", "the batch worker failed"),
        (None, "batch_expired", "not run before the completion window ended"),
    ]
    for i, line in enumerate(lines):
        roll = rng.random()
        if roll < 0.01:
            continue
        if roll < 0.04:
            status, code, message = failures[int((roll - 0.01) / 0.01)]
            error = {"code": code, "message": message}
            response = {"status_code": status, "body": {"error": error}} if status else None
            errors.append(
                orjson.dumps(
                    {
                        "id": f"batch_req_{i}",
                        "custom_id": line["custom_id"],
                        "response": response,
                        "error": error,
                    }
                )
            )
            continue
        body = completion(line["body"], f"chatcmpl-batch-{i}")
        output.append(
            orjson.dumps(
                {
                    "id": f"batch_req_{i}",
                    "custom_id": line["custom_id"],
                    "response": {"status_code": 200, "request_id": f"r{i}", "body": body},
                    "error": None,
                }
            )
        )
    return output, errors


@pytest.mark.timeout(150)
def test_export_import_round_trip_then_a_live_run_finishes(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    models = ["qwen-plus", "qwen-flash"]
    path = write_jsonl(
        [{"id": f"r{i}", "text": f"review number {i}", "model": models[i % 2]} for i in range(N)]
    )
    job = tmp_path / "job.toml"
    job.write_text(f"""
input = "{path}"
output = "{tmp_path / "out.parquet"}"
[request]
provider = "dashscope-intl"
base_url = "{sim.base_url}"
template = "Review: {{text}}"
max_tokens = 20
stream = true
""")
    exported = cli("export-batch", job, "--max-lines", "1000")
    assert exported.exit_code == 0, exported.output
    assert f"{N:,} requests in 4 files" in exported.output
    folder = tmp_path / "out.batch"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted((f["model"], f["lines"]) for f in manifest["files"]) == [
        ("qwen-flash", 500),
        ("qwen-flash", 1000),
        ("qwen-plus", 500),
        ("qwen-plus", 1000),
    ]
    lines = []
    for entry in manifest["files"]:
        file_lines = [json.loads(x) for x in (folder / entry["file"]).read_text().splitlines()]
        assert {x["body"]["model"] for x in file_lines} == {entry["model"]}  # one model a file
        assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in file_lines)
        assert all("stream" not in x["body"] for x in file_lines)  # a batch is not streamed
        lines += file_lines
    assert sorted(x["custom_id"] for x in lines) == sorted(f"r{i}" for i in range(N))
    assert sim.stats.requests == 0

    rng = random.Random(11)
    output, errors = provider(lines, rng)
    rng.shuffle(output)
    files = [tmp_path / "errors.jsonl", tmp_path / "out-b.jsonl", tmp_path / "out-a.jsonl"]
    files[0].write_bytes(b"\n".join(errors) + b"\n")
    half = len(output) // 2
    files[1].write_bytes(b"\n".join(output[:half]) + b"\n")
    files[2].write_bytes(b"\n".join(output[half:]) + b"\n")
    final = [e for e in errors if b"data_inspection_failed" in e]
    retryable = len(errors) - len(final)
    lost = N - len(output) - len(final)  # pending after the import: lost, or to retry

    imported = cli("import-batch", *files, "--job", job)
    assert imported.exit_code == 0, imported.output
    assert f"imported {len(output) + len(final):,} rows ({len(output):,} ok" in imported.output
    assert f"{retryable:,} rows failed in the batch as a live run would retry" in imported.output
    assert f"{lost:,} rows have no result in these files" in imported.output
    assert "stay pending" in imported.output
    status = json.loads(cli("status", job, "--json").output)
    assert (status["done"], status["remaining"]) == (N - lost, lost)
    assert status["pid"] is None  # import ended cleanly: not "crashed"
    assert "crashed" not in cli("status", job).output
    cost_after_import = json.loads(cli("cost", job, "--json").output)
    assert cost_after_import["batch_rows"] == N - lost

    live = cli("run", job, "--quiet", env=ENV)
    assert live.exit_code == 0, live.output
    assert sim.stats.requests == lost  # only the rows the batch lost were sent live
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df["id"].to_list() == [f"r{i}" for i in range(N)]
    assert df["model"].to_list() == [models[i % 2] for i in range(N)]
    ok = df.filter(pl.col("status") == "ok")
    assert ok["response"].to_list() == [
        f"echo: Review: review number {i}" for i in range(N) if f"r{i}" in set(ok["id"])
    ]
    refused = df.filter(pl.col("status") == "error")
    assert refused["error_code"].unique().to_list() == ["data_inspection_failed"]
    # a 400 whose body has no error type reads as a live run reads it, not "batch_error"
    assert refused["error_type"].unique().to_list() == ["http_error"]
    assert refused["http_status"].unique().to_list() == [400]
    assert (df["via"] == "live").sum() == lost
    assert (df["via"] == "batch").sum() == N - lost

    # The Batch API half of the bill is at half price: check one batch row by hand.
    report = json.loads(cli("cost", tmp_path / "out.parquet", "--json").output)
    assert report["batch_rows"] == N - lost
    plus = df.filter(
        (pl.col("via") == "batch") & (pl.col("model") == "qwen-plus") & (pl.col("status") == "ok")
    )
    by_hand = (plus["prompt_tokens"].sum() * 0.4 + plus["completion_tokens"].sum() * 1.2) / 2e6
    live_plus = df.filter((pl.col("via") == "live") & (pl.col("model") == "qwen-plus"))
    by_hand += (
        live_plus["prompt_tokens"].sum() * 0.4 + live_plus["completion_tokens"].sum() * 1.2
    ) / 1e6
    line = next(x for x in report["lines"] if x["key"] == "qwen-plus")
    assert line["cost"] == pytest.approx(by_hand)


def test_import_refuses_a_foreign_or_broken_file(
    write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    path = write_jsonl([{"id": f"r{i}", "prompt": "hi"} for i in range(3)])
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{path}"\n[request]\nmodel = "qwen-plus"\n')
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text(
        '{"custom_id": "r1", "response": {"status_code": 200}}\n'
        '{"custom_id": "zz", "response": {"status_code": 200}}\n'
    )
    result = cli("import-batch", stranger, "--job", job)
    assert result.exit_code == 2
    assert f"{stranger}, line 2" in result.output
    assert "custom_id 'zz' is not a row of this job's input" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    result = cli("import-batch", broken, "--job", job)
    assert result.exit_code == 2
    assert "line 1" in result.output
    assert "is it a Batch-API result file?" in result.output
    assert not (tmp_path / "in.batchq.parquet.batchq").exists()


def small_job(tmp_path: Path, write_jsonl: Callable[..., Path], model: str = "qwen-plus") -> Path:
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(20)])
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{path}"\noutput = "{tmp_path / "out.parquet"}"\n[request]\n'
        f'model = "{model}"\ntemplate = "Review: {{text}}"\n'
    )
    return job


def answered(tmp_path: Path, name: str = "results.jsonl", seed: int = 1) -> Path:
    """The provider's output file for every line of the export."""
    folder = tmp_path / "out.batch"
    lines = [
        json.loads(x) for f in sorted(folder.glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    output, _ = provider(lines, random.Random(seed))
    path = tmp_path / name
    path.write_bytes(b"\n".join(output) + b"\n")
    return path


@pytest.mark.parametrize(("key", "new"), [("model", "qwen-max"), ("template", "Label: {text}")])
def test_import_into_a_changed_job_is_refused(
    write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path, key: str, new: str
) -> None:
    job = small_job(tmp_path, write_jsonl)
    assert cli("export-batch", job).exit_code == 0
    results = answered(tmp_path)
    old = {"model": "qwen-plus", "template": "Review: {text}"}[key]
    job.write_text(job.read_text().replace(f'{key} = "{old}"', f'{key} = "{new}"'))
    result = cli("import-batch", results, "--job", job)
    assert result.exit_code == 2, result.output
    assert f'changed: [request].{key} (was "{old}", now "{new}")' in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_import_says_what_came_twice_and_refuses_two_answers_for_one_row(
    write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    job = small_job(tmp_path, write_jsonl)
    assert cli("export-batch", job).exit_code == 0
    results = answered(tmp_path)
    other = tmp_path / "other.jsonl"  # the same rows answered otherwise (another batch)
    first = json.loads(results.read_text().splitlines()[0])
    first["response"]["body"]["choices"][0]["message"]["content"] = "something else"
    other.write_text(json.dumps(first) + "\n")
    result = cli("import-batch", results, other, "--job", job)
    assert result.exit_code == 2, result.output
    assert f"custom_id {first['custom_id']!r} has two different answers" in result.output
    assert f"{other}, line 1" in result.output
    result = cli("import-batch", results, results, "--job", job)
    assert result.exit_code == 0, result.output
    assert f"{results} was given more than once" in result.output


def test_export_is_refused_while_a_run_holds_the_job(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    job = small_job(tmp_path, write_jsonl)
    job.write_text(job.read_text() + f'base_url = "{sim.base_url}"\n')
    args = [sys.executable, "-m", "batchq", "run", str(job), "--qps", "2", "--quiet"]
    process = subprocess.Popen(args, env={**os.environ, **ENV}, stdout=DEVNULL, stderr=DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while sim.stats.requests == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = cli("export-batch", job)
        assert result.exit_code == 2, result.output
        assert f"pid {process.pid}" in result.output
        assert not (tmp_path / "out.batch").exists()
    finally:
        process.kill()
        process.wait()


def test_a_job_given_by_flags_alone_is_named_by_its_exports_manifest(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl([{"id": f"r{i}", "text": f"review number {i}"} for i in range(20)])
    flags = [
        "--input",
        path,
        "--output",
        tmp_path / "out.parquet",
        "--model",
        "qwen-plus",
        "--template",
        "Review: {text}",
        "--base-url",
        sim.base_url,
        "--param",
        "seed=7",
    ]
    exported = cli("export-batch", *flags)
    assert exported.exit_code == 0, exported.output
    manifest = tmp_path / "out.batch" / "manifest.json"
    assert f"--job {manifest}" in exported.output
    results = answered(tmp_path)
    imported = cli("import-batch", results, "--job", manifest)
    assert imported.exit_code == 0, imported.output
    if "stay pending" in imported.output:  # the provider lost some: a live run ends it
        live = cli("run", manifest, "--quiet")
        assert live.exit_code == 0, live.output
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df["id"].to_list() == [f"r{i}" for i in range(20)]
    assert (df["via"] == "batch").sum() + sim.stats.requests == 20
