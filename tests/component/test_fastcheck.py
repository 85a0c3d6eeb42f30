"""The preflight's fast path against the exact pass: it may decline any input, but when it
passes one, the exact pass must accept it and find exactly the same."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchq.config import load_job
from batchq.errors import BatchqError
from batchq.io.fastcheck import check_columns
from batchq.io.preflight import exact_preflight


def lines(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def reviews(n: int = 50, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review {i}", "stars": i % 5, **extra} for i in range(n)]


def batch_lines(n: int, **body: Any) -> bytes:
    """Batch-API lines; each keyword is a body field: a value, a function of the line's
    number, or None to leave it out. ``custom_id`` gives the line's id instead."""

    def value(v: Any, i: int) -> Any:
        return v(i) if callable(v) else v

    fields = {
        "model": "qwen-plus",
        "messages": lambda i: [{"role": "user", "content": f"review {i} 世界"}],
        **body,
    }
    custom = fields.pop("custom_id", lambda i: f"c{i}")
    rows = []
    for i in range(n):
        content = {k: value(v, i) for k, v in fields.items() if v is not None}
        rows.append(
            {
                "custom_id": value(custom, i),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": content,
            }
        )
    return lines(rows)


TEMPLATE = {"template": "Review: {text} ({stars})"}
# name: (file content, job overrides, the fast path must pass it)
CASES: dict[str, tuple[bytes, dict[str, Any], bool]] = {
    "template": (lines(reviews()), TEMPLATE, True),
    "prompt column": (lines([{"prompt": f"p{i}", "n_words": i} for i in range(30)]), {}, True),
    "int ids": (lines([{"id": i, "text": "x", "stars": 1} for i in range(30)]), TEMPLATE, True),
    "nested and null columns": (lines(reviews(meta={"a": [1, 2]}, gone=None)), TEMPLATE, True),
    "date strings": (lines(reviews(day="2024-01-01")), TEMPLATE, True),
    "floats": (lines(reviews(score=1.5)), TEMPLATE, True),
    "system and tpm": (
        lines(reviews()),
        {**TEMPLATE, "system": "Be brief.", "tpm": 10_000, "max_tokens": 20},
        True,
    ),
    "qwen3 note": (lines(reviews()), {**TEMPLATE, "model": "qwen3-32b"}, True),
    "bom": (b"\xef\xbb\xbf" + lines(reviews()), TEMPLATE, True),
    "no trailing newline": (lines(reviews())[:-1], TEMPLATE, True),
    # accepted by the exact pass; the fast path may decline
    "null in a template column": (
        lines([*reviews(3), {"id": "x", "text": None, "stars": 1}]),
        TEMPLATE,
        False,
    ),
    "blank line": (
        lines(reviews(3)) + b"\n" + lines([{"id": "z", "text": "t", "stars": 2}]),
        TEMPLATE,
        False,
    ),
    "row overrides": (lines(reviews(seed=3)), TEMPLATE, True),
    "zero-padded ids, and ids of another form": (
        lines([{"id": x, "text": "t", "stars": 1} for x in ["r-01", "r-1", "r-001", "r-٣", ""]]),
        TEMPLATE,
        True,
    ),
    "per-row numbers": (
        lines(
            [
                {
                    "id": i,
                    "text": "x",
                    "stars": 1,
                    "temperature": i % 3 * 0.5,
                    "max_tokens": 5 + i,
                    "top_p": 1,
                }
                for i in range(30)
            ]
        ),
        {**TEMPLATE, "tpm": 100_000},
        True,
    ),
    "per-row numbers with nulls": (
        lines(
            [
                {"id": i, "text": "x", "stars": 1, "temperature": None if i % 2 else 0.2}
                for i in range(30)
            ]
        ),
        TEMPLATE,
        True,
    ),
    "a per-row model": (lines(reviews(model="qwen-max")), TEMPLATE, False),
    "a per-row bool temperature": (lines(reviews(temperature=True)), TEMPLATE, False),
    "a per-row float max_tokens": (lines(reviews(max_tokens=5.5)), TEMPLATE, False),
    "a per-row max_tokens of 0": (lines(reviews(max_tokens=0)), TEMPLATE, False),
    "a per-row temperature out of range": (
        lines(
            [
                {"id": i, "text": "x", "stars": 1, "temperature": 2.5 if i == 3 else 0.5}
                for i in range(5)
            ]
        ),
        TEMPLATE,
        False,
    ),
    "a per-row max_tokens over the TPM": (
        lines(reviews(3, max_tokens=900)),
        {**TEMPLATE, "tpm": 1000},
        False,
    ),
    "messages": (
        lines(
            [
                {
                    "id": i,
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"hi {i} 世界"},
                    ],
                }
                for i in range(40)
            ]
        ),
        {"system": "Label it.", "tpm": 100_000, "max_tokens": 5},
        True,
    ),
    "messages with an assistant turn without content": (
        lines(
            [
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": None},
                        {"role": "user", "content": "b"},
                    ]
                }
            ]
            * 5
        ),
        {},
        True,
    ),
    "messages with multimodal parts": (
        lines([{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}]),
        {},
        False,
    ),
    # refused by the exact pass: the fast path must decline
    "an empty messages list": (
        lines([{"messages": [{"role": "user", "content": "a"}]}, {"messages": []}]),
        {},
        False,
    ),
    "a message with an unknown role": (
        lines([{"messages": [{"role": "robot", "content": "a"}]}]),
        {},
        False,
    ),
    "a user message without content": (
        lines(
            [
                {"messages": [{"role": "user", "content": "a"}]},
                {"messages": [{"role": "user", "content": None}]},
            ]
        ),
        {},
        False,
    ),
    "batch lines": (batch_lines(40), {"tpm": 100_000, "system": "ignored", **TEMPLATE}, True),
    "batch lines of two models, one a Qwen3 hybrid": (
        batch_lines(30, model=lambda i: "qwen3-32b" if i % 3 else "qwen-max"),
        {"model": None},
        True,
    ),
    "batch lines without a model, the job's": (batch_lines(10, model=None), {}, True),
    "batch lines with numbers": (
        batch_lines(20, max_tokens=lambda i: 5 + i, temperature=lambda i: i % 3 * 0.5),
        {"tpm": 10_000},
        True,
    ),
    "batch lines with int ids": (batch_lines(10, custom_id=lambda i: i), {}, True),
    # the exact pass decides: the fast path may decline
    "batch lines with stream": (batch_lines(5, stream=True), {}, False),
    "batch lines with a null temperature": (
        batch_lines(5, temperature=lambda i: None if i == 2 else 0.5),
        {},
        False,
    ),
    # refused by the exact pass: the fast path must decline
    "batch lines with no model anywhere": (batch_lines(5, model=None), {"model": None}, False),
    "batch lines with an empty model": (
        batch_lines(5, model=lambda i: "" if i else "m"),
        {},
        False,
    ),
    "batch lines with a temperature out of range": (
        batch_lines(5, model="qwen-plus", temperature=lambda i: 2.5 if i == 3 else 0.5),
        {},
        False,
    ),
    "batch lines with a duplicate custom_id": (
        batch_lines(5, custom_id=lambda i: f"c{min(i, 3)}"),
        {},
        False,
    ),
    "batch lines with an unknown role": (
        batch_lines(
            5, messages=lambda i: [{"role": "robot" if i == 4 else "user", "content": "x"}]
        ),
        {},
        False,
    ),
    "batch lines with an empty messages list": (
        batch_lines(5, messages=lambda i: [] if i == 1 else [{"role": "user", "content": "x"}]),
        {},
        False,
    ),
    "batch lines over the TPM": (batch_lines(3, max_tokens=900), {"tpm": 1000}, False),
    "batch lines with a duplicate key in a body": (
        batch_lines(3).replace(b'"model": "qwen-plus"', b'"model": "qwen-plus", "model": "x"', 1),
        {},
        False,
    ),
    "batch lines with a line without a body": (
        batch_lines(3) + lines([{"custom_id": "z", "method": "POST", "url": "/v1/x"}]),
        {},
        False,
    ),
    "mixed int and text": (
        lines([{"id": 1, "text": "a", "stars": 1}, {"id": "b", "text": "c", "stars": "many"}]),
        TEMPLATE,
        False,
    ),
    # refused by the exact pass: the fast path must decline
    "NaN": (lines(reviews(3)).replace(b'"stars": 1', b'"stars": NaN'), TEMPLATE, False),
    "not UTF-8": (lines(reviews(3)).replace(b"review 1", b"review \xff"), TEMPLATE, False),
    "two objects on a line": (lines(reviews(3)).replace(b"}\n{", b"} {", 1), TEMPLATE, False),
    "duplicate ids": (lines([*reviews(5), reviews(5)[2]]), TEMPLATE, False),
    "a duplicate id among ids of another form": (
        lines([*reviews(5), {"id": "x-1", "text": "t", "stars": 1}, reviews(5)[2]]),
        TEMPLATE,
        False,
    ),
    "missing template column": (lines([*reviews(3), {"id": "x", "stars": 1}]), TEMPLATE, False),
    "duplicate key": (b'{"id": "a", "text": "x", "text": "y", "stars": 1}\n', TEMPLATE, False),
    "big integer": (lines(reviews(3, big=2**70)), TEMPLATE, False),
    "clashing column": (lines(reviews(3, status="new")), TEMPLATE, False),
    "row column without id": (lines([{"row": 1, "prompt": "x"}]), {}, False),
    "over the TPM": (lines(reviews(3, text="word " * 3000)), {**TEMPLATE, "tpm": 500}, False),
    "null id": (lines([*reviews(3), {"id": None, "text": "x", "stars": 1}]), TEMPLATE, False),
    "missing id": (lines([*reviews(3), {"text": "x", "stars": 1}]), TEMPLATE, False),
    "empty": (b"", TEMPLATE, False),
    "a list line": (lines([*reviews(3), [1, 2]]), TEMPLATE, False),
    "out of range temperature": (lines(reviews()), {**TEMPLATE, "temperature": 3.0}, False),
    "no model": (lines(reviews()), {**TEMPLATE, "model": None}, False),
}


def job_for(path: Path, overrides: dict[str, Any]) -> Any:
    settings = {
        "input": str(path),
        "output": str(path.with_suffix(".out.parquet")),
        "model": "qwen-plus",
        **overrides,
    }
    if settings["model"] is None:
        del settings["model"]
    return load_job(None, overrides=settings)


def exact_or_error(job: Any) -> Any:
    try:
        return exact_preflight(job)
    except BatchqError as e:
        return e


@pytest.mark.parametrize("name", CASES)
def test_the_fast_path_passes_only_what_the_exact_pass_accepts_alike(
    name: str, tmp_path: Path
) -> None:
    content, overrides, must_pass = CASES[name]
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    job = job_for(path, overrides)
    exact, fast = exact_or_error(job), check_columns(job)
    if must_pass:
        assert fast is not None
    if isinstance(exact, BatchqError):
        assert fast is None, f"the fast path passed input the exact pass refuses: {exact}"
        return
    if fast is not None:
        assert (fast.rows, fast.columns, fast.id_column, fast.digest, fast.notes) == (
            exact.total_rows,
            exact.columns,
            exact.id_column,
            exact.digest,
            exact.notes,
        )


def test_parquet_and_gzip(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": list(range(100)),
            "text": [f"t{i}" for i in range(100)],
            "stars": [i % 5 for i in range(100)],
        }
    )
    parquet = tmp_path / "in.parquet"
    pq.write_table(table, parquet, row_group_size=30)
    job = job_for(parquet, TEMPLATE)
    fast, exact = check_columns(job), exact_preflight(job)
    assert fast is not None
    assert (fast.rows, fast.columns, fast.id_column, fast.digest) == (
        exact.total_rows,
        exact.columns,
        exact.id_column,
        exact.digest,
    )
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(lines(reviews())))
    assert check_columns(job_for(packed, TEMPLATE)) is None  # declined: the exact pass reads it
    assert exact_preflight(job_for(packed, TEMPLATE)).total_rows == 50


@pytest.mark.parametrize("text", [pa.large_string()])
def test_polars_text_types_are_passed(tmp_path: Path, text: pa.DataType) -> None:
    """polars writes large_string (batchq.run stages a polars frame so): the exact pass
    over a million such rows took 2.4 s where this takes 0.25 s."""
    messages = pa.list_(pa.struct([("role", text), ("content", text)]))
    table = pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(60)], text),
            "text": pa.array([f"t{i}" for i in range(60)], text),
            "prompt": pa.array([f"p{i}" for i in range(60)], text),
            "messages": pa.array(
                [[{"role": "user", "content": f"m{i}"}] for i in range(60)], messages
            ),
        }
    )
    for columns, overrides in (
        (["id", "text"], {"template": "Review: {text}"}),
        (["id", "prompt"], {}),
        (["id", "messages"], {}),
    ):
        parquet = tmp_path / f"{columns[1]}.parquet"
        pq.write_table(table.select(columns), parquet)
        job = job_for(parquet, overrides)
        fast, exact = check_columns(job), exact_preflight(job)
        assert fast is not None
        assert (fast.rows, fast.columns, fast.digest) == (
            exact.total_rows,
            exact.columns,
            exact.digest,
        )


@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize(
    "ending", [b"", b"\n", b"\n\n", b"  ", b"\n  \n"], ids=["none", "nl", "two", "sp", "nl-sp"]
)
def test_chunks_cut_at_line_ends_whatever_their_size(
    chunk: int, ending: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks shorter than a line, lines cut at every place, a last line with or without
    its newline: the fast path reads every byte once, for its digest and its rows."""
    from batchq.io import fastcheck

    monkeypatch.setattr(fastcheck, "CHUNK_BYTES", chunk)
    rows = [{"id": f"r{i}", "text": "x" * (i * 37 % 300), "stars": i % 5} for i in range(40)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(lines(rows).rstrip(b"\n") + ending)
    job = job_for(path, TEMPLATE)
    exact, fast = exact_or_error(job), check_columns(job)
    if isinstance(exact, BatchqError):
        assert fast is None
        return
    assert fast is not None or ending in (b"\n\n", b"\n  \n")  # a blank line: may decline
    if fast is not None:
        assert fast.rows == exact.total_rows == 40
        assert fast.digest == exact.digest


@pytest.mark.parametrize(
    "odd",
    [{"id": "x", "text": 1.5, "stars": "many"}, {"id": "x", "text": None, "stars": 1}],
    ids=["the parser fails", "the checks decline"],
)
def test_a_declined_input_stops_the_reading_thread(
    odd: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path gives up at the first thing it cannot decide, found by the parser on
    the thread reading ahead or by the checks on the caller's: that thread stops."""
    import threading

    from batchq.io import fastcheck

    monkeypatch.setattr(fastcheck, "CHUNK_BYTES", 1024)
    path = tmp_path / "in.jsonl"
    path.write_bytes(lines(reviews(200)) + lines([odd]) + lines(reviews(2000)))
    assert check_columns(job_for(path, TEMPLATE)) is None
    assert not [t for t in threading.enumerate() if t.name == "batchq-read-ahead"]
