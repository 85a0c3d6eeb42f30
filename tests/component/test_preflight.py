"""Bad input is found before anything is sent, with the file, line and column."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchq.config import load_job
from batchq.errors import InputError
from batchq.io.preflight import preflight


def job_for(path: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    settings = {"input": str(path), "model": "m", "output": str(path.parent / "o.parquet")}
    return load_job(None, overrides=settings | overrides)


def test_a_good_file_is_described(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(
        [
            {"id": 1, "prompt": "a", "score": 1},
            {"id": 2, "prompt": "b", "score": 2.5, "meta": {"k": 1}},
        ]
    )
    info = preflight(job_for(path))
    assert info.total_rows == 2
    assert info.id_column == "id"
    assert dict(info.columns) == {
        "id": pa.int64(),
        "prompt": pa.string(),
        "score": pa.float64(),
        "meta": None,
    }


def test_bom_at_the_start_and_blank_lines_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\n{"prompt": "b"}\n')
    info = preflight(job_for(path))
    assert (info.total_rows, info.id_column) == (2, None)


def test_gzip_input(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert preflight(job_for(path)).total_rows == 2


LINES_OK = '{"id": 1, "prompt": "a"}\n'


@pytest.mark.parametrize(
    ("content", "overrides", "line", "column", "words"),
    [
        (LINES_OK + '{"id": 2, "prompt": "b"\n', {}, 2, None, "not valid JSON"),
        (LINES_OK + "[1, 2]\n", {}, 2, None, "a JSON list where an object"),
        (LINES_OK + '"text"\n', {}, 2, None, "a JSON str where an object"),
        (LINES_OK + '{"id": 2, "text": "b"}\n', {}, 2, "messages", "no messages"),
        (
            LINES_OK + '{"id": 2, "messages": [{"role": "bot", "content": "x"}]}\n',
            {},
            2,
            "messages",
            "unknown role",
        ),
        (LINES_OK + '{"id": 2, "messages": {"role": "user"}}\n', {}, 2, "messages", "list"),
        (LINES_OK + '{"id": 1, "prompt": "b"}\n', {}, 2, "id", "duplicate id '1'"),
        (LINES_OK + '{"id": null, "prompt": "b"}\n', {}, 2, "id", "missing or null"),
        (
            LINES_OK + '{"id": 2, "txt": "b"}\n',
            {"template": "{text}"},
            1,
            "text",
            "template names column 'text'",
        ),
        (
            '{"prompt": "' + "word " * 3000 + '"}\n',
            {"tpm": 1000},
            1,
            None,
            "more than the whole TPM",
        ),
        ('{"prompt": "a", "status": "x"}\n', {}, None, "status", "clashes with the output"),
        ('{"prompt": "a", "row": 3}\n', {}, None, "row", "no id column"),
        (
            LINES_OK + b'{"id": 2, "prompt": "\xff"}\n'.decode("latin-1"),
            {},
            2,
            None,
            "not valid JSON",
        ),
    ],
)
def test_bad_rows(
    tmp_path: Path,
    content: str,
    overrides: dict[str, Any],
    line: int | None,
    column: str | None,
    words: str,
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content.encode("latin-1" if "\xff" in content else "utf-8"))
    with pytest.raises(InputError, match=words) as caught:
        preflight(job_for(path, **overrides))
    assert (caught.value.path, caught.value.line, caught.value.column) == (str(path), line, column)
    assert str(path) in str(caught.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match="no rows"):
        preflight(job_for(path))


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        preflight(job_for(tmp_path / "nope.jsonl"))
    (tmp_path / "in.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown input format"):
        preflight(job_for(tmp_path / "in.csv"))


def test_a_parquet_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    path.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(InputError, match="not a readable Parquet file"):
        preflight(job_for(path))


def test_parquet_rows_are_reported_by_row_number(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"]}), path)
    with pytest.raises(InputError, match="duplicate id 'a'") as caught:
        preflight(job_for(path))
    assert (caught.value.row, caught.value.line) == (2, None)
