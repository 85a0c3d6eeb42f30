"""The exception tree. Each class says when it is raised and which exit code it maps to.

    BatchqError                    exit_code
    ├── UsageError                 2   bad flag, job file or setting; nothing sent
    │   └── InputError             2   bad input data, with file / line / column; nothing sent
    │       └── EmptyInput         2   the input has no row (``batchq.run``: an empty result)
    ├── RunStopped                 3   the run stopped itself (auth failure, disk error); resumable
    └── Interrupted              130   the user stopped the run (Ctrl-C, SIGTERM, a notebook's
                                       interrupt); resumable. Also a KeyboardInterrupt

Every message says what is wrong and what to do about it. None ever contains the API key.
"""

from __future__ import annotations

__all__ = ["BatchqError", "EmptyInput", "InputError", "Interrupted", "RunStopped", "UsageError"]


class BatchqError(Exception):
    """Base of every error batchq reports to the user."""

    exit_code = 1


class UsageError(BatchqError):
    """A flag, job file or setting is wrong. Raised before anything is sent."""

    exit_code = 2


class InputError(UsageError):
    """The input data is wrong. Raised before anything is sent.

    ``path``, ``line`` (1-based, JSONL) or ``row`` (0-based: a Parquet file's row, or a
    frame's when ``frame``) and ``column`` say where; any of them may be None. ``reason``
    is the message without them; ``also`` is where the row it clashes with is (a
    duplicate id's first row), as ``{"line": n}`` or ``{"row": i}``.

    The message counts as a person does: a file's row 0 is "row 1", as its line 1 is
    "line 1"; a frame's row is named by its index ("row index 0"), as pandas and polars
    name it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        row: int | None = None,
        column: str | None = None,
        also: dict[str, int] | None = None,
        frame: bool = False,
    ) -> None:
        self.path, self.line, self.row, self.column = path, line, row, column
        self.reason, self.also, self.frame = message, also, frame
        where = [
            p
            for p in (
                path,
                place(line=line, row=row, frame=frame),
                None if column is None else f"column {column}",
            )
            if p
        ]
        if also is not None:
            message += f" (the first is at {place(**also, frame=frame)})"
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


def place(*, line: int | None = None, row: int | None = None, frame: bool = False) -> str | None:
    """Where a row is, as a person reads it: ``line 3``, ``row 3`` (a file's row 2), or
    ``row index 2`` (a frame's)."""
    if line is not None:
        return f"line {line}"
    if row is not None:
        return f"row index {row}" if frame else f"row {row + 1}"
    return None


class EmptyInput(InputError):
    """The input has no row. The command line refuses it (exit 2); ``batchq.run`` hands
    back an empty frame with the output's columns, as a library does."""


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
