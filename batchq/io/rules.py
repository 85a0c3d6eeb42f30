"""The input rules both preflight passes apply, in one place: which column is the id, which
input column clashes with the output, and the input's digest (what a resumed run's input
is checked against). The exact pass (``preflight.py``) reports a broken rule with where
it is broken; the fast path (``fastcheck.py``) leaves such an input to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from batchq.errors import InputError
from batchq.result import ANSWER_SCHEMA, RESULT_COLUMNS

__all__ = ["ROW_COLUMN", "Digest", "check_clash", "default_id_column", "digest_and_lines"]

#: The column written when the input has no id column: the row's 0-based position.
ROW_COLUMN = "row"


def default_id_column(names: Iterable[str], *, batch_lines: bool) -> str | None:
    """The id column when the job names none: ``custom_id`` for Batch-API lines, else
    ``id`` if the input has it, else None (rows are known by their position)."""
    if batch_lines:
        return "custom_id"
    return "id" if "id" in names else None


def check_clash(
    columns: Iterable[str], id_column: str | None, path: Path, *, answers: bool = False
) -> None:
    """InputError for an input column the output would write again (``model`` excepted:
    it is the requested model; the answer's columns only where the job has [answer]:
    ``answers``), or a ``row`` column where batchq writes the position."""
    names = list(columns)
    written = RESULT_COLUMNS | (set(ANSWER_SCHEMA.names) if answers else set())
    for name in names:
        if name in written and name != "model":
            raise InputError(
                f"the input column {name!r} clashes with the output column of that name: "
                "rename it in the input",
                path=str(path),
                column=name,
            )
    if id_column is None and ROW_COLUMN in names:
        raise InputError(
            f"the input has a {ROW_COLUMN!r} column but no id column, and batchq writes the "
            f"row number as {ROW_COLUMN!r}: set id_column (or --id-column) to a unique column",
            path=str(path),
            column=ROW_COLUMN,
        )


class Digest:
    """The input's digest (SHA-256 of its bytes, 32 hex digits) and its number of lines (a
    last line without a newline counts), fed the bytes in order by whoever reads them."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._lines = 0
        self._last = b"\n"

    def update(self, chunk: bytes, end: int | None = None) -> None:
        """Feed ``chunk``, or its first ``end`` bytes."""
        end = len(chunk) if end is None else end
        if end:
            self._sha.update(memoryview(chunk)[:end])
            self._lines += chunk.count(b"\n", 0, end)
            self._last = chunk[end - 1 : end]

    def result(self) -> tuple[str, int]:
        return self._sha.hexdigest()[:32], self._lines + (self._last != b"\n")


def digest_and_lines(path: Path) -> tuple[str, int]:
    """The file's Digest, read from disk."""
    digest = Digest()
    with path.open("rb") as f:
        while chunk := f.read(4 * 1024**2):
            digest.update(chunk)
    return digest.result()
