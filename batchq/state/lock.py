"""The state folder's lock: one process at a time sends a job's rows.

The running process holds an exclusive flock on ``lock`` and writes its pid there; a
clean close empties it. The kernel drops a flock when its process dies, even by
``kill -9``, so a lock file nobody holds is stale whatever pid it names (``status``
says the run crashed).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from batchq.errors import UsageError

__all__ = ["Lock", "holder"]


class Lock:
    """The lock of one state folder, held by this process."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"another batchq process (pid {pid})" if pid else "another batchq process"
            raise UsageError(
                f"{who} is running this job, using {path.parent}: wait for it to finish "
                "(or stop it) first; its rows are being sent, and would be paid twice"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock, taking the pid out: one left there names a process that died holding it."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def holder(path: Path) -> tuple[bool, int | None]:
    """Whether a live process holds the lock at ``path``, and the pid written in it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            held = False
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return held, int(text) if text.isdigit() else None
