"""How the input's columns are typed in the output.

Parquet input keeps its Arrow types. JSONL input is typed from what the whole file holds
(found by the preflight pass): integers, floats, booleans and strings become those types;
objects, lists and columns of mixed kinds are kept as JSON text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pyarrow as pa

from batchq import arrays

__all__ = ["ColumnKinds", "input_arrays"]


class _BigInt:
    """The kind of an integer outside int64: kept as JSON text."""


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NUMBERS = frozenset({int, float})


class ColumnKinds:
    """Which kinds (Python types) of JSON value each column holds, in first-seen column order.

    This runs on every row of the preflight pass, so it is one type() and one set.add a
    value; None adds NoneType, which does not decide a column's type.
    """

    def __init__(self) -> None:
        self.kinds: dict[str, set[type]] = {}

    def add(self, row: dict[str, Any]) -> None:
        kinds = self.kinds
        for name, value in row.items():
            seen = kinds.get(name)
            if seen is None:
                seen = kinds[name] = set()
            kind = type(value)
            if kind is int and not _INT64_MIN <= value <= _INT64_MAX:
                kind = _BigInt
            seen.add(kind)

    def arrow_type(self, name: str, *, text: bool = False) -> pa.DataType | None:
        """The column's Arrow type, or None when it is kept as JSON text. With ``text``
        (the id column), a column of mixed kinds or of integers past 64 bits is text,
        each value as its id reads (``x``, ``1``), not as JSON (``"x"``)."""
        kinds = self.kinds[name] - {type(None)}
        if kinds <= _NUMBERS:
            return pa.float64() if float in kinds else pa.int64()
        if kinds == {bool}:
            return pa.bool_()
        if kinds == {str} or text:
            return pa.string()
        return None


def input_arrays(
    rows: list[dict[str, Any]], columns: Iterable[tuple[str, pa.DataType | None]]
) -> list[pa.Array]:
    """Arrow arrays for JSONL rows, one per ``(name, type)``; type None means JSON text."""
    built = []
    for name, type_ in columns:
        values = [row.get(name) for row in rows]
        if type_ is None:
            built.append(arrays.array([_json_text(v) for v in values], pa.string()))
        else:
            try:
                built.append(arrays.array(values, type_))
            except (pa.ArrowInvalid, TypeError):  # an id column of mixed kinds (or past
                # 64 bits): each id as it reads
                texts = [None if v is None else str(v) for v in values]
                built.append(arrays.array(texts, type_))
    return built


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value).decode()
