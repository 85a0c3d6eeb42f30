"""Files written whole and Parquet read lean: the two helpers below both the input side
(``io/``) and the state folder (``state/``)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["cannot_write", "disk_of", "free_bytes", "no_space", "read_parquet", "write_atomic"]


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that a crash leaves either the old one or the whole new one: a
    temp file beside it, fsync, rename over it, fsync of the folder. A write that fails
    (a full disk, an interrupt) removes its temp file: none is left filling the disk."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A folder gone or unwritable has no temp file left in it.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (``columns`` of it). Not pq.read_table, which loads
    pyarrow.dataset the first time (+4 MB RSS) to read what ParquetFile reads alone."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)


#: A write failed for want of room: the disk is full, or the user's quota is.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(error: OSError) -> bool:
    """Whether ``error`` says the disk (or the quota) is full."""
    return error.errno in _NO_SPACE


def cannot_write(error: OSError, path: Path, what: str) -> str:
    """What a failed write of ``what`` at ``path`` says: which disk is full, or what could
    not be written and why."""
    if no_space(error):
        return f"no space left on {disk_of(path)}"
    return f"cannot write {what}: {error.strerror}"


def disk_of(path: Path) -> Path:
    """The mount point ``path`` is on, as a person names the disk (``/mnt/data``)."""
    at = path.resolve()
    while not os.path.ismount(at) and at != at.parent:
        at = at.parent
    return at


def free_bytes(path: Path) -> int:
    """Bytes free on ``path``'s disk (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
