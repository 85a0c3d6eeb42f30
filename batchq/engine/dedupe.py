"""``dedupe = true``: each distinct request body is sent once; the rows repeating it take
its answer (``via = "dedupe"``, ``attempts = 0``, costing nothing).

A first pass hashes every row's body (64 bits, into the bounded-memory RepeatFinder that
checks ids) to learn which bodies repeat at all; only those are remembered while the
run feeds its rows, so memory grows with the repeated bodies, not the rows. Of each
repeated body the first row is its *leader*: sent (or, resumed, already answered); the
others are its *copies*, never sent, filled from the leader's latest result once
sending is over. A second, independent 64-bit hash of the body guards each copy against
a collision of the first. A run stopped before the copies are filled leaves them
pending: the next run finds their leaders answered and fills them, sending nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from batchq.config import Job
from batchq.io.keys import RepeatFinder
from batchq.io.preflight import InputInfo
from batchq.io.reader import read_batches
from batchq.result import SHARD_SCHEMA, Result
from batchq.send.request import build_body
from batchq.state import StateDir

__all__ = ["Dedupe", "body_keys"]

#: Copies written a shard at a time.
COPY_SHARD = 10_000


def body_keys(body: dict[str, Any]) -> tuple[int, int]:
    """Two independent signed 64-bit hashes of a request body (its JSON, keys sorted)."""
    digest = hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=16)
    raw = digest.digest()
    return int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(
        raw[8:], "little", signed=True
    )


@dataclass
class Dedupe:
    """Which rows lead a repeated body, and which copy whose answer."""

    repeated: set[int]
    #: repeated body's first key -> (its leader's row, the body's second key)
    leaders: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: leader row -> the rows that take its answer: (row, id)
    copies: dict[int, list[tuple[int, str]]] = field(default_factory=dict)

    @classmethod
    def scan(cls, job: Job, info: InputInfo) -> Dedupe:
        """Read the input once: the bodies that occur more than once."""
        finder = RepeatFinder()
        for _, body in _bodies(job, info):
            finder.add(body_keys(body)[0])
        return cls(finder.repeated(limit=None))

    def sends(self, index: int, ident: str, body: dict[str, Any], *, done: bool) -> bool:
        """Whether row ``index`` (``done`` or not) is sent: True for the first row of its
        body (its leader), False for a copy, which (unless done already) is recorded to be
        filled from its leader's answer."""
        first, second = body_keys(body)
        if first not in self.repeated:
            return True
        leader = self.leaders.get(first)
        if leader is None:
            self.leaders[first] = (index, second)
            return True
        if leader[1] != second:  # a collision of the first hash: not the same body
            return True
        if not done:
            self.copies.setdefault(leader[0], []).append((index, ident))
        return False

    @property
    def pending(self) -> int:
        return sum(len(rows) for rows in self.copies.values())

    def fill(self, state: StateDir) -> int:
        """Write each copy's result from its leader's latest one; how many. A leader
        without a result yet (the run stopped first) leaves its copies pending."""
        written = 0
        batch: list[Result] = []
        for leader in self._leaders(state):
            for row, ident in self.copies.get(leader.row, ()):
                batch.append(_copy(leader, row, ident))
                if len(batch) >= COPY_SHARD:
                    written += len(batch)
                    state.write(batch)
                    batch = []
        if batch:
            written += len(batch)
            state.write(batch)
        return written

    def _leaders(self, state: StateDir) -> Iterator[Result]:
        wanted = set(self.copies)
        names = [n for n in SHARD_SCHEMA.names if n != "_row"]
        for table in state.latest(names):
            rows = table.column("_row").to_pylist()
            if not wanted.intersection(rows):
                continue
            for values in table.to_pylist():
                if values["_row"] in wanted:
                    row, ident = values.pop("_row"), values.pop("_id")
                    yield Result(row=row, id=ident, **values)


def _copy(leader: Result, row: int, ident: str) -> Result:
    return replace(
        leader, row=row, id=ident, via="dedupe", attempts=0, reasks=0, latency_ms=None, ttft_ms=None
    )


def _bodies(job: Job, info: InputInfo) -> Iterator[tuple[int, dict[str, Any]]]:
    for batch in read_batches(info.path):
        for i, row in enumerate(batch.rows):
            yield batch.start + i, build_body(row, job.request)
