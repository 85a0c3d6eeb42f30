"""The preflight's fast path: check an ordinary input in Arrow's C++, whole columns at
a time, so a million-row job starts sending in well under a second. This module reads
the input and decides; the checks of a batch's columns are ``column_checks.py``'s.

It answers the question the exact pass (``preflight.py``, a Python loop over every row)
answers, for the inputs where whole-column checks decide it: rows that take their text
from a template over plain columns, from a string ``prompt`` column, or from a
``messages`` column of ``{role, content}`` text messages; with per-row request fields
only where they are numbers (``temperature``, ``top_p``, ``max_tokens``, ``seed`` ...);
and Batch-API lines whose body holds text ``messages``, a ``model`` and such numbers
(their body's columns are checked as a row's would be). It never reports a problem:
whenever it sees one, or anything it cannot decide for sure (a null, a mixed column, a
NaN, bytes that are not UTF-8, a line holding two objects, a request near the TPM
limit, an id hash seen twice ...), it returns None and the exact pass runs, which says
what and where. When it returns an InputInfo, it is the one the exact pass would return
(tests/component/test_fastcheck.py holds both to that on a catalogue of inputs).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from pathlib import Path
from typing import NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from batchq.config import Job
from batchq.errors import InputError
from batchq.io.column_checks import Checks, LineChecks, Unsure, fixed_chars, unknown_rules
from batchq.io.reader import input_format
from batchq.io.rules import Digest, check_clash, default_id_column, digest_and_lines
from batchq.send.request import (
    RowProblem,
    completion_cap,
    job_body,
)

__all__ = ["ColumnsChecked", "check_columns"]

CHUNK_BYTES = 4 * 1024**2  # read and parsed at a time (2.5x as fast as 1 MB chunks)
BLOCK_BYTES = 1024**2  # Arrow's block: each is parsed by one thread


class ColumnsChecked(NamedTuple):
    """What the exact pass would have found."""

    rows: int
    columns: tuple[tuple[str, pa.DataType | None], ...]
    id_column: str | None
    digest: str
    notes: tuple[str, ...]


def check_columns(
    job: Job, *, progress: Callable[[int], None] | None = None
) -> ColumnsChecked | None:
    """What the exact pass would find for ``job``'s input, or None when it must decide.
    ``progress`` is called with the rows read so far, after each batch."""
    try:
        return _check_columns(job, progress)
    except (Unsure, pa.ArrowException, OSError, ValueError):
        return None


def _check_columns(job: Job, progress: Callable[[int], None] | None) -> ColumnsChecked:
    if unknown := unknown_rules():
        raise Unsure(f"request rules the fast path does not apply: {sorted(unknown)}")
    path = job.input
    fmt = input_format(path)
    if fmt == "jsonl" and path.name.lower().endswith(".gz"):
        raise Unsure("gzip")
    read = Digest()
    # closed on the way out, early or not: the thread reading ahead stops
    with closing(_ahead(_jsonl(path, read) if fmt == "jsonl" else _parquet(path))) as batches:
        first = next(batches, None)
        if first is None or first.num_rows == 0:
            raise Unsure("no rows")
        schema = first.schema
        batch_lines = {"custom_id", "body"} <= set(schema.names)
        try:
            base, note = job_body(job.request)
        except RowProblem as e:
            # Batch-API bodies may each name their model (LineChecks checks them); the cap
            # (the job's fields with the rules applied) matters only under a TPM limit.
            if not (batch_lines and e.column == "model" and not job.limits.tpm):
                raise Unsure("the job itself has a problem") from None
            base, note = {}, None
        cap = completion_cap(base) or 0
        id_column = job.id_column or default_id_column(schema.names, batch_lines=batch_lines)
        if batch_lines:
            check: Checks = LineChecks(job, schema, id_column, cap=cap)
        else:
            check = Checks(job, schema, id_column, fixed_chars=fixed_chars(job), cap=cap)
        rows = 0
        for batch in _chain(first, batches):
            if batch.schema != schema:
                raise Unsure("the schema changed")
            check.batch(batch)
            rows += batch.num_rows
            if progress is not None:
                progress(rows)
    check.ids_unique()
    notes: tuple[str, ...] = (note,) if note else ()
    if isinstance(check, LineChecks):
        notes = tuple(sorted(check.notes))  # the bodies' own
    digest, lines = read.result() if fmt == "jsonl" else digest_and_lines(path)
    if fmt == "jsonl":
        if lines != rows:
            raise Unsure("a blank line, or two objects on a line")
        columns = tuple((f.name, _output_type(f.type)) for f in schema)
    else:
        columns = tuple((f.name, f.type) for f in schema)
    try:
        check_clash((name for name, _ in columns), id_column, path, answers=job.answer is not None)
    except InputError:
        raise Unsure("a column clash: the exact pass says where") from None
    return ColumnsChecked(rows, columns, id_column, digest, notes)


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def _jsonl(path: Path, digest: Digest) -> Iterator[pa.RecordBatch]:
    """The file in chunks of whole lines, each parsed by Arrow's JSON reader (threaded)
    with the schema found in the first: memory stays at a few chunks, where Arrow's own
    streaming reader ran 50-90 MB ahead on a 70-270 MB file. The bytes read are fed to
    ``digest`` on the way, so the file is read once."""
    options = pj.ReadOptions(block_size=BLOCK_BYTES, use_threads=True)
    parse: pj.ParseOptions | None = None
    for chunk in _line_chunks(path, digest):
        table = pj.read_json(pa.BufferReader(chunk), read_options=options, parse_options=parse)
        if parse is None:
            # Arrow reads date-like strings as timestamps: read those columns as text.
            fields = [
                pa.field(f.name, pa.string() if pa.types.is_timestamp(f.type) else f.type)
                for f in table.schema
            ]
            parse = pj.ParseOptions(
                explicit_schema=pa.schema(fields), unexpected_field_behavior="error"
            )
            if fields != list(table.schema):
                table = pj.read_json(
                    pa.BufferReader(chunk), read_options=options, parse_options=parse
                )
        # one batch a chunk, not one an Arrow block: each batch costs the checks ~40 calls
        for batch in table.combine_chunks().to_batches():
            batch.validate(full=True)  # strings must be UTF-8, as the exact pass demands
            _no_nan(batch)
            yield batch


def _line_chunks(path: Path, digest: Digest) -> Iterator[pa.Buffer]:
    """The file's bytes in chunks of about CHUNK_BYTES that end at a line's end. The
    part of a line a chunk cuts is read again with the next one (a seek back), not
    copied onto it."""
    with path.open("rb") as f:
        size = CHUNK_BYTES
        while data := f.read(size):
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) == size:  # a line longer than a chunk: read more
                f.seek(-len(data), 1)
                size *= 2
                continue
            if cut == 0 or not data[cut:].strip():  # the end, without a last newline
                cut = len(data)
            f.seek(cut - len(data), 1)
            digest.update(data, cut)
            size = CHUNK_BYTES
            yield pa.py_buffer(data).slice(0, cut)


_T = TypeVar("_T")


def _ahead(items: Iterator[_T], depth: int = 2) -> Generator[_T, None, None]:
    """``items``, made on a worker thread up to ``depth`` ahead of the caller. Reading,
    the digest and Arrow's parsing (which release the GIL) go on while the caller checks
    the batches before: on two cores 1 M messages rows took 0.79 s in one thread, 0.58 s so.
    Closing this generator (the caller returned early) stops the worker and closes
    ``items`` within one item."""
    stop = threading.Event()
    made: queue.Queue[tuple[bool, object]] = queue.Queue(depth)

    def put(last: bool, value: object) -> bool:
        while not stop.is_set():
            try:
                made.put((last, value), timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(False, item):
                    return
            put(True, None)
        except BaseException as e:  # handed to the caller, raised there
            put(True, e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="batchq-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            last, value = made.get()
            if last:
                if isinstance(value, BaseException):
                    raise value
                return
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


def _parquet(path: Path) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(path) as file:
        yield from file.iter_batches(batch_size=65_536)


def _no_nan(batch: pa.RecordBatch) -> None:
    """NaN and Infinity are not JSON: the exact pass refuses the line, Arrow reads them."""
    for array in _leaves(batch.columns):
        if pa.types.is_floating(array.type) and len(array):
            if pc.any(pc.is_nan(array)).as_py() or pc.any(pc.is_inf(array)).as_py():
                raise Unsure("NaN or Infinity")
            extreme = pc.max(pc.abs(array)).as_py()
            if extreme is not None and extreme >= 2.0**63:
                raise Unsure("an integer too big for int64 may have been read as a float")


def _leaves(arrays: list[pa.Array]) -> Iterator[pa.Array]:
    for array in arrays:
        if pa.types.is_struct(array.type):
            yield from _leaves([array.field(i) for i in range(array.type.num_fields)])
        elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            yield from _leaves([array.flatten()])
        else:
            yield array


def _output_type(type_: pa.DataType) -> pa.DataType | None:
    """The exact pass's typing of a JSONL column (see io/schema.py's ColumnKinds)."""
    if pa.types.is_null(type_) or pa.types.is_integer(type_):
        return pa.int64()
    if pa.types.is_floating(type_):
        return pa.float64()
    if pa.types.is_boolean(type_):
        return pa.bool_()
    if pa.types.is_string(type_):
        return pa.string()
    if pa.types.is_struct(type_) or pa.types.is_list(type_):
        return None
    raise Unsure(f"a column of type {type_}")
