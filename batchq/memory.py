"""How the process asks glibc's allocator to keep its footprint small.

Arrow's buffers come from malloc (``_entry`` picks Arrow's system pool), and glibc keeps
what is freed for reuse instead of handing it back to the OS, in one arena per thread
that allocated (up to eight per core). Two calls:

- ``few_arenas`` at start: Arrow's reader threads share two arenas instead of each
  keeping its own.
- ``give_back`` before the merge: hands back what sending freed (6-8 MB at 1M and 10M
  rows) and from then on serves blocks of 128 KiB and more straight from mmap, so each
  merge block's buffers go back to the OS when freed instead of fragmenting the heap.
  Not set from the start: preflight, which reads the input in 1 MB chunks, took 1.1 s
  instead of 0.8 s at 1M rows with the threshold fixed.

Peak RSS of a whole run against the simulator (bench/first_request.py --whole), before ->
after: 1M rows 134-137 -> 125 MB, 10M rows 157 -> 145 MB (with the writer's statistics
left off free text), 10k rows 121 -> 112 MB. Time to the first request unchanged.

On another C library (musl, macOS, Windows) both are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

__all__ = ["few_arenas", "give_back", "system_pool"]

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 128 * 1024


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc; mallopt's numbers above are glibc's.
    return libc if hasattr(libc, "gnu_get_libc_version") else None


_LIBC = _glibc()


def few_arenas() -> bool:
    """Cap malloc's arenas at ARENAS. Call before any thread starts (before pyarrow loads).

    True when the C library took the setting."""
    return _LIBC is not None and _LIBC.mallopt(_M_ARENA_MAX, ARENAS) == 1


def give_back() -> bool:
    """Return freed heap to the OS, and serve large blocks from mmap from now on. True
    when the C library took the threshold."""
    if _LIBC is None:
        return False
    applied = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    _LIBC.malloc_trim(0)
    return bool(applied)


@contextlib.contextmanager
def system_pool() -> Iterator[None]:
    """Arrow's system pool as its default while a Python API call runs, then the caller's
    again, where pyarrow was loaded before batchq could choose it (``batchq/__init__``).
    Each buffer keeps the pool it came from, so switching is safe. It helps less than
    choosing before pyarrow loads: a 50,000-row call over a LazyFrame peaked at 292 MB
    with mimalloc's pool, 277 MB switched so (mimalloc's own reserve stays)."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(before)
