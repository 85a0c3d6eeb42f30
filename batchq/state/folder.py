"""The state folder of one job (see ``layout.py``): its shards of finished rows, and which
of them holds each row's latest result.

A crash at any instant leaves only whole shards (each is written atomically). A row may
be in several shards (``--retry-errors`` answers it again, ``import-batch`` after a run):
the shard with the highest number wins. That rule lives in ShardIndex alone; the done
mask, the attempts so far, the merge's blocks and the reports all read through it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchq import arrays
from batchq.config import Job
from batchq.errors import RunStopped, UsageError
from batchq.files import cannot_write, read_parquet, write_atomic
from batchq.io.keys import RepeatFinder
from batchq.io.preflight import InputInfo
from batchq.io.rules import ROW_COLUMN
from batchq.result import BATCH_PART, FEW_VALUES, PRIOR_COLUMNS, SHARD_SCHEMA, Result, shard_table
from batchq.state import lock
from batchq.state.layout import (
    BATCH_FILES,
    BATCH_JOURNAL,
    LOCK,
    MANIFEST,
    SHARD_GLOB,
    SHARDS,
    shard_name,
    shard_seq,
    state_path,
)
from batchq.state.manifest import check_same_job, output_manifest
from batchq.state.mask import RowMask

__all__ = ["ShardIndex", "StateDir"]

#: A shard's columns worth a dictionary (see FEW_VALUES).
_DICTIONARY = [name for name in SHARD_SCHEMA.names if name in FEW_VALUES]
ADOPT_BATCH = 65_536


class StateDir:
    """One job's state folder; locked by this process once opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shards = path / SHARDS
        #: ``--via batch``: the journal of remote steps, and the files sent and received
        self.batch_journal = path / BATCH_JOURNAL
        self.batch_files = path / BATCH_FILES
        self._lock: lock.Lock | None = None
        self._writer: str | None = None  # the tag of one of several writers
        self.notes: list[str] = []  # what opening it did that the run should say

    @classmethod
    def of(cls, output: Path) -> StateDir:
        """The state folder of the job writing ``output`` (not opened, not locked)."""
        return cls(state_path(output))

    @classmethod
    def writer(cls, path: Path, tag: str) -> StateDir:
        """One of several writers into an opened folder at ``path`` (a Ray engine's worker):
        its shards are named with ``tag``; it takes no lock (the run's owner holds it)."""
        state = cls(path)
        state._writer = tag
        return state

    @classmethod
    def open(
        cls, job: Job, info: InputInfo, *, manifest: dict[str, Any], restart: bool = False
    ) -> StateDir:
        """Make (or check against ``job``: UsageError if its results are another job's) and
        lock the job's state folder; with ``restart``, forget its results first. Damaged
        shards are set aside (``notes`` says so). ``manifest`` is written when new."""
        state = cls.of(job.output)
        try:
            state.shards.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"cannot make the state folder {state.path}: {e.strerror}; choose another --output"
            ) from None
        state._lock = lock.Lock(state.path / LOCK)
        try:
            if restart:
                state.clear()
            check_same_job(state.manifest(), job, info)
            if state.manifest() is None:
                text = orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
                write_atomic(state.path / MANIFEST, lambda f: f.write(text))
            state.notes = state.set_aside_damaged()
        except BaseException:
            state.close()
            raise
        return state

    def manifest(self) -> dict[str, Any] | None:
        """The job the folder's results belong to; None when there is no manifest (no
        folder, or a folder never opened by a run)."""
        try:
            return orjson.loads((self.path / MANIFEST).read_bytes())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def close(self) -> None:
        """Unlock (see ``lock.Lock.release``)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def holder(self) -> tuple[bool, int | None]:
        """Whether a live process holds the folder's lock, and the pid written in it."""
        return lock.holder(self.path / LOCK)

    def clear(self) -> None:
        """Forget every finished row (``--restart``)."""
        for shard in self.shard_paths():
            shard.unlink()
        (self.path / MANIFEST).unlink(missing_ok=True)
        self.batch_journal.unlink(missing_ok=True)  # none running: see batch.flow
        shutil.rmtree(self.batch_files, ignore_errors=True)

    def remove(self) -> None:
        """Delete the folder (after a verified merge)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def shard_paths(self) -> list[Path]:
        """Whole shards in the order they were written (temp files are ignored)."""
        return sorted(self.shards.glob(SHARD_GLOB), key=lambda p: (shard_seq(p), p.name))

    def has_results(self) -> bool:
        """Whether any shard is there (an unfinished run's results), or batches were
        submitted (``--via batch``)."""
        return bool(self.shard_paths()) or self.batch_journal.exists()

    @classmethod
    def finished(cls, job: Job, info: InputInfo) -> bool:
        """Whether ``job``'s output is finished: it exists and no unfinished results are
        beside it. UsageError when it holds another job's results (checked before any
        state folder is made: a refused run leaves nothing)."""
        if not job.output.exists() or cls.of(job.output).has_results():
            return False
        check_same_job(output_manifest(job.output), job, info)
        return True

    def last_flush_ago(self) -> float | None:
        """Seconds since the newest shard was written; None when there is none."""
        paths = self.shard_paths()
        return None if not paths else max(0.0, time.time() - paths[-1].stat().st_mtime)

    def damaged(self) -> list[tuple[Path, str]]:
        """Shards that cannot be read (a disk fault, a copy cut short), with the reason.
        Shards are written whole, so batchq itself leaves none."""
        damaged = []
        for path in self.shard_paths():
            try:
                names = pq.read_schema(path).names
            except (pa.ArrowException, OSError) as e:
                damaged.append((path, str(e).splitlines()[0]))
                continue
            if not {"_row", "status"} <= set(names):
                damaged.append((path, "it is not a batchq shard (no _row or status column)"))
        return damaged

    def set_aside_damaged(self) -> list[str]:
        """Move damaged shards aside (``damaged-<name>``), so that their rows are sent
        again and every intact shard's rows are kept; what was done, to say so."""
        notes = []
        for path, reason in self.damaged():
            aside = path.with_name(f"damaged-{path.name}")
            os.replace(path, aside)
            notes.append(
                f"the state folder's shard {path} cannot be read ({reason}): moved "
                f"aside to {aside.name}; its rows will be sent again"
            )
        return notes

    # --- reading: every result through the index, so the latest one wins ----------------

    def index(self) -> ShardIndex:
        return ShardIndex(self.shard_paths())

    def latest(self, columns: list[str]) -> Iterator[pa.Table]:
        """The latest result of every row, ``columns`` of it (SHARD_SCHEMA names; those an
        older shard lacks are nulls), a shard at a time: memory holds one shard, and 8
        bytes a row answered more than once."""
        index = self.index()
        names = list(dict.fromkeys(["_row", *columns]))
        for shard in index.shards:
            table = conform(read_parquet(shard.path, _present(shard.path, names)), names)
            keep = index.keep(shard.seq, table.column("_row"))
            yield table if keep is None else table.filter(keep)

    def by_id(self, columns: list[str]) -> Iterator[pa.Table]:
        """Each shard's ``_id`` and ``columns``, oldest first (``batchq.ray.map``'s folders,
        whose rows are found by id: a later one replaces an earlier)."""
        for path in self.shard_paths():
            yield conform(read_parquet(path, _present(path, ["_id", *columns])), ["_id", *columns])

    def done_mask(
        self, total_rows: int, *, retry: frozenset[str] = frozenset(), reasks: int | None = None
    ) -> RowMask:
        """Set where a result is on disk whose latest status is not in ``retry`` (the
        statuses ``--retry-errors`` / ``--retry-invalid`` send again) and, with
        ``reasks`` (the job's), is not an ``invalid`` one with re-asks left (a Batch-API
        answer, checked on import). Reads just ``_row``, ``status`` and ``reasks``."""
        done = RowMask(total_rows)
        if not retry and reasks is None:
            for path in self.shard_paths():
                for row in read_parquet(path, ["_row"]).column("_row").to_pylist():
                    done[row] = True
            return done
        for table in self.latest(["status", "reasks"]):
            again = self._again(table, retry, reasks)
            for row in table.column("_row").filter(pc.invert(again)).to_pylist():
                done[row] = True
        return done

    def prior_by_row(
        self, retry: frozenset[str], reasks: int | None = None
    ) -> dict[int, dict[str, Any]]:
        """What the rows sent again (see ``done_mask``) were billed and sent so far
        (PRIOR_COLUMNS), to be added to their next result's; for a row with re-asks left
        (not one of ``retry``: those are asked afresh), also its last ``response`` and why
        it was not valid (``error_message``), to ask again from."""
        prior: dict[int, dict[str, Any]] = {}
        if not retry and reasks is None:
            return prior
        names = ["_row", *PRIOR_COLUMNS, *BATCH_PART, "response", "error_message"]
        for table in self.latest(["status", *names[1:]]):
            again = table.filter(self._again(table, retry, reasks))
            afresh = pc.is_in(again.column("status"), arrays.array(sorted(retry), pa.string()))
            for values, fresh in zip(
                again.select(names).to_pylist(), afresh.to_pylist(), strict=True
            ):
                if fresh:
                    del values["response"], values["error_message"]
                prior[values.pop("_row")] = values
        return prior

    @staticmethod
    def _again(table: pa.Table, retry: frozenset[str], reasks: int | None) -> pa.ChunkedArray:
        status = table.column("status")
        again = pc.is_in(status, arrays.array(sorted(retry), pa.string()))
        if reasks is not None:
            reasked = table.column("reasks")
            left = pc.less(
                pc.fill_null(reasked, arrays.scalar(0, reasked.type)),
                arrays.scalar(reasks, reasked.type),
            )
            again = pc.or_(again, pc.and_(pc.equal(status, arrays.text("invalid")), left))
        return pc.fill_null(again, arrays.boolean(False))

    # --- writing ----------------------------------------------------------------------------

    def write(self, results: list[Result]) -> Path:
        """Write finished rows as the next shard, atomically. RunStopped on a disk error."""
        return self._write_table(shard_table(results))

    def _write_table(self, table: pa.Table) -> Path:
        # The next number after every shard there, whoever wrote it: a later result wins.
        paths = self.shard_paths()
        path = self.shards / shard_name(shard_seq(paths[-1]) + 1 if paths else 1, self._writer)
        try:
            write_atomic(path, lambda f: pq.write_table(table, f, use_dictionary=_DICTIONARY))
        except OSError as e:
            raise RunStopped(
                f"{cannot_write(e, self.path, f'to the state folder {self.path}')}. What "
                "was flushed before is safe: free some space or fix permissions, then rerun "
                "the same command to resume"
            ) from None
        return path

    def adopt_output(self, output: Path, id_column: str | None, retry: frozenset[str]) -> bool:
        """Take a finished output's results back as shards, for ``--retry-errors`` /
        ``--retry-invalid`` (``retry``: the statuses to send again).

        Returns False (and adopts nothing) when the output has no row of those statuses.
        """
        statuses = read_parquet(output, ["status"]).column("status")
        if not retry & set(statuses.to_pylist()):
            return False
        file = pq.ParquetFile(output)
        held = [n for n in SHARD_SCHEMA.names[2:] if n in file.schema_arrow.names]
        names = [id_column or ROW_COLUMN, *held]
        start = 0
        for batch in file.iter_batches(batch_size=ADOPT_BATCH, columns=names):
            table = pa.Table.from_batches([batch])
            ids = table.column(0).cast(pa.string())
            rows = arrays.int64s(range(start, start + table.num_rows))
            shard = pa.Table.from_arrays([rows, ids, *table.columns[1:]], ["_row", "_id", *held])
            self._write_table(conform(shard, SHARD_SCHEMA.names))
            start += table.num_rows
        return True


@dataclass(frozen=True)
class Shard:
    seq: int
    path: Path
    low: int  # the lowest and highest ``_row`` it holds
    high: int
    rows: int
    size: int  # bytes, uncompressed


class ShardIndex:
    """Every non-empty shard's row range and size, and which shard holds the latest result
    of each row found in more than one: the rule "the highest shard wins", once."""

    def __init__(self, paths: list[Path]) -> None:
        self.shards: list[Shard] = []
        finder = RepeatFinder()
        for seq, path in enumerate(paths, start=1):  # in the order written: seq orders them
            with pq.ParquetFile(path) as file:
                rows = file.read(columns=["_row"]).column("_row").combine_chunks()
                meta = file.metadata
                size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if len(rows):
                finder.add_array(rows)
                low, high = pc.min_max(rows).values()
                self.shards.append(Shard(seq, path, low.as_py(), high.as_py(), len(rows), size))
        self._again = arrays.int64s(sorted(finder.repeated(limit=None)))
        self._latest = arrays.int64s([0] * len(self._again))
        if len(self._again):
            for shard in self.shards:  # oldest first: the last shard holding a row wins
                rows = read_parquet(shard.path, ["_row"]).column("_row").combine_chunks()
                found = pc.is_in(self._again, value_set=rows)
                self._latest = pc.if_else(found, arrays.int64(shard.seq), self._latest)

    def keep(self, seq: int, rows: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | None:
        """Which of shard ``seq``'s ``rows`` hold their row's latest result (None: all)."""
        if not len(self._again):
            return None
        where = pc.index_in(rows, value_set=self._again)
        superseded = pc.not_equal(pc.take(self._latest, where), arrays.int64(seq))
        return pc.invert(pc.fill_null(superseded, arrays.boolean(False)))

    def mean_row_bytes(self) -> float:
        """A shard row's uncompressed size, on average."""
        return sum(s.size for s in self.shards) / max(1, sum(s.rows for s in self.shards))

    def results(self, start: int, count: int) -> pa.Table:
        """The latest result of rows ``start`` .. ``start + count - 1``, in row order, as
        SHARD_SCHEMA; read from the shards whose row range meets them. Every row must
        have one (RuntimeError otherwise: the caller checked the done mask)."""
        end = start + count
        parts = []
        for shard in self.shards:
            if shard.high >= start and shard.low < end:
                table = read_parquet(shard.path)
                rows = table.column("_row")
                inside = pc.and_(
                    pc.greater_equal(rows, arrays.int64(start)), pc.less(rows, arrays.int64(end))
                )
                keep = self.keep(shard.seq, rows)
                table = table.filter(inside if keep is None else pc.and_(inside, keep))
                parts.append(conform(table, SHARD_SCHEMA.names))
        if not parts:
            raise RuntimeError(f"no results for rows {start}..{end - 1}")
        found = pa.concat_tables(parts)
        del parts
        if found.num_rows != count:
            raise RuntimeError(f"rows {start}..{end - 1}: {found.num_rows} results for {count}")
        order = pc.sort_indices(found.column("_row"))
        # A column at a time, each dropped from ``found`` once taken: the block's results
        # are never held twice over.
        schema, columns = found.schema, []
        for name in schema.names:
            columns.append(found.column(name).take(order))
            found = found.drop_columns([name])
        return pa.Table.from_arrays(columns, schema=schema)


def _present(path: Path, names: list[str]) -> list[str]:
    have = set(pq.read_schema(path).names)
    return [name for name in names if name in have]


def conform(table: pa.Table, names: list[str]) -> pa.Table:
    """``names`` of a shard, typed as SHARD_SCHEMA; columns an older batchq did not write
    are nulls."""
    for name in names:
        if name not in table.column_names:
            field = SHARD_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(names).cast(pa.schema([SHARD_SCHEMA.field(n) for n in names]))
