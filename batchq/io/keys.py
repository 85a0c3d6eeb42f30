"""Find repeated int64 keys (id hashes) among many, in bounded memory.

Up to ``memory_keys`` keys are held and sorted in memory (Arrow's sort: 24 bytes a key
at its peak). Past that they spill to a temporary file, and the check goes partition by
partition: keys whose low bits are ``p`` are read back, sorted and compared, for each of
enough partitions that one fits in memory. So ten million ids take the memory of about
one million, and a temporary file of 80 MB.
"""

from __future__ import annotations

import tempfile
from array import array
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["RepeatFinder"]

MEMORY_KEYS = 1 << 20
MAX_REPEATS = 1000


class RepeatFinder:
    """Collects int64 keys; ``repeated()`` gives those seen more than once."""

    def __init__(self, *, memory_keys: int = MEMORY_KEYS) -> None:
        self._memory_keys = memory_keys
        self._held: list[pa.Array] = []
        self._held_count = 0
        self._pending = array("q")
        self._spill: BinaryIO | None = None
        self._total = 0

    def add(self, key: int) -> None:
        """One key (the exact pass, a row at a time)."""
        self._pending.append(key)
        if len(self._pending) >= 65_536:
            self._flush_pending()

    def add_array(self, keys: pa.Array) -> None:
        """Many keys at once (the fast path, a column at a time)."""
        self._hold(keys.cast(pa.int64()))

    def _flush_pending(self) -> None:
        if self._pending:
            n = len(self._pending)
            self._hold(pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(self._pending)]))
            self._pending = array("q")

    def _hold(self, keys: pa.Array) -> None:
        self._held.append(keys)
        self._held_count += len(keys)
        self._total += len(keys)
        if self._held_count >= self._memory_keys:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile()  # noqa: SIM115 (closed in repeated())
            for held in self._held:
                self._spill.write(_bytes(held))
            self._held, self._held_count = [], 0

    def repeated(self, *, limit: int | None = MAX_REPEATS) -> set[int]:
        """The keys seen more than once (at most ``limit`` of them, None: all)."""
        self._flush_pending()
        if self._spill is None:
            return _repeats(self._held, limit)
        try:
            for held in self._held:
                self._spill.write(_bytes(held))
            self._held = []
            partitions = 1
            while self._total / partitions > self._memory_keys:
                partitions *= 2
            found: set[int] = set()
            for part in range(partitions):
                found |= _repeats(list(self._read_partition(part, partitions)), limit)
                if limit is not None and len(found) >= limit:
                    break
            return found
        finally:
            self._spill.close()
            self._spill = None

    def _read_partition(self, part: int, partitions: int) -> list[pa.Array]:
        assert self._spill is not None
        self._spill.seek(0)
        keys = []
        while chunk := self._spill.read(8 * 65_536):
            values = pa.Array.from_buffers(pa.int64(), len(chunk) // 8, [None, pa.py_buffer(chunk)])
            mine = pc.equal(pc.bit_wise_and(values, partitions - 1), part)
            keys.append(values.filter(mine))
        return keys


def _bytes(keys: pa.Array) -> bytes:
    data: bytes = keys.buffers()[1].to_pybytes()
    return data[keys.offset * 8 : (keys.offset + len(keys)) * 8]


def _repeats(parts: list[pa.Array], limit: int | None) -> set[int]:
    keys = pa.concat_arrays(parts) if parts else pa.array([], pa.int64())
    n = len(keys)
    if n < 2:
        return set()
    ordered = pc.take(keys, pc.array_sort_indices(keys))
    same = pc.equal(ordered.slice(1), ordered.slice(0, n - 1))
    if not pc.any(same).as_py():
        return set()
    return set(ordered.slice(1).filter(same)[:limit].to_pylist())
