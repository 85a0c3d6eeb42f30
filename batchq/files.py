"""Files written whole and Parquet read lean: the two helpers below both the input side
(``io/``) and the state folder (``state/``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["read_parquet", "write_atomic"]


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that a crash leaves either the old one or the whole new one: a
    temp file beside it, fsync, rename over it, fsync of the folder."""
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


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (``columns`` of it). Not pq.read_table, which loads
    pyarrow.dataset the first time (+4 MB RSS) to read what ParquetFile reads alone."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)
