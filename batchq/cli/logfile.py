"""``--log-file``: one JSON line per notable event, for later analysis.

Logged: the run's start and end, notices, every retry (with its reason, HTTP status and
Retry-After), every slowdown, every flush, every row recorded as an error. Rows answered
``ok`` are not logged (the output holds them). Each line is redacted of the API key and of
anything shaped like one before it is written.

    {"t": "2026-11-27T08:01:02.345Z", "event": "retry", "row": "r17", "attempt": 1,
     "http_status": 429, "reason": "limit_requests", "delay_s": 1.0, "retry_after": 1.0}
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchq.cli.streams import write_or_silence
from batchq.errors import UsageError
from batchq.events import (
    Checking,
    Event,
    Flushed,
    Notice,
    Reasking,
    Retrying,
    RowFinished,
    RunFinished,
    RunStarted,
    Slowdown,
    Speedup,
    Tick,
)
from batchq.send.client import redact

__all__ = ["JsonLog"]

_NAMES: dict[type, str] = {
    RunStarted: "run_started",
    Notice: "notice",
    Retrying: "retry",
    Reasking: "reask",
    Slowdown: "slowdown",
    Speedup: "speedup",
    Flushed: "flush",
    RowFinished: "row_error",
    RunFinished: "run_finished",
}


class JsonLog:
    """A sink appending JSON lines to ``path``. Use ``close()`` when the run is over."""

    def __init__(self, path: Path, *, api_key: str | None) -> None:
        try:
            self._file: BinaryIO = path.open("ab")
        except OSError as e:
            raise UsageError(f"cannot write the log file {path}: {e.strerror}") from None
        self._key, self._path, self._failed = api_key, path, False

    def __call__(self, event: Event) -> None:
        if (isinstance(event, RowFinished) and event.status == "ok") or isinstance(
            event, Tick | Checking
        ):
            return  # the log holds what happened, not every row or second
        name = _NAMES[type(event)]
        if isinstance(event, RowFinished) and event.status == "invalid":
            name = "row_invalid"
        record: dict[str, Any] = {"t": _now(), "event": name}
        if isinstance(event, RowFinished):
            record |= {
                "row": event.row_id,
                "attempts": event.attempts,
                "http_status": event.http_status,
                "error_code": event.error_code,
                "error_message": event.error_message,
            }
        elif isinstance(event, Retrying | Reasking):
            record |= {"row": event.row_id, **_fields(event, exclude={"row_id"})}
        elif isinstance(event, RunFinished):
            record |= _fields(event.summary)
        else:
            record |= _fields(event)
        self._write(record)

    def stopped(self, error: BaseException, exit_code: int) -> None:
        """Record why the run ended early (auth failure, disk error, bad input, Ctrl-C)."""
        self._write(
            {"t": _now(), "event": "run_stopped", "exit_code": exit_code, "message": str(error)}
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self._failed:
            return
        line = orjson.dumps(record, default=str).decode()
        try:
            self._file.write(redact(line, self._key).encode() + b"\n")
            self._file.flush()
        except OSError as e:  # a full disk: the log stops, the run goes on
            self._failed = True
            write_or_silence(
                sys.stderr,
                f"the log file {self._path} could not be written "
                f"({e.strerror}): logging stops here, the run goes on\n",
            )

    def close(self) -> None:
        # What was left to flush may not fit: that was said at the first failure.
        with contextlib.suppress(OSError):
            self._file.close()


def _fields(obj: Any, *, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in exclude}


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
