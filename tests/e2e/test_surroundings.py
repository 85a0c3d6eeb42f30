"""When the process itself is in trouble: a reader that went away, a full disk, a
rehearsal's batches, empty inputs. Every case ends with the data intact, nothing paid
twice, no temporary file left, a clear message and the documented exit code."""

from __future__ import annotations

import os
import random
import re
import resource
import shlex
import shutil
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from batchq.batch.flow import BatchPlan
from batchq.config import Job, load_job, simulated
from batchq.engine.runner import RunOptions, RunSummary, run_job

ROOT = Path(__file__).resolve().parents[2]


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)]


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
        *extra,
    ]


@pytest.mark.timeout(120)
def test_a_pipe_closed_after_the_first_line_does_not_stop_the_run(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    """``batchq run … 2>&1 | head -1``: progress, warnings and the summary lose their
    reader; the run goes on to its end, its output whole, and exits 0."""
    sim = simulator(latency_ms=20, fail_503=0.05, fail_429=0.05)
    path = write_jsonl(rows(300))
    out = tmp_path / "out.parquet"
    # The log file beside the pipe goes on being written.
    extra = ["--qps", "40", "--max-attempts", "20", "--log-file", str(tmp_path / "run.log")]
    process = subprocess.Popen(
        command(sim, path, out, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.strip(), "the run printed nothing"
    process.stdout.close()  # `head -1` read its line and went away
    assert process.wait(timeout=100) == 0
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(300)]
    assert set(df["status"]) == {"ok"}
    assert sim.stats.requests >= 300
    assert '"event":"run_finished"' in (tmp_path / "run.log").read_text()


# --- a full disk ---------------------------------------------------------------------------


def long_rows(n: int) -> list[dict[str, Any]]:
    """Rows of 3,000 random letters: Parquet's compression cannot shrink them much, so
    the output's size (input plus answers) is known to about a tenth."""
    rng = random.Random(7)
    return [
        {"id": f"r{i}", "text": "".join(rng.choices(string.ascii_letters, k=3000))}
        for i in range(n)
    ]


def on_a_small_disk(tmp_path: Path, steps: str, mb: int) -> dict[str, str]:
    """Run the shell ``steps`` with ``$DISK`` a tmpfs of ``mb`` MB, mounted in a mount
    namespace of their own (no root needed where user namespaces are allowed); skip the
    test where it cannot be mounted. Returns what the steps wrote into ``$KEEP``, which
    outlives the disk: file name -> text."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small disk")
    disk, keep = tmp_path / "disk", tmp_path / "keep"
    disk.mkdir()
    keep.mkdir()
    script = f'mount -t tmpfs -o size={mb}m tmpfs "$DISK" || exit 97\n{steps}'
    env = {**os.environ, "DISK": str(disk), "KEEP": str(keep), "PY": sys.executable}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    if done.returncode == 97 or "unshare failed" in done.stderr:
        pytest.skip(f"cannot mount a small disk here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_text() for p in keep.iterdir() if p.suffix != ".parquet"}


def run_line(sim: Any, path: Path, out: str, *extra: str) -> str:
    return " ".join(shlex.quote(a) for a in command(sim, path, Path(out), *extra)).replace(
        shlex.quote(out), f'"{out}"'
    )


@pytest.mark.timeout(240)
def test_a_disk_too_full_for_the_merge_stops_with_exit_3_and_no_temp_file(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    """The shards fit, the merged output does not: exit 3 with how much room to make,
    no temp file left filling the disk, the state kept; with room, a rerun merges and
    sends nothing."""
    sim = simulator(latency_ms=5)
    path = write_jsonl(long_rows(1500))  # 4.5 MB of input, 4.5 MB of answers
    run = run_line(sim, path, "$DISK/out.parquet")
    kept = on_a_small_disk(
        tmp_path,
        mb=8,
        steps=f"""
{run} > "$KEEP/first" 2>&1; echo $? > "$KEEP/first.rc"
find "$DISK" -type f > "$KEEP/files"
mount -o remount,size=40m tmpfs "$DISK"
{run} > "$KEEP/second" 2>&1; echo $? > "$KEEP/second.rc"
find "$DISK" -type f > "$KEEP/files.after"
cp "$DISK/out.parquet" "$KEEP/out.parquet"
""",
    )
    assert kept["first.rc"].strip() == "3", kept["first"]
    said = re.search(
        r"no space left on (\S+): free ([\d,]+) MB and rerun the same command "
        r"to merge",
        kept["first"],
    )
    assert said, kept["first"]
    assert said[1] == str(tmp_path / "disk")
    assert 1 <= int(said[2].replace(",", "")) <= 12  # about 9 MB, less what was free
    assert "Traceback" not in kept["first"]
    files = kept["files"].split()
    assert not [f for f in files if "/.tmp-" in f], files
    assert [f for f in files if "/shards/" in f]  # the state is kept
    assert kept["second.rc"].strip() == "0", kept["second"]
    assert "0 requests sent" in kept["second"], kept["second"]
    assert not [f for f in kept["files.after"].split() if ".tmp-" in f or ".batchq" in f]
    df = pl.read_parquet(tmp_path / "keep" / "out.parquet")
    assert df["id"].to_list() == [f"r{i}" for i in range(1500)]
    assert set(df["status"]) == {"ok"}
    assert sim.stats.requests == 1500  # nothing paid twice


@pytest.mark.timeout(240)
def test_a_disk_that_fills_while_sending_leaves_no_temp_shard(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    """Shards fill the disk: exit 3, the temp shard removed, what was flushed kept; with
    room, a rerun sends only what was not flushed."""
    sim = simulator(latency_ms=5, fail_503=0.05, fail_429=0.05, fail_drop=0.02)
    path = write_jsonl(long_rows(1500))
    # A shard a second of 300 rows is about 1 MB: two or three fit.
    run = run_line(sim, path, "$DISK/out.parquet", "--max-attempts", "20", "--qps", "300")
    kept = on_a_small_disk(
        tmp_path,
        mb=3,
        steps=f"""
{run} > "$KEEP/first" 2>&1; echo $? > "$KEEP/first.rc"
find "$DISK" -type f > "$KEEP/files"
"$PY" -c "import sys, pyarrow.parquet as pq; print(' '.join(str(r) for p in sys.argv[1:] \
  for r in pq.read_table(p, columns=['_row'])['_row'].to_pylist()))" \
  "$DISK"/out.parquet.batchq/shards/0*.parquet > "$KEEP/flushed"
mount -o remount,size=40m tmpfs "$DISK"
{run} > "$KEEP/second" 2>&1; echo $? > "$KEEP/second.rc"
cp "$DISK/out.parquet" "$KEEP/out.parquet"
""",
    )
    assert kept["first.rc"].strip() == "3", kept["first"]
    assert f"no space left on {tmp_path / 'disk'}" in kept["first"], kept["first"]
    assert "Traceback" not in kept["first"]
    assert not [f for f in kept["files"].split() if "/.tmp-" in f], kept["files"]
    flushed = {int(r) for r in kept["flushed"].split()}
    assert flushed
    assert kept["second.rc"].strip() == "0", kept["second"]
    df = pl.read_parquet(tmp_path / "keep" / "out.parquet")
    assert df["id"].to_list() == [f"r{i}" for i in range(1500)]
    assert set(df["status"]) == {"ok"}
    billed = Counter(line.reply for line in sim.simulator.ledger.lines if line.prompt_tokens)
    texts = long_rows(1500)
    assert all(billed[f"echo: Review: {texts[i]['text']}"] == 1 for i in flushed)


@pytest.mark.timeout(120)
def test_an_output_that_cannot_be_written_stops_with_exit_3_and_no_temp_file(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    """The same clean-up where no disk can be mounted: a file-size limit (RLIMIT_FSIZE)
    that the shards fit under and the merged output does not fails the merge's write."""
    sim = simulator(latency_ms=5)
    path = write_jsonl(long_rows(1500))
    out = tmp_path / "out" / "out.parquet"
    args = command(sim, path, out, "--qps", "300")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))

    first = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=100, preexec_fn=limit_file_size
    )
    assert first.returncode == 3, first.stderr
    assert f"cannot write the output {out}: File too large" in first.stderr, first.stderr
    assert "rerun the same command to merge" in first.stderr
    assert "Traceback" not in first.stderr
    left = [p.name for p in out.parent.rglob("*") if p.name.startswith(".tmp-")]
    assert not left
    assert not out.exists()
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert second.returncode == 0, second.stderr
    assert "0 requests sent" in second.stdout
    assert pl.read_parquet(out)["id"].to_list() == [f"r{i}" for i in range(1500)]
    assert sim.stats.requests == 1500


# --- a rehearsal's batches, and batches the provider forgot ---------------------------------

NO_KEY = {"DASHSCOPE_API_KEY": None}


def job_flags(path: Path, out: Path) -> list[str]:
    return [
        "--input",
        str(path),
        "--output",
        str(out),
        "--model",
        "qwen-plus",
        "--template",
        "Review: {text}",
    ]


def leave_batches_running(job: Job, sim: Any) -> RunSummary:
    """A rehearsal stopped while its batches run: its journal is left as a rehearsal's,
    with the batches open (the engine's --no-wait, which the CLI refuses)."""
    options = RunOptions(batch=BatchPlan(wait=False, poll_s=0.1))
    return anyio.run(lambda: run_job(simulated(job, sim.base_url), api_key=None, options=options))


def test_a_rehearsal_never_leaves_batches_it_cannot_collect(
    write_jsonl: Callable[..., Path], cli: Callable[..., Any], tmp_path: Path
) -> None:
    path = write_jsonl(rows(50))
    out = tmp_path / "out.parquet"
    refused = cli(
        "run", *job_flags(path, out), "--simulate", "--via", "batch", "--no-wait", env=NO_KEY
    )
    assert refused.exit_code == 2, refused.output
    assert "drop --no-wait" in refused.output
    assert not (tmp_path / "out.parquet.batchq").exists()  # nothing uploaded, nothing kept


def test_a_rehearsals_batches_left_open_are_forgotten_never_looked_up(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A rehearsal stopped while its batches ran (its simulator gone with it): `batch
    status` and `cancel` take --simulate and the run's flags, never ask a real host, and
    the next rehearsal forgets them and sends their rows."""
    sim = simulator(batch_seconds=30.0)
    path = write_jsonl(rows(60))
    out = tmp_path / "out.parquet"
    job = load_job(
        None,
        overrides={
            "input": str(path),
            "output": str(out),
            "model": "qwen-plus",
            "template": "Review: {text}",
        },
    )
    left = leave_batches_running(job, sim)
    assert left.running_batches == 1
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."qwen-plus".any]\ntiers = [{ input = 1.0, output = 2.0 }]\n')
    flags = [*job_flags(path, out), "--prices", str(prices)]
    for simulate in (["--simulate"], []):  # with a key set, still no real host is asked
        status = cli("batch", "status", *flags, *simulate, env={"DASHSCOPE_API_KEY": "sk-x"})
        assert status.exit_code == 0, status.output
        assert "gone with the rehearsal's simulator" in status.output
        assert "collected so far: 0 rows" in status.output
    cancelled = cli("batch", "cancel", *flags, "--simulate", env=NO_KEY)
    assert cancelled.exit_code == 0, cancelled.output
    assert "forgot 1 batches" in cancelled.output
    assert "60 rows stay pending" in cancelled.output
    again = cli("run", *flags, "--simulate", "--via", "batch", "--poll-s", "0.1", env=NO_KEY)
    assert again.exit_code == 0, again.output
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(60)]
    assert set(df["status"]) == {"ok"}


def test_a_restarted_rehearsal_over_gone_batches_is_not_refused(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """The same without `batch cancel`: a live rehearsal, or --restart, is not refused
    for batches that went with an earlier rehearsal's simulator; it says it forgot them."""
    sim = simulator(batch_seconds=30.0)
    path = write_jsonl(rows(40))
    out = tmp_path / "out.parquet"
    job = load_job(
        None,
        overrides={
            "input": str(path),
            "output": str(out),
            "model": "qwen-plus",
            "template": "Review: {text}",
        },
    )
    leave_batches_running(job, sim)
    live = cli("run", *job_flags(path, out), "--simulate", env=NO_KEY)
    assert live.exit_code == 0, live.output
    assert "1 batches of an earlier rehearsal (--simulate) went with its simulator" in live.output
    assert pl.read_parquet(out).height == 40


def test_batches_the_provider_no_longer_knows_are_forgotten_with_one_command(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    sim = simulator(batch_seconds=30.0)
    path = write_jsonl(rows(80))
    out = tmp_path / "out.parquet"
    env = {"DASHSCOPE_API_KEY": "sk-simulated"}
    flags = [
        *job_flags(path, out),
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--api-key-env",
        "DASHSCOPE_API_KEY",
    ]
    run = ["run", *flags, "--via", "batch", "--poll-s", "0.1"]
    assert cli(*run, "--no-wait", env=env).exit_code == 0
    kept = cli("batch", "forget", *flags, env=env)  # the provider still runs it: kept
    assert kept.exit_code == 0, kept.output
    assert "is in_progress on the provider: kept" in kept.output or "is validating" in kept.output
    assert "forgot no batch" in kept.output
    sim.simulator.batch.batches.clear()  # the provider forgot it (a purge, an expiry)
    stuck = cli(*run, env=env)
    assert stuck.exit_code == 3, stuck.output
    assert "no longer knows batch" in stuck.output
    assert "batchq batch forget" in stuck.output
    status = cli("batch", "status", *flags, env=env)
    assert "unknown to the provider" in status.output, status.output
    forgot = cli("batch", "forget", *flags, env=env)
    assert forgot.exit_code == 0, forgot.output
    assert "forgot 1 batches" in forgot.output
    assert "80 rows are pending" in forgot.output
    done = cli("run", *flags, env=env)  # live now: a batch would take its 30 s
    assert done.exit_code == 0, done.output
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(80)]
    assert set(df["status"]) == {"ok"}


# --- messages a person reads ---------------------------------------------------------------


def test_after_a_budget_stop_status_suggests_a_cap_that_lets_the_rest_finish(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    """--max-cost counts what earlier runs spent, so resuming with the same cap stops at
    once: `status` suggests one that covers the rest, and that command finishes."""
    sim = simulator(latency_ms=20, fail_503=0.05, fail_429=0.05, seed=3)
    # Short answers (about 8 tokens) under max_tokens 50: the budget reserves each request
    # in flight at 50, so a cap of spent + the mean alone would stop near the end.
    path = write_jsonl([{"id": f"r{i}", "text": f"review {i} of a good pan"} for i in range(300)])
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."qwen-plus"]\ntiers = [{ input = 0.0, output = 1000.0 }]\n')
    out = tmp_path / "out.parquet"
    run = command(
        sim,
        path,
        out,
        "--max-tokens",
        "50",
        "--concurrency",
        "16",
        "--prices",
        str(prices),
        "--max-attempts",
        "20",
        "--max-cost",
        "0.5",
    )
    env = {**os.environ, "DASHSCOPE_API_KEY": "sk-simulated"}
    stopped = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=100, env=env)
    assert stopped.returncode == 3, stopped.stderr
    status = subprocess.run(
        [sys.executable, "-m", "batchq", "status", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    said = re.search(r"Resume with: (.+)\n  \((.+)\)", status.stdout)
    assert said, status.stdout
    suggested = shlex.split(said[1])
    cap = float(suggested[suggested.index("--max-cost") + 1])
    assert cap > 0.5
    assert "the same cap would stop again at once" in said[2]
    resumed = subprocess.run(
        [sys.executable, "-m", "batchq", *suggested[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(300)]
    assert set(df["status"]) == {"ok"}
    assert df["cost"].sum() <= cap
    assert cap <= 2.5 * df["cost"].sum()  # enough, not a blank cheque


# --- empty and edge inputs -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["polars", "pandas", "arrow", "lazy", "rows"])
def test_an_empty_frame_gives_back_an_empty_frame_with_the_output_columns(kind: str) -> None:
    import batchq

    def data(n: int) -> Any:
        frame = pl.DataFrame(
            {"id": [f"r{i}" for i in range(n)], "text": [f"t{i}" for i in range(n)]},
            schema={"id": pl.String, "text": pl.String},
        )
        return {
            "polars": frame,
            "pandas": frame.to_pandas(),
            "arrow": frame.to_arrow(),
            "lazy": frame.lazy(),
            "rows": frame.to_dicts(),
        }[kind]

    kw = {
        "model": "qwen-plus",
        "template": "{text}",
        "simulate": True,
        "progress": False,
        "answer": ["positive", "negative"],
    }
    one, none = batchq.run(data(1), **kw), batchq.run(data(0), **kw)
    assert len(none) == 0
    if kind == "pandas":
        assert list(none.columns) == list(one.columns)
        assert list(none.dtypes) == list(one.dtypes)
    elif kind == "arrow":
        assert none.schema == one.schema
    elif kind == "rows":  # no input columns to keep: the results'
        assert set(none.columns) <= set(one.columns)
        assert "status" in none.columns
    else:
        assert none.schema == one.schema


def test_a_sample_as_large_as_the_input_asks_first_and_a_rehearsed_one_sends_nothing(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    sim = simulator()
    path = write_jsonl(rows(100))
    out = tmp_path / "out.parquet"
    flags = [*job_flags(path, out), "--base-url", sim.base_url, "--provider", "custom"]
    env = {"DASHSCOPE_API_KEY": "sk-simulated", "OPENAI_API_KEY": "sk-simulated"}
    asked = cli("estimate", *flags, "--sample", "500", env=env)
    assert asked.exit_code == 2, asked.output
    assert "--sample 500 is the whole input (100 rows)" in asked.output
    assert "give --yes" in asked.output
    assert sim.stats.requests == 0
    rehearsed = cli("estimate", *job_flags(path, out), "--sample", "500", "--simulate", env=NO_KEY)
    assert rehearsed.exit_code == 0, rehearsed.output
    assert "100 sampled on the built-in simulator (nothing sent, nothing kept)" in rehearsed.output
    assert not (tmp_path / "out.parquet.batchq").exists()
    assert not out.exists()
    sent = cli("estimate", *flags, "--sample", "500", "--yes", env=env)
    assert sent.exit_code == 0, sent.output
    assert sim.stats.requests == 100
