"""The allocator settings of batchq.memory take effect where glibc is the C library."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest

from batchq import memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


def _rss_anon_kb() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("RssAnon")).split()[1])


@glibc
def test_settings_are_taken() -> None:
    assert memory.few_arenas()
    assert memory.give_back()


@glibc
def test_give_back_returns_freed_heap_to_the_os() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 40 MB of 64 KiB blocks, below the mmap threshold so they come from the heap; the
    # last block stays allocated, so freeing the others leaves a hole free() keeps.
    blocks = [libc.malloc(64 * 1024) for _ in range(640)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:
        libc.free(block)
    before = _rss_anon_kb()
    memory.give_back()
    after = _rss_anon_kb()
    libc.free(blocks[-1])
    assert before - after > 30_000, (before, after)
