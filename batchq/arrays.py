"""Arrow arrays, scalars and tables from Python values, without pyarrow's pandas probe.

Wherever numpy is installed, pyarrow asks of every Python value it converts (``pa.array``,
``pa.scalar``, a number given to a compute function, ``pq.read_table``) whether it is a
pandas object, and to know that it imports pandas, where pandas is installed: 0.15-0.2 s
and 42 MB in a process that was never given a pandas object (SPEC "Python API": pandas
is imported only when given one). These build the same arrays through Arrow's JSON reader
(orjson writes each column as one JSON list) or from an ``array.array``'s buffer, neither
of which asks. A bare number given to a compute function is typed by inference besides,
which tries to import dateutil each time (0.1 ms a call where it is not installed: 0.4 s
in one check of a million Batch-API lines): give it one of these scalars instead.
tests/e2e/test_no_pandas.py holds a run, a resume, the reports and ``batchq.run`` over a
polars frame to it.
"""

from __future__ import annotations

from array import array as buffer
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pj

__all__ = ["array", "boolean", "float64", "int32", "int64", "int64s", "scalar", "table", "text"]


def table(columns: Mapping[str, Sequence[Any]], schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` from its columns' values (JSON values: None is null)."""
    lists = pa.schema([pa.field(f.name, pa.list_(f.type)) for f in schema])
    line = b"{%s}" % b",".join(
        orjson.dumps(name) + b":" + orjson.dumps(list(columns[name])) for name in schema.names
    )
    read = pj.ReadOptions(use_threads=False, block_size=len(line) + 1)  # one line, one block
    options = pj.ParseOptions(explicit_schema=lists)
    one_row = pj.read_json(pa.BufferReader(line), read_options=read, parse_options=options)
    return pa.Table.from_arrays([c.chunk(0).flatten() for c in one_row.columns], schema=schema)


def array(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """``pa.array(values, type_)`` for JSON values (None is null)."""
    return table({"v": values}, pa.schema([("v", type_)])).column(0).chunk(0)


def int64s(values: Iterable[int]) -> pa.Array:
    """An int64 array of ``values``, none null, from its buffer: the fastest way."""
    data = buffer("q", values)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def scalar(value: Any, type_: pa.DataType) -> pa.Scalar:
    """``pa.scalar(value, type_)``. A compute function's fill or operand of another type
    than its column's is converted through Python again (``pc.fill_null``): match it."""
    return array([value], type_)[0]


def int64(value: int) -> pa.Scalar:
    return int64s([value])[0]


def int32(value: int) -> pa.Scalar:
    return scalar(value, pa.int32())


def float64(value: float) -> pa.Scalar:
    return scalar(value, pa.float64())


def text(value: str) -> pa.Scalar:
    return scalar(value, pa.string())


def boolean(value: bool) -> pa.Scalar:
    return scalar(value, pa.bool_())
