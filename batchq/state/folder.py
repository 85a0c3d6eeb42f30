"""The state folder ``<output>.batchq/``: a manifest and append-only result shards.

    manifest.json          what the results belong to: the input's digest and row count,
                           and the request settings that change answers
    lock                   held (flock) by the running process
    shards/000001.parquet  finished rows (SHARD_SCHEMA), each shard written atomically:
                           temp file, fsync, rename, fsync of the folder

A crash at any instant leaves only whole shards. A row may appear in several shards
(``--retry-errors`` answers it again); the shard with the highest number wins.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchq.config import Job, RequestSettings
from batchq.errors import RunStopped, UsageError
from batchq.io.preflight import ROW_COLUMN, InputInfo
from batchq.io.schema import FEW_VALUES, RAW, RESULT_SCHEMA, SHARD_SCHEMA
from batchq.money.pricing import region_of

__all__ = [
    "RowMask",
    "StateDir",
    "check_same_job",
    "manifest_for",
    "read_parquet",
    "write_atomic",
]

VERSION = 1


def manifest_for(job: Job, info: InputInfo, *, command: str | None = None) -> dict[str, Any]:
    """What a state folder records about the job it belongs to: what its results answer
    (compared on resume), and for ``status`` / ``cost`` the price region and the command
    that resumes it."""
    r = job.request
    return {
        "version": VERSION,
        "region": region_of(r.provider),
        "command": command,
        "input": str(info.path),
        "input_digest": info.digest,
        "input_rows": info.total_rows,
        "id_column": info.id_column,
        "endpoint": _endpoint_of(r),
        "request": {
            "model": r.model,
            "system": r.system,
            "template": r.template,
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            "params": r.params,
        },
    }


def _endpoint_of(request: RequestSettings) -> dict[str, Any]:
    """Where a job's answers come from: part of what its results belong to. The simulator
    is one endpoint whatever its port; a real endpoint is its provider and base URL."""
    return {
        "provider": request.provider,
        "base_url": None if request.simulated else request.url,
        "simulated": request.simulated,
    }


class StateDir:
    """One job's checkpoint folder, locked by this process while open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shards = path / "shards"
        self._lock: int | None = None
        self._next_seq: int | None = None
        self.notes: list[str] = []  # what opening it did that the run should say

    @classmethod
    def open(
        cls, job: Job, info: InputInfo, *, restart: bool = False, command: str | None = None
    ) -> StateDir:
        """Open (creating, or checking against the job) and lock the job's state folder."""
        state = cls(job.state_dir)
        try:
            state.shards.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot make the state folder {state.path}: {e.strerror}; "
                             "choose another --output") from None  # fmt: skip
        state._acquire_lock()
        try:
            state._check_manifest(manifest_for(job, info, command=command), job, restart=restart)
            state.notes = state.set_aside_damaged()
        except BaseException:
            state.close()
            raise
        return state

    def _check_manifest(self, wanted: dict[str, Any], job: Job, *, restart: bool) -> None:
        manifest = self.path / "manifest.json"
        if manifest.exists() and restart:
            self.clear()
        elif manifest.exists():
            check_same_job(orjson.loads(manifest.read_bytes()), wanted, job)
        if not manifest.exists():
            text = orjson.dumps(wanted, option=orjson.OPT_INDENT_2)
            write_atomic(manifest, lambda f: f.write(text))

    def _acquire_lock(self) -> None:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"another batchq process (pid {holder})" if holder else "another batchq process"
            raise UsageError(
                f"{who} is running this job, using {self.path}: wait for it to finish "
                "(or stop it) first; its rows are being sent, and would be paid twice"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def close(self) -> None:
        """Unlock. The pid goes from the lock file: one left there names a process that
        died holding it (``status`` says it crashed)."""
        if self._lock is not None:
            os.ftruncate(self._lock, 0)
            os.close(self._lock)
            self._lock = None

    def clear(self) -> None:
        """Forget every finished row (``--restart``)."""
        for shard in self.shard_paths():
            shard.unlink()
        self._next_seq = None
        (self.path / "manifest.json").unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the folder (after a verified merge)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def shard_paths(self) -> list[Path]:
        """Whole shards in the order they were written (temp files are ignored)."""
        return sorted(self.shards.glob("[0-9]*.parquet"))

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
            notes.append(f"the state folder's shard {path} cannot be read ({reason}): moved "
                         f"aside to {aside.name}; its rows will be sent again")  # fmt: skip
        return notes

    def done_mask(self, total_rows: int, *, retry_errors: bool = False) -> RowMask:
        """Set where a finished result is on disk (``ok`` only, with ``retry_errors``).
        Reads just the ``_row`` and ``status`` columns."""
        done = RowMask(total_rows)
        for _, table in self.iter_shards(columns=["_row", "status"]):
            rows = table.column("_row")
            if retry_errors:
                # A later shard may hold an error for a row an earlier one had ok: rows
                # flagged error are cleared so only their latest state counts.
                statuses = table.column("status").to_pylist()
                for row, status in zip(rows.to_pylist(), statuses, strict=True):
                    done[row] = status == "ok"
            else:
                for row in rows.to_pylist():
                    done[row] = True
        return done

    def iter_shards(self, *, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
        """``(sequence number, table)`` for every shard, oldest first."""
        for path in self.shard_paths():
            yield int(path.stem), read_parquet(path, columns)

    def write_shard(self, rows: list[dict[str, Any]]) -> Path:
        """Write finished rows as the next shard, atomically. RunStopped on a disk error."""
        return self._write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))

    def _write_table(self, table: pa.Table) -> Path:
        if self._next_seq is None:
            paths = self.shard_paths()
            self._next_seq = int(paths[-1].stem) + 1 if paths else 1
        path = self.shards / f"{self._next_seq:06d}.parquet"
        try:
            write_atomic(path, lambda f: pq.write_table(table, f, use_dictionary=_DICTIONARY))
        except OSError as e:
            raise RunStopped(
                f"cannot write to the state folder {self.path}: {e.strerror}. What was "
                "flushed before is safe: free some space or fix permissions, then rerun "
                "the same command to resume"
            ) from None
        self._next_seq += 1
        return path

    def adopt_output(self, output: Path, id_column: str | None) -> bool:
        """Take a finished output's results back as shards, for ``--retry-errors``.

        Returns False (and adopts nothing) when the output has no error rows.
        """
        statuses = read_parquet(output, ["status"]).column("status")
        if "error" not in statuses.to_pylist():
            return False
        file = pq.ParquetFile(output)
        has_raw = RAW.name in file.schema_arrow.names
        names = [id_column or ROW_COLUMN, *RESULT_SCHEMA.names, *([RAW.name] if has_raw else [])]
        start = 0
        for batch in file.iter_batches(batch_size=65_536, columns=names):
            table = pa.Table.from_batches([batch])
            ids = table.column(0).cast(pa.string())
            rows = pa.array(range(start, start + table.num_rows), pa.int64())
            raw = [] if has_raw else [pa.nulls(table.num_rows, pa.string())]
            columns = [rows, ids, *table.columns[1:], *raw]
            shard = pa.Table.from_arrays(columns, schema=SHARD_SCHEMA)
            self._write_table(shard)
            start += table.num_rows
        return True

    def max_attempts_by_row(self) -> dict[int, int]:
        """Attempts made so far for rows whose latest result is an error."""
        attempts: dict[int, int] = {}
        for _, table in self.iter_shards(columns=["_row", "status", "attempts"]):
            columns = (table.column(c).to_pylist() for c in ("_row", "status", "attempts"))
            for row, status, n in zip(*columns, strict=True):
                if status == "error":
                    attempts[row] = n or 0
                else:
                    attempts.pop(row, None)
        return attempts


class RowMask:
    """One bit a row: 1.25 MB for ten million rows, where a bytearray took 10 MB."""

    __slots__ = ("_bits", "_size")

    def __init__(self, size: int, *, value: bool = False) -> None:
        self._bits = bytearray(b"\xff" if value else b"\x00") * ((size + 7) // 8)
        self._size = size
        if value and size % 8:
            self._bits[-1] = (1 << size % 8) - 1

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> bool:
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    def __setitem__(self, i: int, value: bool) -> None:
        if value:
            self._bits[i >> 3] |= 1 << (i & 7)
        else:
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def __iter__(self) -> Iterator[bool]:
        return (self[i] for i in range(self._size))

    def count(self) -> int:
        """How many rows are set."""
        return int.from_bytes(self._bits, "little").bit_count()


#: A shard's columns worth a dictionary (see FEW_VALUES).
_DICTIONARY = [name for name in SHARD_SCHEMA.names if name in FEW_VALUES]


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (``columns`` of it). Not pq.read_table, which loads
    pyarrow.dataset the first time (+4 MB RSS) to read what ParquetFile reads alone."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)


def check_same_job(old: dict[str, Any] | None, new: dict[str, Any], job: Job) -> None:
    """Refuse, naming what changed, to mix results of ``old`` into a job that is ``new``."""
    if old is None:
        return
    _check_same_endpoint(old, new, job)
    changed = []
    if old.get("input_digest") != new["input_digest"]:
        changed.append(f"the input file ({old.get('input')} has changed)")
    for key, value in new["request"].items():
        if old.get("request", {}).get(key) != value:
            changed.append(f"{key} (was {old.get('request', {}).get(key)!r}, now {value!r})")
    if old.get("id_column") != new["id_column"] and not changed:
        changed.append("the id column")
    if changed:
        raise UsageError(
            f"{job.output} holds results of a different job; changed: {'; '.join(changed)}. "
            "Rerun with --restart to throw those results away and start over, "
            "or undo the change to resume"
        )


def _check_same_endpoint(old: dict[str, Any], new: dict[str, Any], job: Job) -> None:
    """Refuse to mix a rehearsal's answers with real ones, or one endpoint's with another's.
    (A manifest from before endpoints were recorded is taken as it is.)"""
    was, now = old.get("endpoint"), new["endpoint"]
    if was is None or was == now:
        return
    if was["simulated"]:
        problem = (f"{job.output} holds the simulator's answers (a --simulate rehearsal), "
                   f"not {now['provider']}'s")  # fmt: skip
    elif now["simulated"]:
        problem = f"{job.output} holds real answers from {was['base_url']}, not the simulator's"
    else:
        problem = (f"{job.output} holds answers from {was['base_url']} ({was['provider']}), "
                   f"not from {now['base_url']} ({now['provider']})")  # fmt: skip
    raise UsageError(
        f"{problem}; one output never mixes two endpoints' answers. Rerun with --restart "
        "to throw those answers away and send every row again, choose another --output, "
        "or undo the change to resume"
    )


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that a crash leaves either the old one or the whole new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
