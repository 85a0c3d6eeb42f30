"""Repeated keys among many, in memory and spilled to disk partition by partition."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from batchq.io.keys import RepeatFinder, TextKeys


@pytest.mark.parametrize("memory_keys", [1 << 20, 1000, 100])  # held; spilled; in slices
def test_repeats_are_found_held_or_spilled(memory_keys: int) -> None:
    rng = random.Random(4)
    keys = list({rng.randrange(-(2**63), 2**63) for _ in range(20_000)})[:19_990]
    keys += [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # sequential ids land in every partition
    finder = RepeatFinder(memory_keys=memory_keys)
    for key in keys[:7_000]:
        finder.add(key)
    finder.add_array(pa.array(keys[7_000:], pa.int64()).slice(10))  # an offset slice
    for key in keys[7_000:7_010]:
        finder.add(key)
    assert finder.repeated() == set()

    twice = RepeatFinder(memory_keys=memory_keys)
    twice.add_array(pa.array(keys, pa.int64()))
    for key in (keys[5], keys[19_999], keys[12_345]):
        twice.add(key)
    assert twice.repeated() == {keys[5], keys[19_999], keys[12_345]}


def test_nothing_and_one_key() -> None:
    assert RepeatFinder().repeated() == set()
    one = RepeatFinder()
    one.add(3)
    assert one.repeated() == set()


def test_a_text_id_has_one_key_in_whichever_batch_it_is() -> None:
    """Ids of the first id's form are keyed in Arrow, others by their hash: the same id
    must get the same key either way, or a repeat across batches would be missed."""
    keys = TextKeys()
    plain = ["row-1", "row-01", "row-2", "row-10", "row-000000000000001"]
    mixed = ["row-2", "x", "row-01", "row-٣", "row-1", "row-", "row-1234567890123456"]
    first = dict(zip(plain, keys.keys(pa.array(plain)).to_pylist(), strict=True))
    again = dict(zip(mixed, keys.keys(pa.array(mixed)).to_pylist(), strict=True))
    assert len(set(first.values())) == len(plain)  # zero padding is another id
    for id_ in set(plain) & set(mixed):
        assert first[id_] == again[id_]
    finder = RepeatFinder()
    finder.add_array(keys.keys(pa.array(plain)))
    finder.add_array(keys.keys(pa.array(mixed)))
    assert len(finder.repeated()) == 3  # row-1, row-01, row-2
