"""batchq.arrays builds what pa.array / pa.scalar would, for the values batchq converts."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from batchq import arrays

CASES = [
    ([1, None, -(2**63), 2**63 - 1], pa.int64()),
    ([1, 2, None], pa.int32()),
    ([1, 2.5, None, 1e308], pa.float64()),
    (["a", None, 'é 世界 \n " \\ \u2028', ""], pa.string()),
    ([True, False, None], pa.bool_()),
    ([["a", None], None, []], pa.list_(pa.string())),
    ([], pa.string()),
]


@pytest.mark.parametrize(("values", "type_"), CASES)
def test_array_is_pa_array(values: list[Any], type_: pa.DataType) -> None:
    assert arrays.array(values, type_).equals(pa.array(values, type_))


def test_table_holds_its_schema_and_every_row() -> None:
    schema = pa.schema([("n", pa.int64()), ("s", pa.string()), ("l", pa.list_(pa.string()))])
    columns = {"n": [1, None], "s": ["x" * 3_000_000, None], "l": [None, ["y"]]}  # one long line
    table = arrays.table(columns, schema)
    assert table.schema == schema
    assert table.to_pydict() == columns


def test_scalars_and_ints() -> None:
    assert arrays.int64s(range(3)).equals(pa.array([0, 1, 2], pa.int64()))
    assert arrays.int64s([]).equals(pa.array([], pa.int64()))
    assert arrays.int64(7) == pa.scalar(7, pa.int64())
    assert arrays.int32(7) == pa.scalar(7, pa.int32())
    assert arrays.float64(0.5) == pa.scalar(0.5, pa.float64())
    assert arrays.text("ok") == pa.scalar("ok", pa.string())
    assert arrays.boolean(False) == pa.scalar(False, pa.bool_())
    assert arrays.scalar(3, pa.int32()).type == pa.int32()


def test_values_of_another_kind_are_refused() -> None:
    # (schema.py then writes each as text: an id column of mixed kinds)
    with pytest.raises(pa.ArrowInvalid):
        arrays.array([1, "x"], pa.string())
    with pytest.raises(TypeError):
        arrays.array([2**64], pa.string())
