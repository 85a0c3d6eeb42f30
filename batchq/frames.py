"""The Python API's data in and out: a frame (or rows, or a file) as a file batchq reads,
and the output's results as the kind of frame that came in.

    polars DataFrame ─┐                      ┌─ polars: the frame + the result columns
    pandas DataFrame ─┼─ Parquet, in slices ─┤  pandas: the frame (its index) + results
    pyarrow Table    ─┘                      └─ pyarrow: the table + results
    LazyFrame, RecordBatchReader ─ streamed to Parquet ─ the output read back
    list of dicts ─ JSONL ─ the output read back, as polars
    a .jsonl / .jsonl.gz / .parquet path ─ read where it is ─ the output, as polars

An in-memory frame is given back with its own columns as they are (dtypes, categoricals,
nested columns, a pandas index), the result columns beside it; it is copied whole at
most once (pandas, into Arrow a slice at a time to be written). A stream is never held
whole: polars sinks a LazyFrame in its streaming engine (in a child process, where it can,
whose buffers are gone before the run starts); a reader's batches are written as they
come. pandas is imported only when given a pandas frame.
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchq import arrays
from batchq.errors import InputError, UsageError
from batchq.files import read_parquet, write_atomic
from batchq.io.reader import input_format
from batchq.io.rules import ROW_COLUMN
from batchq.result import output_fields
from batchq.state import output_manifest

__all__ = ["Source", "answers_as_structs", "from_frame", "results_as", "source_of", "stage"]

Kind = Literal["polars", "lazy", "pandas", "arrow", "reader", "rows", "path"]
#: Rows of a pandas frame turned into Arrow (and written) at a time.
PANDAS_SLICE = 65_536


@dataclass(frozen=True)
class Source:
    """What a call was given: its ``kind``, and the file it is when it is one."""

    kind: Kind
    path: Path | None = None

    @property
    def staged(self) -> bool:
        """Whether batchq writes the data to a file of its own first."""
        return self.kind != "path"

    @property
    def suffix(self) -> str:
        return ".jsonl" if self.kind == "rows" else ".parquet"

    def describe(self, data: Any) -> str:
        """A line for ``batchq cache list``: what the call was given."""
        if self.path is not None:
            return str(self.path)
        if self.kind in ("lazy", "reader"):
            return {"lazy": "a polars LazyFrame", "reader": "a pyarrow RecordBatchReader"}[
                self.kind
            ]
        rows = len(data) if self.kind != "arrow" else data.num_rows
        what = {
            "polars": "polars DataFrame",
            "pandas": "pandas DataFrame",
            "arrow": "pyarrow Table",
            "rows": "list of dicts",
        }[self.kind]
        return f"a {what} of {rows:,} rows"


def source_of(data: Any) -> Source:
    """The kind of ``data``; UsageError for anything batchq cannot read."""
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        input_format(path)  # an InputError naming the file for a name batchq cannot read
        return Source("path", path)
    if isinstance(data, pl.DataFrame):
        return Source("polars")
    if isinstance(data, pl.LazyFrame):
        return Source("lazy")
    if isinstance(data, pa.Table):
        return Source("arrow")
    if isinstance(data, pa.RecordBatchReader):
        return Source("reader")
    if _is_pandas(data):
        return Source("pandas")
    if isinstance(data, list):
        return Source("rows")
    raise UsageError(
        f"batchq cannot read a {type(data).__module__}.{type(data).__qualname__}: give a "
        "polars or pandas DataFrame, a polars LazyFrame, a pyarrow Table or "
        "RecordBatchReader, a list of dicts, or a path to a .jsonl / .jsonl.gz / .parquet file"
    )


def _is_pandas(data: Any) -> bool:
    return type(data).__module__.split(".")[0] == "pandas" and type(data).__name__ == "DataFrame"


def stage(source: Source, data: Any, path: Path, *, rename: dict[str, str]) -> None:
    """Write ``data`` to ``path`` as the file the run reads, its columns renamed by
    ``rename`` (``prompt="question"``: question -> prompt). The same data gives the same
    bytes, so that the cache knows it again."""
    try:
        _check_rename(_columns(source, data), rename)
        if source.kind == "polars":
            data.rename(rename).write_parquet(path)
        elif source.kind == "lazy":
            _sink(data.rename(rename), path)
        else:
            _write_other(source, data, path, rename)
    except pl.exceptions.PolarsError as e:  # an Object column, a query that fails
        what = "LazyFrame's query" if source.kind == "lazy" else "frame"
        raise UsageError(f"the {what} cannot be written for the run: {e}") from None


#: Sinks a serialized LazyFrame (on stdin) to the Parquet file named on the command line.
_SINK = """
import io, sys
import polars as pl
pl.LazyFrame.deserialize(io.BytesIO(sys.stdin.buffer.read())).sink_parquet(sys.argv[1])
"""


def _sink(lazy: pl.LazyFrame, path: Path) -> None:
    """Stream ``lazy`` to ``path`` in a short-lived child process where its plan allows:
    polars' streaming engine holds its buffers (about 80 MB for a million rows) after
    the sink returns, and in a child they are gone before the run starts. A plan that
    holds in-memory data (it would be copied to the child) or a Python function (it
    cannot be serialized), or a child that fails (the error is polars' to tell), is
    sunk here instead."""
    plan = None
    if "DF [" not in lazy.explain(optimized=False):
        try:
            plan = lazy.serialize()
        except Exception:  # a Python UDF without cloudpickle, a plan polars cannot write
            plan = None
    if plan is not None:
        child = subprocess.run(
            [sys.executable, "-c", _SINK, str(path)], input=plan, capture_output=True
        )
        if child.returncode == 0:
            return
        path.unlink(missing_ok=True)
    lazy.sink_parquet(path)


def _write_other(source: Source, data: Any, path: Path, rename: dict[str, str]) -> None:
    if source.kind == "arrow":
        pq.write_table(_renamed(data, rename), path)
    elif source.kind == "reader":
        _write_batches(path, data.schema, (_renamed(b, rename) for b in data), rename)
    elif source.kind == "pandas":
        _write_pandas(path, data, rename)
    elif source.kind == "rows":
        _write_rows(path, data, rename)


def _columns(source: Source, data: Any) -> list[str]:
    if source.kind in ("polars", "pandas"):
        return [str(c) for c in data.columns]
    if source.kind == "lazy":
        return list(data.collect_schema().names())
    if source.kind in ("arrow", "reader"):
        return list(data.schema.names)
    return []  # rows: each row is checked as it is written


def _check_rename(columns: list[str], rename: dict[str, str]) -> None:
    for old, new in rename.items():
        if columns and old not in columns:
            raise UsageError(
                f"{new}={old!r} names a column the data does not have; it has "
                f"{', '.join(map(repr, columns))}"
            )
        if new in columns:
            raise UsageError(
                f"{new}={old!r}, but the data has a {new!r} column too: drop or rename one of them"
            )


def _renamed(data: Any, rename: dict[str, str]) -> Any:
    if not rename:
        return data
    return data.rename_columns([rename.get(n, n) for n in data.schema.names])


def _write_batches(
    path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], rename: dict[str, str]
) -> None:
    schema = pa.schema([f.with_name(rename.get(f.name, f.name)) for f in schema])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _write_pandas(path: Path, frame: Any, rename: dict[str, str]) -> None:
    """A slice at a time, so the frame is in Arrow only PANDAS_SLICE rows at once. The
    schema is read from the whole frame first: a slice of nulls has no type of its own."""
    frame = frame.rename(columns=rename) if rename else frame
    bad = [c for c in frame.columns if not isinstance(c, str)]
    if bad:
        raise UsageError(f"the frame's column names must be text: rename {bad[0]!r}")
    try:
        schema = pa.Schema.from_pandas(frame, preserve_index=False)
        slices = (
            pa.RecordBatch.from_pandas(
                frame.iloc[i : i + PANDAS_SLICE], schema=schema, preserve_index=False
            )
            for i in range(0, len(frame), PANDAS_SLICE)
        )
        _write_batches(path, schema, slices, {})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UsageError(f"the pandas frame cannot be read into Arrow: {e}") from None


def _write_rows(path: Path, rows: list[Any], rename: dict[str, str]) -> None:
    with path.open("wb") as f:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InputError(
                    f"a {type(row).__name__} where a dict was expected: give a "
                    "list of dicts, one a row",
                    row=i,
                    frame=True,
                )
            if rename:
                if clash := next((new for new in rename.values() if new in row), None):
                    raise InputError(
                        f"this row has a {clash!r} key and the column named as "
                        f"{clash}= too: drop one",
                        row=i,
                        column=clash,
                        frame=True,
                    )
                row = {rename.get(k, k): v for k, v in row.items()}
            try:
                f.write(
                    orjson.dumps(
                        row,
                        option=orjson.OPT_APPEND_NEWLINE
                        | orjson.OPT_SERIALIZE_NUMPY
                        | orjson.OPT_NON_STR_KEYS,
                    )
                )
            except TypeError as e:
                raise InputError(
                    f"a value JSON cannot hold ({e}): give text, numbers, lists or dicts",
                    row=i,
                    column=_bad_key(row),
                    frame=True,
                ) from None


def _bad_key(row: dict[str, Any]) -> str | None:
    for key, value in row.items():
        try:
            orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:
            return str(key)
    return None


def from_frame(error: InputError, source: Source) -> InputError:
    """An input error about a staged file, said of the frame: its row index and column,
    not a file of batchq's and its line."""
    if not source.staged:
        return error

    row = error.line - 1 if error.line is not None else error.row  # one JSON line a row
    also = error.also
    if also is not None and "line" in also:
        also = {"row": also["line"] - 1}
    return InputError(error.reason, row=row, column=error.column, also=also, frame=True)


def results_as(
    source: Source,
    data: Any,
    output: Path,
    *,
    answers: bool,
    keep_raw: bool,
    rename: dict[str, str],
    mapped: Path,
) -> Any:
    """The finished ``output`` as the kind of frame the call was given: the frame itself
    with the result columns beside it (its ``model`` column replaced by the output's),
    or the whole output read back (without the row number it adds, its columns named as
    in the data: ``rename`` undone). Rows in input order. A polars frame's columns from
    the output are memory-mapped from ``mapped`` (see ``map_output``)."""
    present = set(pq.read_schema(output).names)  # raw: only if the run that wrote it kept it
    names = [f.name for f in output_fields(answers=answers, keep_raw=keep_raw) if f.name in present]
    if source.kind == "polars":
        results = pl.from_arrow(map_output(output, mapped).select(names))
        assert isinstance(results, pl.DataFrame)
        return pl.concat([data.drop("model", strict=False), results], how="horizontal")
    if source.kind == "pandas":
        return _pandas_results(data, read_parquet(output, names))
    if source.kind == "arrow":
        table = data.drop_columns(["model"]) if "model" in data.schema.names else data
        results = read_parquet(output, names)
        return pa.Table.from_arrays(
            [*table.columns, *results.columns], names=[*table.schema.names, *names]
        )
    manifest = output_manifest(output) or {}
    drop = [ROW_COLUMN] if manifest.get("id_column") is None else []  # rows known by place
    back = {new: old for old, new in rename.items()}
    if source.kind == "reader":
        table = read_parquet(output).drop_columns(drop)
        return table.rename_columns([back.get(n, n) for n in table.schema.names])
    frame = pl.from_arrow(map_output(output, mapped))
    assert isinstance(frame, pl.DataFrame)
    return frame.drop(drop).rename(back)


def empty_results(source: Source, data: Any, *, answers: bool, keep_raw: bool) -> Any:
    """What ``results_as`` hands back for data without a row: no rows, and the columns
    of the data (where it has any) and of the output's results, typed."""
    results = pa.schema(output_fields(answers=answers, keep_raw=keep_raw)).empty_table()
    if source.kind in ("polars", "lazy"):
        inputs = data if source.kind == "polars" else data.head(0).collect()
        frame = pl.from_arrow(results)
        assert isinstance(frame, pl.DataFrame)
        return pl.concat([inputs.drop("model", strict=False), frame], how="horizontal")
    if source.kind == "pandas":
        return _pandas_results(data, results)
    if source.kind == "arrow":
        table = data.drop_columns(["model"]) if "model" in data.schema.names else data
        return pa.Table.from_arrays(
            [*table.columns, *results.columns], names=[*table.schema.names, *results.schema.names]
        )
    if source.kind == "reader":
        return results
    return pl.from_arrow(results)


def map_output(output: Path, copy: Path) -> pa.Table:
    """The output as an Arrow table memory-mapped from ``copy``, an uncompressed Arrow
    IPC file of it (written first, a row group at a time, unless it is there and newer),
    its text as string_view, which polars takes without copying.

    So a frame handed back is backed by the file's pages, as a Hugging Face dataset is:
    read from disk when first touched, and dropped by the kernel under memory pressure
    instead of the process being killed. The 1,000,000-row frame of bench/api_memory.py
    (184 MB by polars' estimate) took about 400 MB of RSS read from Parquet; mapped,
    26 MB until used. The price is disk: 370 MB for those rows, beside 22 MB of Parquet.
    """
    if not copy.exists() or copy.stat().st_mtime < output.stat().st_mtime:
        with pq.ParquetFile(output) as file:
            schema = pa.schema([_as_views(f) for f in file.schema_arrow])

            def write(f: Any) -> None:
                with pa.ipc.new_file(f, schema) as writer:
                    for i in range(file.num_row_groups):
                        writer.write_table(file.read_row_group(i).cast(schema))

            write_atomic(copy, write)
    return pa.ipc.open_file(pa.memory_map(str(copy))).read_all()


def _as_views(field: pa.Field) -> pa.Field:
    text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
    return field.with_type(pa.string_view()) if text else field


def _pandas_results(frame: Any, results: pa.Table) -> Any:
    """pandas: the result columns in pandas' nullable dtypes, on the frame's index."""
    import pandas as pd

    nullable = {
        pa.string(): pd.StringDtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.float64(): pd.Float64Dtype(),
        pa.bool_(): pd.BooleanDtype(),
    }
    columns = results.to_pandas(types_mapper=nullable.get)
    columns.index = frame.index
    frame = frame.drop(columns=["model"]) if "model" in frame.columns else frame
    return pd.concat([frame, columns], axis=1)


def answers_as_structs(frame: Any, model_class: Any, source: Source) -> Any:
    """The ``answer`` column (valid JSON text, or null) as a struct column of the pydantic
    model's fields, each answer validated by the model (a field's Python type kept:
    dates as dates)."""
    texts = _column(frame, "answer", source)
    values = [None if t is None else model_class.model_validate_json(t).model_dump() for t in texts]
    if (type_ := _struct_type(model_class)) is not None:  # plain fields: JSON values
        structs = arrays.array(values, type_)  # (no pandas: see batchq.arrays)
    else:  # dates and the like: Arrow infers them, as pyarrow converts them
        structs = pa.array(values)
    if source.kind == "pandas":
        import pandas as pd

        frame = frame.copy(deep=False)
        frame["answer"] = pd.Series(
            structs.to_pylist(), index=frame.index, dtype=pd.ArrowDtype(structs.type)
        )
        return frame
    if isinstance(frame, pa.Table):
        return frame.set_column(frame.schema.get_field_index("answer"), "answer", structs)
    return frame.with_columns(pl.Series("answer", pl.from_arrow(structs)))


_SCALARS = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _struct_type(model_class: Any) -> pa.DataType | None:
    """The struct of a model of plain fields (text, numbers, booleans, optional or not), so
    that a column of nothing but nulls still has its fields; None: Arrow infers it."""
    fields = []
    for name, info in model_class.model_fields.items():
        options = [a for a in typing.get_args(info.annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else info.annotation
        if annotation not in _SCALARS:
            return None
        fields.append(pa.field(name, _SCALARS[annotation]))
    return pa.struct(fields)


def _column(frame: Any, name: str, source: Source) -> list[Any]:
    if source.kind == "pandas":
        import pandas as pd

        return [None if pd.isna(v) else v for v in frame[name].tolist()]
    if isinstance(frame, pa.Table):
        return frame.column(name).to_pylist()  # type: ignore[no-any-return]
    return frame.get_column(name).to_list()  # type: ignore[no-any-return]
