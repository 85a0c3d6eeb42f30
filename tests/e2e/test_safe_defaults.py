"""The mistakes people make with paths and endpoints: the input is never written over, a
rehearsal's answers are never kept as real ones, a refused run leaves nothing behind, and
each gets a message with exit 2, never a traceback."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_run import rows

T = ["--model", "qwen-plus", "--template", "Review: {text}"]


def run(cli: Any, input_path: Path, output: Path, *extra: str) -> Any:
    return cli("run", "--input", input_path, "--output", output, *T, *extra)


def state_of(output: Path) -> Path:
    return output.with_name(output.name + ".batchq")


@pytest.mark.parametrize("restart", [[], ["--restart"]], ids=["", "--restart"])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_the_input_is_never_the_output(
    cli: Any, write_jsonl: Callable[..., Path], tmp_path: Path, restart: list[str], kind: str
) -> None:
    path = write_jsonl(rows(20))
    if kind == "parquet":
        path = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows(20)), path)
    before = path.read_bytes()
    result = run(cli, path, path, "--simulate", *restart)
    assert result.exit_code == 2, result.output
    assert "is the input file" in result.output
    assert path.read_bytes() == before
    assert not state_of(path).exists()


@pytest.mark.parametrize("restart", [[], ["--restart"]], ids=["", "--restart"])
@pytest.mark.parametrize("kind", ["text", "parquet", "folder", "state folder is a file"])
def test_an_output_that_is_not_a_batchq_output_is_never_written_over(
    cli: Any, write_jsonl: Callable[..., Path], tmp_path: Path, restart: list[str], kind: str
) -> None:
    path = write_jsonl(rows(20))
    output = tmp_path / "out.parquet"
    if kind == "text":
        output.write_text("my notes\n")
    elif kind == "parquet":
        pq.write_table(pa.table({"x": [1, 2]}), output)
    elif kind == "folder":
        output.mkdir()
        (output / "keep.txt").write_text("x")
    else:
        state_of(output).write_text("x")
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run(cli, path, output, "--simulate", *restart)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert any(w in result.output for w in ("not a batchq output", "is a folder", "is a file"))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


@pytest.mark.parametrize("command", ["status", "cost"])
def test_reports_on_a_file_batchq_did_not_write(cli: Any, tmp_path: Path, command: str) -> None:
    for path in (tmp_path / "notes.parquet", tmp_path / "other.parquet"):
        if path.name == "notes.parquet":
            path.write_text("my notes\n")
        else:
            pq.write_table(pa.table({"x": [1, 2]}), path)
        result = cli(command, path)
        assert result.exit_code == 2, result.output
        assert "not a batchq output" in result.output


@pytest.mark.parametrize("stopped", [False, True], ids=["finished", "stopped half-way"])
def test_dropping_simulate_after_a_rehearsal_sends_for_real(
    simulator: Callable[..., Any],
    cli: Any,
    write_jsonl: Callable[..., Path],
    tmp_path: Path,
    stopped: bool,
) -> None:
    # The README: rehearse with --simulate, then drop it. The "real" endpoint here is a
    # second simulator; what matters is that its answers, not the rehearsal's, end up kept.
    real = simulator(latency_ms=1)
    path = write_jsonl(rows(30))
    output = tmp_path / "out.parquet"
    endpoint = ["--provider", "custom", "--base-url", real.base_url]
    keep = ["--keep-state"] if stopped else []
    assert run(cli, path, output, *endpoint, "--simulate", *keep).exit_code == 0
    if stopped:  # a rehearsal's state folder, as a stop half-way leaves it
        output.unlink()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run(cli, path, output, *endpoint)
    assert result.exit_code == 2, result.output
    assert "simulator's answers" in result.output
    assert "--restart" in result.output
    assert real.stats.requests == 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    result = run(cli, path, output, *endpoint, "--restart")
    assert result.exit_code == 0, result.output
    assert real.stats.requests == 30
    assert pl.read_parquet(output)["status"].to_list() == ["ok"] * 30
    # ...and back to the simulator is refused the same way.
    result = run(cli, path, output, *endpoint, "--simulate")
    assert result.exit_code == 2
    assert "real answers" in result.output


def test_another_base_url_is_another_endpoint(
    simulator: Callable[..., Any], cli: Any, write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    first, second = simulator(latency_ms=1), simulator(latency_ms=1)
    path = write_jsonl(rows(10))
    output = tmp_path / "out.parquet"
    assert run(cli, path, output, "--base-url", first.base_url).exit_code == 0
    result = run(cli, path, output, "--base-url", second.base_url)
    assert result.exit_code == 2, result.output
    assert first.base_url in result.output
    assert second.base_url in result.output
    assert second.stats.requests == 0


def test_a_refused_run_leaves_nothing_behind(
    simulator: Callable[..., Any], cli: Any, write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=1)
    path = write_jsonl(rows(10))
    output = tmp_path / "out.parquet"
    result = run(cli, path, output, "--provider", "custom")
    assert result.exit_code == 2, result.output
    assert "needs a base_url" in result.output
    assert not state_of(output).exists()
    # The corrected run, with another model too, is not "a different job".
    result = cli(
        "run",
        "--input",
        path,
        "--output",
        output,
        "--model",
        "qwen-max",
        "--template",
        "{text}",
        "--provider",
        "custom",
        "--base-url",
        sim.base_url,
    )
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(output)["status"].to_list() == ["ok"] * 10


def test_a_damaged_shard_is_named_and_set_aside_and_the_intact_ones_kept(
    simulator: Callable[..., Any], cli: Any, write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=1)
    path = write_jsonl(rows(30))
    output = tmp_path / "out.parquet"
    flags = ["--base-url", sim.base_url]
    assert run(cli, path, output, *flags, "--keep-state").exit_code == 0
    output.unlink()  # as a stopped run leaves it: shards, no output
    (first,) = sorted((state_of(output) / "shards").glob("*.parquet"))
    intact = first.with_name("000002.parquet")
    intact.write_bytes(first.read_bytes())
    first.write_bytes(first.read_bytes()[:100])  # cut short
    result = cli("status", output)
    assert result.exit_code == 2, result.output
    assert f"shard {first} cannot be read" in result.output
    result = cli("run", "--input", path, "--output", output, *T, *flags)
    assert result.exit_code == 0, result.output
    assert f"shard {first} cannot be read" in result.output
    assert sim.stats.requests == 30  # the intact shard's rows were not sent again
    df = pl.read_parquet(output)
    assert df["response"].to_list() == [f"echo: Review: review number {i}" for i in range(30)]


def test_ids_are_kept_exactly_as_text_when_the_input_mixes_kinds(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    ids: list[Any] = [1, "x", 18446744073709551617, 18446744073709551618, "007"]
    path.write_text(
        "".join(json.dumps({"id": i, "text": f"t{n}"}) + "\n" for n, i in enumerate(ids))
    )
    output = tmp_path / "out.parquet"
    result = run(cli, path, output, "--simulate")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(output)["id"].to_list() == [str(i) for i in ids]
    exported = cli("export-batch", "--input", path, "--output", tmp_path / "o2.parquet", *T)
    assert exported.exit_code == 0, exported.output
    (lines,) = [f.read_text().splitlines() for f in (tmp_path / "o2.batch").glob("*.jsonl")]
    assert [json.loads(x)["custom_id"] for x in lines] == [str(i) for i in ids]


def test_a_wrong_endpoint_stops_early_instead_of_burning_every_row(
    simulator: Callable[..., Any], cli: Any, write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(latency_ms=1)
    path = write_jsonl(rows(300))
    no_v1 = sim.base_url.removesuffix("/v1")
    result = run(cli, path, tmp_path / "a.parquet", "--base-url", no_v1, "--quiet")
    assert result.exit_code == 3, result.output
    assert f"{no_v1}/chat/completions" in result.output
    assert "HTTP 404" in result.output
    assert "check the base_url" in result.output
    assert sim.stats.requests < 100  # not 300 rows x their attempts
    assert not (tmp_path / "a.parquet").exists()

    doubled = f"{sim.base_url}/chat/completions"
    result = run(cli, path, tmp_path / "b.parquet", "--base-url", doubled, "--quiet")
    assert result.exit_code == 2, result.output
    assert f"give {sim.base_url} instead" in result.output
    assert not state_of(tmp_path / "b.parquet").exists()

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    result = run(cli, path, tmp_path / "c.parquet", "--base-url", closed, "--quiet")
    assert result.exit_code == 3, result.output
    assert "connection refused" in result.output
    assert "rerun the same command to resume" in result.output
