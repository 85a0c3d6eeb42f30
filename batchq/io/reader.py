"""Stream input rows in batches: JSONL (with line numbers), gzip'd JSONL, or Parquet.

Nothing is loaded whole: memory stays flat in the row count.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchq.errors import InputError

__all__ = ["InputBatch", "input_format", "read_batches"]

BOM = b"\xef\xbb\xbf"
_INT64 = 2.0**63


@dataclass(slots=True)
class InputBatch:
    """Rows ``start .. start + len(rows)`` of the input, in order.

    ``lines`` holds each row's 1-based line number (JSONL); ``arrow`` the batch as read
    (Parquet), so its columns reach the output with their types unchanged.
    """

    start: int
    rows: list[dict[str, Any]]
    lines: list[int] | None = None
    arrow: pa.RecordBatch | None = None

    def where(self, i: int) -> dict[str, Any]:
        """Keyword arguments for InputError saying where row ``i`` of the batch is."""
        return {"line": self.lines[i]} if self.lines is not None else {"row": self.start + i}


def input_format(path: Path) -> str:
    """``"jsonl"`` or ``"parquet"`` by the file's name; UsageError-worthy InputError else."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json", ".json.gz")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise InputError(
        "unknown input format: name the file .jsonl, .jsonl.gz or .parquet", path=str(path)
    )


def read_batches(path: Path, *, batch_size: int = 4096) -> Iterator[InputBatch]:
    """Yield the input in order, ``batch_size`` rows at a time.

    Raises InputError with the file and line for an unreadable file or a bad JSON line.
    """
    if input_format(path) == "parquet":
        yield from _parquet_batches(path, batch_size)
    else:
        yield from _jsonl_batches(path, batch_size)


def _open(path: Path) -> IO[bytes]:
    try:
        if path.name.lower().endswith(".gz"):
            return cast(IO[bytes], gzip.open(path, "rb"))
        return path.open("rb")
    except FileNotFoundError:
        raise InputError("the input file does not exist: check the path", path=str(path)) from None
    except OSError as e:
        raise InputError(f"the input file cannot be read: {e.strerror}", path=str(path)) from None


def _jsonl_batches(path: Path, batch_size: int) -> Iterator[InputBatch]:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    start = 0
    with _open(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM) :]
                if not raw.strip():
                    continue
                rows.append(_parse_line(raw, path, number))
                lines.append(number)
                if len(rows) == batch_size:
                    yield InputBatch(start, rows, lines)
                    start += len(rows)
                    rows, lines = [], []
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            raise InputError(f"the file cannot be read: {e}", path=str(path)) from None
    if rows:
        yield InputBatch(start, rows, lines)


def _parse_line(raw: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
        if (
            isinstance(value, dict)
            and float in map(type, value.values())  # rare, and quick to rule out
            and any(type(v) is float and not -_INT64 < v < _INT64 for v in value.values())
        ):  # orjson reads an integer past 64 bits as a float: two ids would become one
            value = json.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InputError(
            f"not valid JSON ({e.msg}, column {e.colno}): each line must be one JSON object",
            path=str(path),
            line=number,
        ) from None
    if not isinstance(value, dict):
        raise InputError(
            f"a JSON {type(value).__name__} where an object was expected: "
            'each line must be one object, like {"id": 1, "prompt": "..."}',
            path=str(path),
            line=number,
        )
    return value


def _parquet_batches(path: Path, batch_size: int) -> Iterator[InputBatch]:
    try:
        file = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError("the input file does not exist: check the path", path=str(path)) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"not a readable Parquet file ({e})", path=str(path)) from None
    start = 0
    with file:
        for batch in file.iter_batches(batch_size=batch_size):
            yield InputBatch(start, batch.to_pylist(), arrow=batch)
            start += batch.num_rows
