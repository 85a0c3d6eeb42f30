"""The exception tree. Each class says when it is raised and which exit code it maps to.

    BatchqError                    exit_code
    ├── UsageError                 2   bad flag, job file or setting; nothing sent
    │   └── InputError             2   bad input data, with file / line / column; nothing sent
    ├── RunStopped                 3   the run stopped itself (auth failure, disk error); resumable
    └── Interrupted              130   the user stopped the run (Ctrl-C, SIGTERM, a notebook's
                                       interrupt); resumable. Also a KeyboardInterrupt

Every message says what is wrong and what to do about it. None ever contains the API key.
"""

from __future__ import annotations

__all__ = ["BatchqError", "InputError", "Interrupted", "RunStopped", "UsageError"]


class BatchqError(Exception):
    """Base of every error batchq reports to the user."""

    exit_code = 1


class UsageError(BatchqError):
    """A flag, job file or setting is wrong. Raised before anything is sent."""

    exit_code = 2


class InputError(UsageError):
    """The input data is wrong. Raised before anything is sent.

    ``path``, ``line`` (1-based, JSONL) or ``row`` (0-based, Parquet or a frame's) and
    ``column`` say where; any of them may be None. ``reason`` is the message without
    them.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path, self.line, self.row, self.column = path, line, row, column
        self.reason = message
        where = [p for p in (path, _at("line", line), _at("row", row), _at("column", column)) if p]
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


def _at(label: str, value: object) -> str | None:
    return None if value is None else f"{label} {value}"


class RunStopped(BatchqError):
    """The run stopped on its own because going on could not help (401/403, disk full).

    The state folder is kept, so rerunning the same command resumes. ``http_status`` and
    ``error_code`` are the last answer's that stopped it, when an answer did.
    """

    exit_code = 3

    def __init__(
        self, message: str, *, http_status: int | None = None, error_code: str | None = None
    ) -> None:
        self.http_status, self.error_code = http_status, error_code
        super().__init__(message)


class Interrupted(BatchqError, KeyboardInterrupt):
    """The user interrupted the run. The state folder is kept; rerun to resume.

    A KeyboardInterrupt too, so that ``except KeyboardInterrupt`` (and Jupyter) see what
    it is."""

    exit_code = 130
