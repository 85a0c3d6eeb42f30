"""Merge the state folder's shards with the input into the one output Parquet file.

The input is read again in order, a block of rows at a time; for each block the results
for exactly those rows are read from the shards that hold any (found from each shard's
``_row`` range), so memory stays flat in the row count. The file is written beside the
output and renamed over it: a reader never sees half a file.

A block is one row group of the output: BLOCK rows, or fewer where rows are long (answers
of a few KB, long documents to label), so that it holds about BLOCK_BYTES. Its input is
read a smaller batch (READ rows) at a time and turned into Arrow columns at once, so at
most READ rows are ever held as Python objects; its results are gathered with one
``take``, a column at a time, and a block is let go before the next is gathered.
Measured on a 100,000-row state folder from a real run (tracemalloc and Arrow's pool):
Python objects at the merge's peak 12.6 -> 2.5 MB, Arrow's 16.2 -> 7.9 MB.

What still grows with the row count: Arrow's Parquet writer keeps every row group's
metadata until it closes, 25-35 KB a block of 25 columns (about 18 MB at 10M rows), and
pyarrow has no way to write fewer, larger row groups without holding them whole.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchq import arrays, memory
from batchq.errors import RunStopped
from batchq.files import disk_of, free_bytes, no_space, write_atomic
from batchq.io.preflight import ROW_COLUMN, InputInfo
from batchq.io.reader import read_batches
from batchq.io.schema import input_arrays
from batchq.result import COST, FEW_VALUES, SHARD_SCHEMA, output_fields
from batchq.state import MANIFEST_KEY, ShardIndex, StateDir

__all__ = ["COST_KEY", "CURRENCY_KEY", "Costs", "MergeCounts", "merge_output"]

#: The output's metadata keys that say how its ``cost`` column was priced (the table's
#: source and date, the region), and in which currency (``USD``; ``CNY``; or both, by
#: model).
COST_KEY = b"batchq.cost"
CURRENCY_KEY = b"batchq.currency"


class Costs(Protocol):
    """What prices a block of results: the ``cost`` of each row, and a description of
    the prices used (currency, source) for the file's metadata."""

    def __call__(self, results: pa.Table) -> pa.Array: ...

    def describe(self) -> dict[str, Any]: ...


BLOCK = 16384
#: Input and results, uncompressed, a block holds at most (about): 16,384 short reviews and
#: their answers are 2.8 MB, so they stay at BLOCK rows; 2 KB ones would be 70 MB.
BLOCK_BYTES = 8 << 20
MIN_BLOCK = 256
READ = 2048


@dataclass(frozen=True)
class MergeCounts:
    rows: int
    statuses: dict[str, int]


def merge_output(
    state: StateDir,
    info: InputInfo,
    output: Path,
    *,
    manifest: dict[str, Any],
    keep_raw: bool = False,
    answers: bool = False,
    on_block: Callable[[pa.Table], object] | None = None,
    costs: Costs | None = None,
) -> MergeCounts:
    """Write ``output`` from the input and the shards. Every row must have a result.

    The job's manifest goes into the file's metadata, so that a rerun can tell whether
    the output answers the same job. ``keep_raw`` adds the ``raw`` column, ``answers``
    the checked answer's (a job with [answer]). ``on_block`` is given each block's
    results (those columns) as they are written. ``costs`` prices a block's results
    (the ``cost`` column; null without it) and says what with (the file's metadata).
    """
    memory.give_back()  # what sending freed, before the peak of the run
    shards = state.index()
    results_at = output_fields(answers=answers, keep_raw=keep_raw)
    names = [f.name for f in results_at if f.name != COST.name]
    schema = _output_schema(info, results_at)
    metadata = {MANIFEST_KEY: orjson.dumps(manifest)}
    if costs is not None:
        described = costs.describe()
        metadata[COST_KEY] = orjson.dumps(described)
        metadata[CURRENCY_KEY] = ",".join(described["currencies"]).encode()
    schema = schema.with_metadata(metadata)
    statuses: Counter[str] = Counter()
    written = _Written()

    def write(f: BinaryIO) -> None:
        with pq.ParquetWriter(
            f,
            schema,
            use_dictionary=_dictionary_columns(schema),
            write_statistics=_statistics_columns(schema),
        ) as writer:
            for start, inputs in _input_blocks(info, _block_rows(info, shards)):
                results = shards.results(start, inputs.num_rows).select(names)
                cost = (
                    costs(results)
                    if costs is not None
                    else pa.nulls(results.num_rows, pa.float64())
                )
                at = results_at.index(COST)
                results = results.add_column(at, COST, cost)
                statuses.update(results.column("status").to_pylist())
                if on_block is not None:
                    on_block(results)
                writer.write_table(
                    pa.Table.from_arrays([*inputs.columns, *results.columns], schema=schema)
                )
                written.rows, written.bytes = written.rows + inputs.num_rows, f.tell()
                del inputs, results  # not held while the next block is gathered (4.6 MB)

    try:
        write_atomic(output, write)
    except OSError as e:
        raise _not_written(e, output, state, info, written) from None
    return MergeCounts(sum(statuses.values()), dict(statuses))


@dataclass
class _Written:
    """How far the merge's write got: rows, and the bytes they took."""

    rows: int = 0
    bytes: int = 0


def _not_written(
    error: OSError, output: Path, state: StateDir, info: InputInfo, written: _Written
) -> RunStopped:
    """What to tell when the output could not be written (its temp file is gone by now).
    A full disk says how much room the whole file needs beyond what is free: the bytes a
    row took so far times the rows, or, before the first block, the shards' and the
    input's size (the output holds both, compressed)."""
    kept = f"the results are kept in {state.path}, so nothing is sent again"
    if not no_space(error):
        return RunStopped(
            f"cannot write the output {output}: {error.strerror}; fix that "
            f"and rerun the same command to merge ({kept})"
        )
    if written.rows:
        need = written.bytes * info.total_rows / written.rows
    else:
        shards = sum(p.stat().st_size for p in state.shard_paths())
        need = shards + info.path.stat().st_size
    more = max(1, math.ceil((need * 1.1 - free_bytes(output.parent)) / 1e6))
    return RunStopped(
        f"no space left on {disk_of(output.parent)}: free {more:,} MB and "
        f"rerun the same command to merge ({kept})"
    )


def _block_rows(info: InputInfo, shards: ShardIndex) -> int:
    """Rows a block: BLOCK, or as many as fit BLOCK_BYTES at the average row's size (its
    results, uncompressed, plus its share of the input file), but at least MIN_BLOCK."""
    results = shards.mean_row_bytes()
    inputs = info.path.stat().st_size / max(1, info.total_rows)
    return max(MIN_BLOCK, min(BLOCK, int(BLOCK_BYTES / max(1.0, results + inputs))))


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """The result columns of FEW_VALUES, and the input columns that are not text."""
    results = set(SHARD_SCHEMA.names)
    return [
        f.name
        for f in schema
        if f.name in FEW_VALUES or (f.name not in results and not pa.types.is_string(f.type))
    ]


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """The columns worth a min and max in each row group's metadata: not free text.

    The writer keeps every row group's metadata until it closes, and a text column's
    statistics are two of its values (up to 4 KB each): with 1 KB responses they were
    2.6 KB of a row group's 27 KB of metadata, in memory to the end of the merge."""
    return [f.name for f in schema if f.name in FEW_VALUES or not pa.types.is_string(f.type)]


def _output_schema(info: InputInfo, results: list[pa.Field]) -> pa.Schema:
    fields: list[pa.Field] = []
    if info.id_column is None:
        fields.append(pa.field(ROW_COLUMN, pa.int64()))
    for name, type_ in info.columns:
        if name != "model":
            fields.append(pa.field(name, type_ if type_ is not None else pa.string()))
    return pa.schema([*fields, *results])


def _input_blocks(info: InputInfo, block: int) -> Iterator[tuple[int, pa.Table]]:
    """The input's columns for the output (``model`` left out, ROW_COLUMN added when
    there is no id column), ``block`` rows at a time, read READ rows at a time."""
    kept = [(name, type_) for name, type_ in info.columns if name != "model"]
    names = [*([ROW_COLUMN] if info.id_column is None else []), *(name for name, _ in kept)]
    step = min(READ, block)
    block -= block % step  # whole batches
    pending: list[pa.RecordBatch] = []
    start = 0
    for batch in read_batches(info.path, batch_size=step):
        columns: list[pa.Array] = []
        if info.id_column is None:
            columns.append(arrays.int64s(range(batch.start, batch.start + len(batch.rows))))
        if batch.arrow is not None:
            columns.extend(batch.arrow.column(name) for name, _ in kept)
        else:
            columns.extend(input_arrays(batch.rows, kept))
        pending.append(pa.RecordBatch.from_arrays(columns, names=names))
        if sum(b.num_rows for b in pending) >= block:
            yield start, pa.Table.from_batches(pending)
            start += sum(b.num_rows for b in pending)
            pending = []
    if pending:
        yield start, pa.Table.from_batches(pending)
