"""``batchq.run`` / ``arun`` / ``run_job`` through the public API only, against the simulator
on loopback: every kind of input in and out, inside a running loop, the cache (resume
after kill -9, a finished call sends nothing), ``cache=False``, errors as exceptions."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

import batchq
from batchq.errors import InputError, Interrupted, RunStopped, UsageError

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FAULTS = {"fail_429": 0.05, "fail_503": 0.03, "fail_drop": 0.02, "fail_malformed": 0.01}


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "batchq"


def frame(n: int) -> pl.DataFrame:
    """Columns of many dtypes, to come back as they went in."""
    return pl.DataFrame(
        {
            "id": list(range(100, 100 + n)),
            "text": [f"review number {i}" for i in range(n)],
            "kind": pl.Series([("a", "b", "c")[i % 3] for i in range(n)], dtype=pl.Categorical),
            "at": [dt.datetime(2026, 1, 1) + dt.timedelta(minutes=i) for i in range(n)],
            "tags": [[i, i + 1] for i in range(n)],
            "meta": [{"stars": i % 5, "source": "web"} for i in range(n)],
        }
    )


def on(sim: Any, **extra: Any) -> dict[str, Any]:
    """Keywords for a call to the simulator as a real endpoint (it counts each request)."""
    return {
        "provider": "custom",
        "base_url": sim.base_url,
        "model": "qwen-plus",
        "template": "Review: {text}",
        "progress": False,
        "max_attempts": 20,
        "timeout_s": 5,
        **extra,
    }


def replies(n: int) -> list[str]:
    return [f"echo: Review: review number {i}" for i in range(n)]


def test_a_polars_frame_comes_back_in_order_with_its_dtypes(
    simulator: Callable[..., Any], cache_home: Path
) -> None:
    sim = simulator(latency_ms=5, seed=1, **FAULTS)
    data = frame(300)
    out = batchq.run(data, **on(sim))
    assert isinstance(out, pl.DataFrame)
    assert out.columns[: data.width] == data.columns
    assert out.select(data.columns).equals(data)  # values and dtypes, in order
    assert out["response"].to_list() == replies(300)
    assert set(out["status"]) == {"ok"}
    assert out.schema["prompt_tokens"] == pl.Int64
    assert sum(sim.stats.by_prompt[r] for r in replies(300)) == out["attempts"].sum()


def test_pandas_keeps_its_index_and_gets_nullable_result_columns(
    simulator: Callable[..., Any], cache_home: Path
) -> None:
    sim = simulator(latency_ms=5)
    data = frame(50).to_pandas()
    data.index = pd.Index([f"k{i}" for i in range(50)], name="key")
    out = batchq.run(data, **on(sim))
    assert isinstance(out, pd.DataFrame)
    assert out.index.equals(data.index)
    assert list(out.columns[: data.shape[1]]) == list(data.columns)
    assert (out.dtypes[: data.shape[1]] == data.dtypes).all()
    assert out["response"].tolist() == replies(50)
    assert isinstance(out["prompt_tokens"].dtype, pd.Int64Dtype)
    assert isinstance(out["response"].dtype, pd.StringDtype)
    assert out["error_code"].isna().all()


def test_pyarrow_tables_and_readers_come_back_as_tables(
    simulator: Callable[..., Any], cache_home: Path
) -> None:
    sim = simulator(latency_ms=5)
    table = frame(40).to_arrow()
    out = batchq.run(table, **on(sim))
    assert isinstance(out, pa.Table)
    assert out.select(table.schema.names).equals(table)
    streamed = batchq.run(
        pa.RecordBatchReader.from_batches(table.schema, table.to_batches(7)), **on(sim)
    )
    assert isinstance(streamed, pa.Table)
    assert streamed.column("response").to_pylist() == replies(40)
    assert streamed.schema.field("at").type == table.schema.field("at").type
    assert streamed.schema.field("tags").type == table.schema.field("tags").type


def test_a_lazy_frame_rows_and_paths_come_back_as_polars(
    simulator: Callable[..., Any], cache_home: Path, tmp_path: Path
) -> None:
    sim = simulator(latency_ms=5)
    data = frame(2000)
    data.write_parquet(tmp_path / "in.parquet")
    lazy = batchq.run(pl.scan_parquet(tmp_path / "in.parquet"), **on(sim, qps=2000))
    assert lazy.select(data.columns).equals(data)
    assert lazy["response"].to_list() == replies(2000)
    rows = [{"question": f"review number {i}", "n": i} for i in range(30)]
    out = batchq.run(rows, **on(sim, template=None, prompt="question"))
    assert out.columns[:2] == ["question", "n"]  # the column named as prompt= keeps its name
    assert out["response"].to_list() == [f"echo: review number {i}" for i in range(30)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "text": "review number {i}"}}\n' for i in range(20)))
    from_file = batchq.run(path, **on(sim))
    assert from_file["id"].to_list() == [f"r{i}" for i in range(20)]
    assert from_file["response"].to_list() == replies(20)


def test_a_finished_call_returns_from_the_cache_sending_nothing(
    simulator: Callable[..., Any], cache_home: Path
) -> None:
    sim = simulator(latency_ms=5)
    data = frame(100)
    first = batchq.run(data, **on(sim))
    sent = sim.stats.requests
    again = batchq.run(data.clone(), **on(sim))
    assert sim.stats.requests == sent
    assert again.equals(first)
    # Another prompt, or the simulator named as a rehearsal, is another call.
    batchq.run(data, **on(sim, system="Be brief."))
    assert sim.stats.requests == 2 * sent
    simulated = batchq.run(
        data, model="qwen-plus", template="Review: {text}", simulate=True, progress=False
    )
    assert simulated["status"].to_list() == ["ok"] * 100
    assert sim.stats.requests == 2 * sent  # the built-in one answered, not this one
    assert len(list(cache_home.glob("*/output.parquet"))) == 3


def test_cache_false_leaves_nothing_and_output_is_the_clis(
    simulator: Callable[..., Any], cache_home: Path, tmp_path: Path
) -> None:
    sim = simulator(latency_ms=5)
    data = frame(30)
    batchq.run(data, **on(sim, cache=False))
    batchq.run(data, **on(sim, cache=False))
    assert sim.stats.requests == 60
    assert not cache_home.exists() or not any(cache_home.glob("*/call.json"))
    out = tmp_path / "labeled.parquet"
    batchq.run(data, **on(sim, output=out))
    assert pl.read_parquet(out)["response"].to_list() == replies(30)
    again = batchq.run(data, **on(sim, output=out))  # complete: nothing sent
    assert sim.stats.requests == 90
    assert again["response"].to_list() == replies(30)


def test_run_works_inside_a_running_event_loop_and_arun_on_it(
    simulator: Callable[..., Any], cache_home: Path
) -> None:
    sim = simulator(latency_ms=5)

    async def notebook_cell() -> tuple[pl.DataFrame, pl.DataFrame]:
        asyncio.get_running_loop()  # as in Jupyter: a loop is running
        inside = batchq.run(frame(20), **on(sim))
        awaited = await batchq.arun(frame(25), **on(sim))
        return inside, awaited

    inside, awaited = asyncio.run(notebook_cell())
    assert inside["response"].to_list() == replies(20)
    assert awaited["response"].to_list() == replies(25)


def test_run_job_is_the_clis_run_as_a_function(tmp_path: Path) -> None:
    out = tmp_path / "quick.parquet"
    job = ROOT / "jobs" / "quickstart.toml"
    summary = batchq.run_job(job, simulate=True, output=str(out), progress=False, qps=1000)
    assert (summary.total, summary.ok, summary.sent) == (300, 300, 300)
    again = batchq.run_job(job, simulate=True, output=str(out), progress=False)
    assert again.already_complete
    assert again.sent == 0


def test_errors_are_exceptions_that_say_where_in_the_frame(
    simulator: Callable[..., Any], cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(latency_ms=5)
    data = frame(10).with_columns(
        pl.when(pl.col("id") == 107).then(None).otherwise(pl.col("text")).alias("text")
    )
    with pytest.raises(InputError) as bad:
        batchq.run(data, **on(sim))
    assert (bad.value.row, bad.value.column, bad.value.path) == (7, "text", None)
    assert str(bad.value).startswith("row index 7, column text: column 'text' is null")
    with pytest.raises(InputError) as bad_rows:
        batchq.run([{"text": "a"}, {"text": "b"}, "c"], **on(sim))
    assert bad_rows.value.row == 2
    with pytest.raises(UsageError, match="unknown keyword 'qpss': did you mean qps"):
        batchq.run(data, **on(sim), qpss=3)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match=r"cannot read a builtins\.int"):
        batchq.run(5, **on(sim))
    with pytest.raises(UsageError, match="LazyFrame's query cannot be written"):
        batchq.run(data.lazy().select(pl.col("nope")), **on(sim))
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    with pytest.raises(UsageError, match="DASHSCOPE_API_KEY is not set"):
        batchq.run(frame(3), model="qwen-plus", template="{text}", progress=False)
    assert sim.stats.requests == 0
    assert not any(cache_home.glob("*/call.json"))  # a refused call leaves no folder
    guarded = simulator(latency_ms=5, api_key="sk-right")
    monkeypatch.setenv("BQ_TEST_KEY", "sk-wrong-key-123")
    with pytest.raises(RunStopped) as stopped:
        batchq.run(frame(5), **on(guarded), api_key_env="BQ_TEST_KEY")
    assert (stopped.value.http_status, stopped.value.exit_code) == (401, 3)
    assert "sk-wrong-key-123" not in str(stopped.value)
    assert not any(
        "sk-wrong" in p.read_text(errors="replace") for p in cache_home.rglob("*") if p.is_file()
    )


def test_a_pydantic_model_as_the_answer_gives_a_struct_column(
    simulator: Callable[..., Any], cache_home: Path
) -> None:
    class Review(pydantic.BaseModel):
        sentiment: str
        stars: int

    sim = simulator(latency_ms=5)
    out = batchq.run(frame(10), **on(sim), answer=Review)
    assert out.schema["answer"] == pl.Struct({"sentiment": pl.String, "stars": pl.Int64})
    assert set(out["status"]) == {"ok"}  # the simulator complies when asked again
    assert out["reasks"].to_list() == [1] * 10
    labels = batchq.run(frame(10), **on(sim), answer=["positive", "negative"])
    assert set(labels["answer"]) <= {"positive", "negative"}


CHILD = """
import asyncio, sys
import polars as pl
import batchq
n = int(sys.argv[2])
data = pl.DataFrame({"id": range(n), "text": [f"review number {i}" for i in range(n)]})
async def cell():  # a notebook's: the loop is running
    try:
        out = batchq.run(data, provider="custom", base_url=sys.argv[1], model="qwen-plus",
                         template="Review: {text}", max_attempts=20, timeout_s=5, qps=150,
                         concurrency=8, progress=False)
    except KeyboardInterrupt as e:
        print("interrupted:", type(e).__name__, flush=True)
        sys.exit(7)
    print("statuses:", sorted(set(out["status"])), "rows:", out.height, flush=True)
asyncio.run(cell())
"""


def flushed_rows(cache_home: Path) -> set[int]:
    shards = sorted(cache_home.glob("*/output.parquet.batchq/shards/[0-9]*.parquet"))
    found: set[int] = set()
    for shard in shards:
        try:
            found |= set(pq.read_table(shard, columns=["_row"])["_row"].to_pylist())
        except (OSError, pa.ArrowInvalid):  # being renamed into place
            continue
    return found


def child(sim: Any, n: int, cache_home: Path, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "cell.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home.parent)}
    return subprocess.Popen(
        [sys.executable, str(script), sim.base_url, str(n)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_flush(cache_home: Path) -> None:
    deadline = time.monotonic() + 40
    while not flushed_rows(cache_home):
        assert time.monotonic() < deadline, "no flush within 40 s"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_killed_call_resumes_through_the_cache_and_then_sends_nothing(
    simulator: Callable[..., Any], cache_home: Path, tmp_path: Path
) -> None:
    n = 600
    sim = simulator(latency_ms=20, seed=4, **FAULTS)
    process = child(sim, n, cache_home, tmp_path)
    wait_for_flush(cache_home)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    time.sleep(0.1)  # the simulator finishes answering what was in flight
    flushed = flushed_rows(cache_home)
    assert 0 < len(flushed) < n, "the kill should land mid-run"
    seen = {i: sim.stats.by_prompt[replies(n)[i]] for i in flushed}
    done = child(sim, n, cache_home, tmp_path)
    stdout, stderr = done.communicate(timeout=60)
    assert done.returncode == 0, stderr
    assert "statuses: ['ok'] rows: 600" in stdout
    for i, count in seen.items():
        assert sim.stats.by_prompt[replies(n)[i]] == count, f"row {i} was flushed, then resent"
    sent = sim.stats.requests
    third = child(sim, n, cache_home, tmp_path)
    stdout, stderr = third.communicate(timeout=60)
    assert third.returncode == 0, stderr
    assert sim.stats.requests == sent


@pytest.mark.timeout(120)
def test_an_interrupt_in_a_notebook_stops_with_the_rows_saved(
    simulator: Callable[..., Any], cache_home: Path, tmp_path: Path
) -> None:
    n = 600
    sim = simulator(latency_ms=50)
    process = child(sim, n, cache_home, tmp_path)
    wait_for_flush(cache_home)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)  # what Jupyter's interrupt sends the kernel
    stdout, stderr = process.communicate(timeout=20)
    assert time.monotonic() - started < 6, "stopped within the 5 s grace"
    assert process.returncode == 7, stderr
    assert "interrupted: Interrupted" in stdout
    assert issubclass(Interrupted, KeyboardInterrupt)
    flushed = flushed_rows(cache_home)
    assert len(flushed) == sim.stats.requests < n  # every answer that came back is saved
    done = child(sim, n, cache_home, tmp_path)
    stdout, stderr = done.communicate(timeout=60)
    assert done.returncode == 0, stderr
    assert sim.stats.requests == n  # the rest, and nothing twice


def test_cache_list_and_clear(cli: Callable[..., Any], cache_home: Path) -> None:
    data = frame(12)
    batchq.run(data, model="qwen-plus", template="Review: {text}", simulate=True, progress=False)
    listed = cli("cache", "list")
    assert listed.exit_code == 0
    assert re.search(
        r"complete 12/12 rows.*qwen-plus @ simulated +a polars DataFrame of 12", listed.output
    )
    kept = cli("cache", "clear", "--older-than", "7d")
    assert "removed 0 cached calls" in kept.output
    bad = cli("cache", "clear", "--older-than", "soon")
    assert bad.exit_code == 2
    assert "give a number and a unit" in bad.output
    cleared = cli("cache", "clear")
    assert "removed 1 cached calls" in cleared.output
    assert "no cached calls" in cli("cache", "list").output


def test_the_readmes_python_examples_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.split("## From Python")[1], re.S)
    assert len(blocks) >= 2
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
