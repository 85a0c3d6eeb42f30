"""``status`` and ``cost`` as data: what a job's output or state folder holds.

A path names a job's results in any of three ways: the output Parquet file, its state
folder (``<output>.batchq/``), or the job file. While a run is unfinished (running or
crashed) the results are the state folder's shards, the latest answer of each row; once
it is finished they are the output file. Nothing here prints: the CLI formats.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchq import arrays
from batchq.config import Job, load_job
from batchq.errors import UsageError
from batchq.files import read_parquet
from batchq.money.pricing import PriceTable, row_costs
from batchq.result import BATCH_PART, SHARD_SCHEMA
from batchq.state import StateDir, output_manifest, output_of

__all__ = [
    "CostLine",
    "CostReport",
    "CostTally",
    "Results",
    "Status",
    "cost_report",
    "find_results",
    "status",
]

USAGE_COLUMNS = ["prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens"]
_NEEDED = ["status", "model", "attempts", "reasoning", "via", *USAGE_COLUMNS,
           "cache_creation_tokens", *BATCH_PART]  # fmt: skip


_TYPES: dict[str, pa.DataType] = {
    "status": pa.string(), "model": pa.string(), "attempts": pa.int64(),
    "reasoning": pa.string(), "via": pa.string(), **dict.fromkeys(USAGE_COLUMNS, pa.int64()),
    "cache_creation_tokens": pa.int64(), **dict.fromkeys(BATCH_PART, pa.int64()),
}  # fmt: skip
BATCH_ROWS = 16_384  # the output's row groups: a larger batch held 13 MB more


@dataclass(frozen=True)
class Results:
    """Where a job's results are, and the job's manifest (None for a foreign file)."""

    output: Path
    state: Path
    manifest: dict[str, Any] | None
    #: True when the results are the finished output file, False for the state folder.
    finished: bool

    def tables(self, extra: list[str] | None = None) -> Iterator[pa.Table]:
        """The results, one row per answered input row, with the usage columns (and
        ``extra``): a block at a time from a finished output (flat memory), or the latest
        answer of each row from the state folder's shards."""
        columns = list(dict.fromkeys([*_NEEDED, *(extra or [])]))
        if self.finished:
            yield from _output_tables(self.output, columns)
        else:
            yield from _shard_tables(StateDir(self.state), columns)


def find_results(path: Path) -> Results:
    """The results ``path`` names. UsageError when there are none (yet)."""
    output = load_job(path).output if path.suffix == ".toml" else output_of(path)
    state = StateDir.of(output)
    if (manifest := state.manifest()) is not None:
        return Results(output, state.path, manifest, finished=False)
    if output.exists():
        if not _holds_results(output):
            raise UsageError(
                f"{output} is not a batchq output (no status column in it): give the output "
                "file, the state folder or the job file of a job that has run"
            )
        return Results(output, state.path, output_manifest(output), finished=True)
    raise UsageError(
        f"no results at {path}: neither {output} nor its state folder {state.path} exists. "
        "Give the output file, the state folder or the job file of a job that has run"
    )


def _holds_results(path: Path) -> bool:
    """Whether ``path`` is a Parquet file with the result columns (an output, or a part
    of one saved by hand)."""
    try:
        return path.is_file() and "status" in pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False


def _output_tables(output: Path, columns: list[str]) -> Iterator[pa.Table]:
    file = pq.ParquetFile(output)
    names = file.schema_arrow.names
    missing = [c for c in columns if c not in names and c not in _NEEDED]
    if missing:
        raise UsageError(f"{output} has no column {missing[0]!r}: choose one it has")
    if "status" not in names:
        raise UsageError(f"{output} has no status column: it was not written by batchq")
    present = [c for c in columns if c in names]
    with file:
        # A row group at a time: over the whole file, iter_batches read ahead (11.5 MB of
        # Arrow buffers against 1.6 MB, on 611 row groups of 1,000 rows).
        for group in range(file.num_row_groups):
            batches = file.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=present)
            for batch in batches:
                yield _with_all(pa.Table.from_batches([batch]), columns)


def _with_all(table: pa.Table, columns: list[str]) -> pa.Table:
    """``table`` with any of ``columns`` it lacks as nulls (a file from an older batchq,
    or written by hand, may lack a usage column)."""
    for name in columns:
        if name not in table.column_names:
            type_ = _TYPES.get(name, pa.string())
            table = table.append_column(name, pa.nulls(table.num_rows, type_))
    return table


def _shard_tables(state: StateDir, columns: list[str]) -> Iterator[pa.Table]:
    """The latest answer of each row, a shard at a time (``StateDir.latest``)."""
    if damaged := state.damaged():
        path, reason = damaged[0]
        raise UsageError(
            f"the state folder's shard {path} cannot be read ({reason}): rerun "
            "the job to set it aside and send its rows again"
        )
    extra = [c for c in columns if c not in SHARD_SCHEMA.names]
    if extra:
        raise UsageError(
            f"the state folder holds result columns only, not {extra[0]!r}: run `cost` "
            "by an input column once the run is finished (or --by a result column now)"
        )
    empty = True
    for table in state.latest(columns):
        empty = False
        yield table.drop_columns(["_row"])
    if empty:
        yield _with_all(pa.table({"status": pa.nulls(0, pa.string())}), columns)


# --- cost ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostLine:
    """One group of rows (a model, or a value of ``--by``) and what it cost."""

    key: str | None
    currency: str | None  # None: unpriced
    rows: int
    ok: int
    error: int
    #: rows whose answer failed the job's [answer] check
    invalid: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: float | None
    #: rows that took another row's answer (dedupe), and their tokens: not billed, and
    #: not in the token sums above
    copies: int = 0
    copied_tokens: int = 0


@dataclass(frozen=True)
class CostReport:
    by: str
    lines: list[CostLine]
    totals: dict[str, float]  # currency -> cost
    unpriced: list[str]  # models without a price
    source: str
    region: str
    #: Rows answered through a provider's Batch API (``import-batch``), priced at its share.
    batch_rows: int
    rows: int = field(default=0)


_SUMS = ["rows", "ok", "error", "invalid", *USAGE_COLUMNS, "cost", "attempts", "batch",
         "copies", "copied_tokens"]  # fmt: skip


def cost_report(
    results: Results, prices: PriceTable, *, by: str = "model", region: str | None = None
) -> CostReport:
    """Per-request costs, summed by ``by``. The price region comes from the job's manifest
    unless ``region`` is given; rows from a Batch API are priced at its share."""
    region = region or (results.manifest or {}).get("region") or "intl"
    return _tally(results, prices, region, by).report()


class CostTally:
    """Sums of _SUMS by (value of ``by``, currency), a block of results at a time: what
    ``cost`` and ``status`` read back from disk, and what a run's merge feeds as it writes
    the output, so the closing summary does not read the output again."""

    def __init__(self, prices: PriceTable, region: str, by: str | None = "model") -> None:
        self.prices, self.region, self.by = prices, region, by
        self.sums: dict[tuple[str | None, str | None], dict[str, float]] = {}
        self.unpriced: set[str] = set()

    def add(self, table: pa.Table) -> None:
        priced = row_costs(table, self.prices, self.region, self.unpriced)
        by = self.by
        key = _as_text(table.column(by)) if by else pa.nulls(table.num_rows, pa.string())
        status, via, no = table.column("status"), table.column("via"), arrays.boolean(False)
        copied = pc.fill_null(pc.equal(via, arrays.text("dedupe")), no)

        def used(name: str) -> pa.ChunkedArray:  # billed: a copy's usage is its leader's
            zero = arrays.scalar(0, table.column(name).type)
            return pc.if_else(copied, zero, pc.fill_null(table.column(name), zero))

        copied_tokens = pc.add(
            *(
                pc.fill_null(table.column(c), arrays.scalar(0, pa.int64()))
                for c in ("prompt_tokens", "completion_tokens")
            )
        )
        parts = pa.table(
            {
                "key": key,
                "currency": priced.column("currency"),
                "rows": arrays.int64s([1] * table.num_rows),
                "ok": pc.cast(pc.equal(status, arrays.text("ok")), pa.int64()),
                "error": pc.cast(pc.equal(status, arrays.text("error")), pa.int64()),
                "invalid": pc.cast(pc.equal(status, arrays.text("invalid")), pa.int64()),
                **{c: used(c) for c in USAGE_COLUMNS},
                "attempts": pc.fill_null(
                    table.column("attempts"), arrays.scalar(0, table.column("attempts").type)
                ),
                "cost": priced.column("cost"),
                "batch": pc.cast(pc.fill_null(pc.equal(via, arrays.text("batch")), no), pa.int64()),
                "copies": pc.cast(copied, pa.int64()),
                "copied_tokens": pc.if_else(
                    copied, pc.cast(copied_tokens, pa.int64()), arrays.scalar(0, pa.int64())
                ),
            }
        )
        for (key, currency), sums in _grouped_sums(parts, ["key", "currency"], _SUMS):
            total = self.sums.setdefault((key, currency), dict.fromkeys(_SUMS, 0.0))
            for name in _SUMS:
                total[name] += sums[name] or 0

    def report(self) -> CostReport:
        lines = [
            _line(key, currency, v) for (key, currency), v in sorted(self.sums.items(), key=_order)
        ]
        totals: dict[str, float] = {}
        for line in lines:
            if line.currency is not None and line.cost is not None:
                totals[line.currency] = totals.get(line.currency, 0.0) + line.cost
        batch_rows = int(sum(v["batch"] for v in self.sums.values()))
        rows = sum(line.rows for line in lines)
        return CostReport(
            self.by or "",
            lines,
            totals,
            sorted(self.unpriced),
            self.prices.source,
            self.region,
            batch_rows,
            rows,
        )


def _grouped_sums(
    table: pa.Table, keys: list[str], columns: list[str]
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The sums of ``columns`` for each distinct tuple of ``keys`` (null is a value of its
    own). Not Table.group_by: it loads pyarrow.dataset, whose import converts a Python
    value, and so imports pandas where it is installed (see batchq.arrays)."""
    if not table.num_rows:
        return
    order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys])
    table = table.take(order).combine_chunks()
    steps = []  # for each key: whether a row's value differs from the row before's
    for name in keys:
        codes = table.column(name).dictionary_encode(null_encoding="encode").chunk(0).indices
        steps.append(pc.not_equal(codes.slice(1), codes.slice(0, len(codes) - 1)))
    changed = functools.reduce(pc.or_, steps)
    starts = [0, *(i + 1 for i in pc.indices_nonzero(changed).to_pylist())]
    for start, end in zip(starts, [*starts[1:], table.num_rows], strict=True):
        group = table.slice(start, end - start)
        key = tuple(group.column(k)[0].as_py() for k in keys)
        yield key, {c: pc.sum(group.column(c)).as_py() for c in columns}


def _tally(results: Results, prices: PriceTable, region: str, by: str | None) -> CostTally:
    tally = CostTally(prices, region, by)
    for table in results.tables([by] if by else None):
        tally.add(table)
    return tally


def _line(key: str | None, currency: str | None, v: dict[str, float]) -> CostLine:
    rows, ok, error, invalid, prompt, cached, completion, reasoning = (int(v[n]) for n in _SUMS[:8])
    cost = None if currency is None else v["cost"]
    return CostLine(
        key,
        currency,
        rows,
        ok,
        error,
        invalid,
        prompt,
        cached,
        completion,
        reasoning,
        cost,
        int(v["copies"]),
        int(v["copied_tokens"]),
    )


def _order(item: tuple[tuple[str | None, str | None], Any]) -> tuple[bool, str, bool, str]:
    (key, currency), _ = item
    return (key is None, key or "", currency is None, currency or "")


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # nested: as Python writes them
        return arrays.array(
            [None if v is None else str(v) for v in column.to_pylist()], pa.string()
        )


def sampled_results(job: Job, rows: list[int]) -> pa.Table:
    """The latest results of the input positions ``rows`` (``estimate --sample``): from
    the state folder, or from the finished output."""
    columns = [*_NEEDED]
    state = StateDir.of(job.output)
    wanted = arrays.int64s(rows)
    if state.shard_paths():
        parts = [
            t.filter(pc.is_in(t.column("_row"), wanted)).select(["_row", *columns])
            for t in state.latest(columns)
        ]
        return pa.concat_tables(parts)
    table = read_parquet(job.output, columns).take(wanted)
    return table.add_column(0, "_row", wanted)


# --- status ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    output: Path
    state: Path
    finished: bool
    total_rows: int | None
    done: int
    ok: int
    error: int
    invalid: int
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    costs: dict[str, float]
    unpriced: list[str]
    #: Seconds since the last flush of a shard (None: none yet, or finished).
    last_flush_ago: float | None
    #: "running", "stopped" (no run holds the lock), or "finished".
    state_of_run: str
    pid: int | None
    command: str | None

    @property
    def remaining(self) -> int | None:
        return None if self.total_rows is None else self.total_rows - self.done


def status(results: Results, prices: PriceTable) -> Status:
    manifest = results.manifest or {}
    region = manifest.get("region") or "intl"
    tally = _tally(results, prices, region, None)
    sums, unpriced = tally.sums, sorted(tally.unpriced)
    total = dict.fromkeys(_SUMS, 0.0)
    costs: dict[str, float] = {}
    for (_, currency), v in sums.items():
        for name in _SUMS:
            total[name] += v[name]
        if currency is not None:
            costs[currency] = costs.get(currency, 0.0) + v["cost"]
    done = int(total["rows"])
    state = StateDir(results.state)
    running, pid = (False, None) if results.finished else state.holder()
    return Status(
        results.output,
        results.state,
        results.finished,
        manifest.get("input_rows", done if results.finished else None),
        done,
        int(total["ok"]),
        int(total["error"]),
        int(total["invalid"]),
        int(total["attempts"]),
        int(total["prompt_tokens"]),
        int(total["completion_tokens"]),
        costs,
        unpriced,
        None if results.finished else state.last_flush_ago(),
        "finished" if results.finished else ("running" if running else "stopped"),
        pid,
        manifest.get("command"),
    )
