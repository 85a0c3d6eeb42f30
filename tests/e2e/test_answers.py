"""Answers you can use, through the real CLI against the simulator: labels read leniently,
re-asks among faults, ``invalid`` rows and --retry-invalid, JSON and patterns, and the
[answer] mistakes refused before anything is sent.

The simulator echoes the last user message (``echo: <text>``: a one-word lead-in, which
a label may follow), and answers batchq's re-ask for a label with one of the labels."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchq.simulator.content import completion

LABELS = "positive,negative,neutral"
#: The input text, and the label its echo reads as (None: not valid, asked again).
TEXTS = {
    "positive": "positive",
    "**Negative.** the battery died": "negative",
    "'Neutral'": "neutral",
    "NEGATIVE!\n\nBecause it broke": "negative",
    "positive or negative": None,
    "I cannot tell": None,
    "positively great": None,
    "": None,
}
FAULTS = {"fail_429": 0.05, "fail_503": 0.03, "fail_drop": 0.02, "retry_after": 0.2}


def answer_rows(n: int) -> list[dict[str, Any]]:
    texts = list(TEXTS)
    return [{"id": f"r{i}", "text": texts[i % len(texts)]} for i in range(n)]


def job_file(folder: Path, sim: Any, path: Path, tables: str) -> Path:
    """A job file over ``path`` against ``sim``, with ``tables`` after its [request]."""
    job = folder / "job.toml"
    job.write_text(f"""
input = "{path}"
output = "{folder / "out.parquet"}"
[request]
provider = "custom"
base_url = "{sim.base_url}"
model = "qwen-plus"
template = "{{text}}"
{tables}
""")
    return job


def args(sim: Any, path: Path, out: Path, *extra: str) -> list[str]:
    return [
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
        "{text}",
        "--quiet",
        "--concurrency",
        "16",
        "--max-attempts",
        "10",
        *extra,
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_labels_are_read_leniently_and_the_rest_asked_again_among_faults(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    stream: bool,
) -> None:
    sim = simulator(seed=5, **FAULTS)
    out = tmp_path / "out.parquet"
    n = 240
    extra = ["--param", "stream=true"] if stream else []
    result = cli(*args(sim, write_jsonl(answer_rows(n)), out, "--labels", LABELS, *extra))
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [f"r{i}" for i in range(n)]
    assert set(df["status"]) == {"ok"}
    assert df.columns[:4] == ["id", "text", "status", "answer"]
    for row in df.iter_rows(named=True):
        expected = TEXTS[row["text"]]
        if expected is not None:  # valid at once
            assert (row["answer"], row["reasks"]) == (expected, 0), row
            assert row["response"] == f"echo: {row['text']}"
        else:  # asked again: the simulator complied with a label
            assert row["reasks"] == 1, row
            assert row["answer"] in LABELS.split(",")
            assert row["response"] == row["answer"]
    # Every answer billed adds to its row: a re-asked row's usage is two answers'. The
    # simulator counts a token a word and three a message.
    asked = df.filter(pl.col("reasks") == 1)
    once = df.filter(pl.col("reasks") == 0)
    assert (asked["completion_tokens"] == 1 + asked["text"].str.split(" ").list.len() + 1).all()
    assert (once["completion_tokens"] == 1 + once["text"].str.split(" ").list.len()).all()
    # Requests the server saw: one a row, one more a re-ask, and the retries.
    retried = int(df["attempts"].sum()) - n - int(df["reasks"].sum())
    assert sim.stats.requests == int(df["attempts"].sum())
    assert retried > 0  # the faults were there
    assert int(df["reasks"].sum()) == sum(TEXTS[t] is None for t in df["text"])


def test_answers_still_not_valid_are_invalid_and_retry_invalid_asks_afresh(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(seed=2, **FAULTS)
    out = tmp_path / "out.parquet"
    path = write_jsonl([{"id": i, "text": str(i) if i % 3 else f"number {i}"} for i in range(60)])
    pattern = ["--pattern", r"echo: \d+", "--reasks", "2"]
    result = cli(*args(sim, path, out, *pattern))
    assert result.exit_code == 0, result.output  # every row has a result
    assert "(40 ok, 20 invalid, 0 error)" in result.output
    df = pl.read_parquet(out)
    ok, bad = df.filter(pl.col("status") == "ok"), df.filter(pl.col("status") == "invalid")
    assert ok["answer"].to_list() == [f"echo: {i}" for i in range(60) if i % 3]
    assert bad["id"].to_list() == list(range(0, 60, 3))
    assert set(bad["reasks"]) == {2}
    assert set(bad["error_type"]) == {"invalid_answer"}
    assert bad["answer"].null_count() == 20
    assert all(m.startswith("it does not match the pattern") for m in bad["error_message"])
    assert all(r.startswith("echo: That answer is not valid") for r in bad["response"])
    billed = bad["prompt_tokens"].to_list()
    # --retry-invalid asks those rows afresh; the rest is not sent again.
    before = sim.stats.requests
    result = cli(*args(sim, path, out, *pattern, "--retry-invalid"))
    assert result.exit_code == 0, result.output
    # Three asks a row, and every request counted (not the 20 rows).
    sent = sim.stats.requests - before
    assert sent >= 60
    assert f"(40 ok, 20 invalid, 0 error), {sent:,} requests sent this run" in result.output
    again = pl.read_parquet(out).filter(pl.col("status") == "invalid")
    assert set(again["reasks"]) == {4}
    assert all(a > b for a, b in zip(again["prompt_tokens"], billed, strict=True))
    status = cli("status", str(out))
    assert "20 invalid" in status.output, status.output


def test_json_answers_from_a_schema_file(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    schema = tmp_path / "schema.json"
    stars = {"stars": {"type": "integer", "maximum": 5}}
    schema.write_text(json.dumps({"type": "object", "required": ["stars"], "properties": stars}))
    texts = ['```json\n{"stars": 4, "why": "ok"}\n```', '```json\n{"stars": 9}\n```', "four"]
    path = write_jsonl([{"id": i, "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out.parquet"
    result = cli(*args(sim, path, out, "--json-schema", str(schema), "--reasks", "0"))
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df["status"].to_list() == ["ok", "invalid", "invalid"]
    assert df["answer"].to_list() == ['{"stars":4,"why":"ok"}', None, None]
    assert df["error_message"][1] == (
        "it does not match the schema: at $.stars: 9 is greater than the maximum of 5"
    )
    assert df["error_message"][2].startswith("it is not JSON")


def test_the_answer_table_in_a_job_file(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl([{"id": 1, "text": "正面的评价"}, {"id": 2, "text": "very positive!"}])
    job = job_file(
        tmp_path, sim, path, '[answer]\nlabels = ["very positive", "positive", "正面"]\nreasks = 0'
    )
    result = cli("run", str(job), "--quiet")
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df["answer"].to_list() == ["正面", "very positive"]
    # A changed [answer] is a different job: the answers were checked against the old one.
    job.write_text(job.read_text().replace('"正面"]', '"正面", "负面"]'))
    result = cli("run", str(job), "--quiet")
    assert result.exit_code == 2
    assert (
        'changed: [answer].labels (was ["very positive", "positive", "正面"], now '
        '["very positive", "positive", "正面", "负面"])'
    ) in result.output
    assert "{'labels'" not in result.output  # the job file's words, never a Python repr


BAD = {
    "two kinds": (["--labels", "a,b", "--pattern", "x"], "sets labels (--labels) and pattern"),
    "empty labels": (["--labels", " , "], "is empty or holds an empty label"),
    "bad pattern": (["--pattern", "(unclosed"], "does not compile"),
    "missing schema": (["--json-schema", "nope.json"], "nope.json does not exist"),
    "not a schema": (["--json-schema", "{schema}"], "is not a valid JSON Schema"),
    "reasks alone": (["--reasks", "2"], "needs one of labels, json_schema or pattern"),
    "negative reasks": (["--labels", "a", "--reasks", "-1"], "whole number, 0 or more"),
    "an answer column": (["--labels", "a"], "the input column 'answer' clashes"),
}


@pytest.mark.parametrize(("flags", "message"), BAD.values(), ids=BAD.keys())
def test_answer_mistakes_are_refused_before_anything_is_sent(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    flags: list[str],
    message: str,
) -> None:
    sim = simulator()
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "objekt"}')
    extra = {"answer": "gold"} if message.startswith("the input column") else {}
    path = write_jsonl([{"id": 1, "text": "x", **extra}])
    out = tmp_path / "out.parquet"
    result = cli(*args(sim, path, out, *(f.format(schema=schema) for f in flags)))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert sim.stats.requests == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "schema.json"]


def test_without_an_answer_table_nothing_changes(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = write_jsonl([{"id": 1, "text": "positive or negative", "answer": "gold"}])
    out = tmp_path / "out.parquet"
    assert cli(*args(sim, path, out)).exit_code == 0
    df = pl.read_parquet(out)
    assert "reasks" not in df.columns
    assert "agreement" not in df.columns
    assert df["answer"].to_list() == ["gold"]  # the input's own column
    assert df["status"].to_list() == ["ok"]


def test_batch_api_answers_are_checked_on_import_and_asked_again_live(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(seed=3, **FAULTS)
    n = 80
    path = write_jsonl(answer_rows(n))
    labels = json.dumps(LABELS.split(","))
    job = job_file(tmp_path, sim, path, f"[limits]\nmax_attempts = 10\n[answer]\nlabels = {labels}")
    assert cli("export-batch", job).exit_code == 0
    folder = tmp_path / "out.batch"
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = [
        json.loads(x)
        for f in manifest["files"]
        for x in (folder / f["file"]).read_text().splitlines()
    ]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": x["custom_id"],
                    "response": {"status_code": 200, "body": completion(x["body"], f"b{i}")},
                }
            )
            + "\n"
            for i, x in enumerate(lines)
        )
    )
    bad = sum(TEXTS[r["text"]] is None for r in answer_rows(n))
    imported = cli("import-batch", answers, "--job", job)
    assert imported.exit_code == 0, imported.output
    assert f"imported {n} rows ({n - bad} ok, {bad} invalid, 0 error)" in imported.output
    assert f"{bad} rows have no result in these files or an answer to ask again" in imported.output
    assert sim.stats.requests == 0
    result = cli("run", job, "--quiet")
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert set(df["status"]) == {"ok"}
    again = df.filter(pl.col("reasks") == 1)
    assert again.height == bad == sim.stats.by_status[200]  # one live re-ask a row
    assert set(again["response"]) <= set(LABELS.split(","))
    # The live re-ask carried the batch answer: its prompt is the conversation so far.
    once = df.filter(pl.col("reasks") == 0)
    assert again["prompt_tokens"].min() > once["prompt_tokens"].max()
    assert (once["via"] == "batch").all()


def test_n_choices_vote_through_the_cli(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    sim = simulator(seed=4, **FAULTS)
    out = tmp_path / "out.parquet"
    rows = answer_rows(40)
    result = cli(*args(sim, write_jsonl(rows), out, "--labels", LABELS, "--param", "n=3"))
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert set(df["status"]) == {"ok"}
    assert set(df["agreement"]) == {1.0}  # the simulator's choices all say the same
    assert all(len(c) == 3 for c in df["choices"])
    for row in df.iter_rows(named=True):
        assert row["reasks"] == (TEXTS[row["text"]] is None)
        assert row["answer"] == TEXTS[row["text"]] or row["reasks"] == 1
