"""Find repeated int64 keys (id hashes) among many, in bounded memory.

Up to ``memory_keys`` keys are held and sorted in memory (Arrow's sort: 24 bytes a key
at its peak, 6 MB for the default 262,144). Past that they spill to a temporary file,
already split into FANOUT partitions by their low bits (each spill writes one run per
partition and notes where), and the check reads back, sorts and compares one partition
at a time: ten million ids take the memory of about 160,000 and a temporary file of
80 MB read once. A partition still too large is checked in slices by its next bits.
"""

from __future__ import annotations

import re
import tempfile
from array import array
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from batchq import arrays

__all__ = ["RepeatFinder", "TextKeys"]

MEMORY_KEYS = 1 << 18
MAX_REPEATS = 1000
FANOUT_BITS = 6
FANOUT = 1 << FANOUT_BITS


class RepeatFinder:
    """Collects int64 keys; ``repeated()`` gives those seen more than once."""

    def __init__(self, *, memory_keys: int = MEMORY_KEYS) -> None:
        self._memory_keys = memory_keys
        self._held: list[pa.Array] = []
        self._held_count = 0
        self._pending = array("q")
        self._spill: BinaryIO | None = None
        self._runs: list[list[tuple[int, int]]] = [[] for _ in range(FANOUT)]  # (at, keys)

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
        if self._held_count >= self._memory_keys:
            self._spill_held()

    def _spill_held(self) -> None:
        """Write the held keys to the spill file, grouped by partition."""
        if self._spill is None:
            self._spill = tempfile.TemporaryFile()  # noqa: SIM115 (closed in repeated())
        keys = pa.concat_arrays(self._held) if self._held else arrays.int64s([])
        self._held, self._held_count = [], 0
        parts = pc.bit_wise_and(keys, arrays.int64(FANOUT - 1))
        keys = keys.take(pc.array_sort_indices(parts))  # a counting sort: 64 values
        counts = {c["values"]: c["counts"] for c in pc.value_counts(parts).to_pylist()}
        offset = 0
        for part in range(FANOUT):
            if n := counts.get(part, 0):
                self._runs[part].append((self._spill.tell(), n))
                self._spill.write(_bytes(keys.slice(offset, n)))
                offset += n

    def repeated(self, *, limit: int | None = MAX_REPEATS) -> set[int]:
        """The keys seen more than once (at most ``limit`` of them, None: all)."""
        self._flush_pending()
        if self._spill is None:
            return _repeats(self._held, limit)
        try:
            self._spill_held()
            found: set[int] = set()
            for part in range(FANOUT):
                found |= self._partition_repeats(part, limit)
                if limit is not None and len(found) >= limit:
                    break
            return found
        finally:
            self._spill.close()
            self._spill = None

    def _partition_repeats(self, part: int, limit: int | None) -> set[int]:
        slices = 1
        while sum(n for _, n in self._runs[part]) / slices > self._memory_keys:
            slices *= 2
        if slices == 1:
            return _repeats(list(self._read(part)), limit)
        found: set[int] = set()
        for s in range(slices):  # the partition read once a slice: still bounded memory
            keys = []
            for run in self._read(part):
                bits = pc.bit_wise_and(
                    pc.shift_right(run, arrays.int64(FANOUT_BITS)),
                    arrays.int64(slices - 1),
                )
                keys.append(run.filter(pc.equal(bits, arrays.int64(s))))
            found |= _repeats(keys, limit)
        return found

    def _read(self, part: int) -> list[pa.Array]:
        assert self._spill is not None
        runs = []
        for at, n in self._runs[part]:
            self._spill.seek(at)
            data = self._spill.read(8 * n)
            runs.append(pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(data)]))
        return runs


def _bytes(keys: pa.Array) -> bytes:
    data: bytes = keys.buffers()[1].to_pybytes()
    return data[keys.offset * 8 : (keys.offset + len(keys)) * 8]


def _repeats(parts: list[pa.Array], limit: int | None) -> set[int]:
    keys = pa.concat_arrays(parts) if parts else arrays.int64s([])
    n = len(keys)
    if n < 2:
        return set()
    ordered = pc.take(keys, pc.array_sort_indices(keys))
    same = pc.equal(ordered.slice(1), ordered.slice(0, n - 1))
    if not pc.any(same).as_py():
        return set()
    return set(ordered.slice(1).filter(same)[:limit].to_pylist())


class TextKeys:
    """One int64 key for each text id, the same for the same id in whichever batch it is:
    an id that is the prefix of the first id seen followed by up to 15 digits (``r17``,
    ``row-000017``: most ids) is keyed in Arrow by its digits' value and count; any other by
    Python's hash of its text (a Python loop, 4x as slow). Two ids may share a key (the
    caller then looks at the ids themselves); one id never gets two."""

    _DIGITS = 15  # 10**15 < 2**50: the count of digits goes in the bits above

    def __init__(self) -> None:
        self._pattern: re.Pattern[str] | None = None

    def keys(self, ids: pa.Array) -> pa.Array:
        if self._pattern is None:
            prefix = str(ids[0].as_py()).rstrip("0123456789") if len(ids) else ""
            self._pattern = re.compile(f"{re.escape(prefix)}(?P<digits>[0-9]{{1,{self._DIGITS}}})")
        digits = pc.extract_regex(ids, f"^{self._pattern.pattern}$")  # null where it differs
        if digits.null_count == 0:
            d = digits.field("digits")
            count = pc.cast(pc.utf8_length(d), pa.int64())
            return pc.add(pc.cast(d, pa.int64()), pc.shift_left(count, arrays.int64(50)))
        return arrays.int64s(map(self._key, ids.to_pylist()))

    def _key(self, text: str) -> int:
        assert self._pattern is not None
        if match := self._pattern.fullmatch(text):
            digits = match["digits"]
            return int(digits) + (len(digits) << 50)
        return hash(text)
