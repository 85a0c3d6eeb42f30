"""Writing to a person who may have gone: a pipe closed by its reader (``| head``), a
terminal that went away. What shows a run never stops it: output whose reader is gone
is switched off and its stream pointed at the null device (so that the interpreter's
last flush does not fail either), and the run goes on to its end and exit code."""

from __future__ import annotations

import errno
import os
from typing import IO, Any

__all__ = ["gone", "silence", "write_or_silence"]

#: The reader went away: a closed pipe, a lost terminal.
_GONE = frozenset({errno.EPIPE, errno.EIO})


def gone(error: OSError) -> bool:
    """Whether ``error`` says the stream's reader is gone."""
    return error.errno in _GONE


def silence(stream: IO[Any]) -> None:
    """Point ``stream``'s file at the null device: what is written to it from now on
    (and still buffered) goes nowhere, without an error."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stream.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):  # no file behind it (a test's buffer)
        pass


def write_or_silence(stream: IO[str], text: str) -> bool:
    """Write ``text`` (and flush); False, with ``stream`` silenced, when its reader is
    gone. Other errors are raised."""
    try:
        stream.write(text)
        stream.flush()
    except OSError as e:
        if not gone(e):
            raise
        silence(stream)
        return False
    return True
