"""One pass over the whole input before anything is sent.

It finds every problem that can be found up front (unreadable file, bad JSON line, a row
that cannot become a request, missing or duplicate ids, a request larger than the TPM
limit, an input column that clashes with an output column) and learns what the output
needs: the row count, the input's columns and their types, and the input's digest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchq.config import Job
from batchq.errors import EmptyInput, InputError, UsageError
from batchq.io.fastcheck import check_columns
from batchq.io.keys import RepeatFinder
from batchq.io.reader import InputBatch, input_format, read_batches
from batchq.io.rules import ROW_COLUMN, check_clash, default_id_column, digest_and_lines
from batchq.io.schema import ColumnKinds
from batchq.send.request import RowProblem, build_body, completion_cap, estimate_tokens, job_body

__all__ = [
    "ROW_COLUMN",
    "InputInfo",
    "completion_cap",
    "exact_preflight",
    "preflight",
    "request_tokens",
    "row_id",
]


@dataclass(frozen=True)
class InputInfo:
    """What the preflight pass learnt about the input."""

    path: Path
    format: str
    total_rows: int
    #: Input columns in order, each with its Arrow type (None: kept as JSON text).
    columns: tuple[tuple[str, pa.DataType | None], ...]
    #: The id column, or None when rows are identified by position (``row``).
    id_column: str | None
    digest: str
    #: What Model Studio's rules changed in the requests (said once at the start of a run).
    notes: tuple[str, ...] = ()


def request_tokens(body: dict[str, Any]) -> int:
    """Tokens one request may use at most: its prompt estimate plus its completion cap."""
    return estimate_tokens(body) + (completion_cap(body) or 0)


def row_id(row: dict[str, Any], id_column: str | None, index: int) -> str:
    """A row's id as text: its id column's value, else its position."""
    return str(index) if id_column is None else str(row[id_column])


def preflight(
    job: Job,
    *,
    observe: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int, bool], None] | None = None,
) -> InputInfo:
    """Check the whole input and the job's settings. Raises InputError / UsageError.
    (The output path is the state folder's to check: ``state.check_output``.)

    An ordinary input is passed by the fast path (``fastcheck.py``, whole columns in
    Arrow); anything else, or anything it is unsure of, gets the exact pass, a loop over
    every row that says what is wrong and where. ``observe`` is called with each row's
    request body (``estimate`` counts them), which takes the exact pass; ``progress``
    with the rows checked so far, and whether by the exact pass, after each batch."""
    _check_settings(job)
    fast = None if progress is None else (lambda rows: progress(rows, False))
    if observe is None and (v := check_columns(job, progress=fast)) is not None:
        fmt = input_format(job.input)
        return InputInfo(job.input, fmt, v.rows, v.columns, v.id_column, v.digest, v.notes)
    exact = None if progress is None else (lambda rows: progress(rows, True))
    return exact_preflight(job, observe=observe, progress=exact)


def exact_preflight(
    job: Job,
    *,
    observe: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> InputInfo:
    """The exact pass over every row (see ``preflight``)."""
    path = job.input
    fmt = input_format(path)
    kinds = ColumnKinds()
    ids = _IdChecker(path)
    id_column = job.id_column
    total = 0
    notes: set[str] = set()
    parquet_schema: pa.Schema | None = None
    for batch in read_batches(path):
        if total == 0:
            first = batch.rows[0]
            batch_lines = "custom_id" in first and isinstance(first.get("body"), dict)
            id_column = id_column or default_id_column(first, batch_lines=batch_lines)
        if batch.arrow is not None:
            parquet_schema = batch.arrow.schema
        else:
            for row in batch.rows:
                kinds.add(row)
        _check_rows(batch, job, id_column, ids, observe, notes)
        total += len(batch.rows)
        if progress is not None:
            progress(total)
    if total == 0:
        raise EmptyInput("the input has no rows: it is empty", path=str(path))
    ids.verify(id_column)
    if parquet_schema is not None:
        columns = tuple((f.name, f.type) for f in parquet_schema)
    else:
        columns = tuple(
            (name, kinds.arrow_type(name, text=name == id_column)) for name in kinds.kinds
        )
    check_clash([name for name, _ in columns], id_column, path, answers=job.answer is not None)
    digest = digest_and_lines(path)[0]
    return InputInfo(path, fmt, total, columns, id_column, digest, tuple(sorted(notes)))


def _check_rows(
    batch: InputBatch,
    job: Job,
    id_column: str | None,
    ids: _IdChecker,
    observe: Callable[[dict[str, Any]], None] | None,
    notes: set[str],
) -> None:
    path = str(job.input)
    tpm = job.limits.tpm
    for i, row in enumerate(batch.rows):
        try:
            body = build_body(row, job.request, notes)
        except RowProblem as e:
            raise InputError(str(e), path=path, column=e.column, **batch.where(i)) from None
        if observe is not None:
            observe(body)
        if tpm and (need := request_tokens(body)) > tpm:
            raise InputError(
                f"this request may use about {need:,} tokens, more than the whole TPM limit "
                f"({tpm:,.0f}), so it could never be sent: raise tpm, lower max_tokens, "
                "or shorten the row",
                path=path,
                **batch.where(i),
            )
        if id_column is not None:
            value = row.get(id_column)
            if value is None:
                raise InputError(
                    f"the id column {id_column!r} is missing or null: every row needs an id "
                    "(or set id_column to another column)",
                    path=path,
                    column=id_column,
                    **batch.where(i),
                )
            ids.add(str(value))


class _IdChecker:
    """Duplicate-id detection in bounded memory (see keys.py): one 8-byte hash a row, then
    an exact second look at just the ids whose hash repeats."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._hashes = RepeatFinder()

    def add(self, value: str) -> None:
        self._hashes.add(hash(value))

    def verify(self, id_column: str | None) -> None:
        if id_column is None:
            return
        repeated = self._hashes.repeated()
        if not repeated:
            return
        seen: dict[str, dict[str, int]] = {}
        for batch in read_batches(self._path):
            for i, row in enumerate(batch.rows):
                value = str(row[id_column])
                if hash(value) not in repeated:
                    continue
                where = batch.where(i)
                if value in seen:
                    raise InputError(
                        f"duplicate id {value!r}: ids must be unique so each row's answer "
                        "can be found again",
                        path=str(self._path),
                        column=id_column,
                        also=seen[value],
                        **where,
                    )
                seen[value] = where


def _check_settings(job: Job) -> None:
    """The job's own request fields, once: a bad value there is the job's (the flag's or
    the job file's), not the first row's. (No model is left to the rows: a model column
    may give it.)"""
    try:
        job_body(job.request)
    except RowProblem as e:
        if e.column == "model":
            return
        where = f"{e.column} = {_setting(job, e.column)!r}" if e.column else "the request"
        raise UsageError(f"{where} (set by a flag or in [request]): {e}") from None


def _setting(job: Job, name: str) -> Any:
    r = job.request
    return r.params.get(name, getattr(r, name, None))
