"""The Ray engine's actors: one pacing actor for the run, and its sending workers.

    driver ──put(items)──▶ Sender × N ──book / learn / reserve──▶ Pacing (one per run)
       ◀──drain: finished rows, events──┘        └─ journal ▶ state folder (own shards)

``Pacing`` holds the run's rate state (the local engine's :class:`RatePacer`: QPS, QPM,
TPM, the ceiling learned from 429s, told from noise) and its budget. A sender books its
send times a chunk at a time (a GCRA timeline, one call per chunk of at most CHUNK and
CHUNK_SPAN_S of it), and only when it has used the last; it reports what each request
came to, and a cut or a raise voids the times it holds. Concurrency is the run's,
split among the senders.

A ``Sender`` runs the local engine's per-row work (``engine.work``) for the rows the
driver puts to it, journals them into its own shard series at least once a second, and
flushes before it reports a row to the driver as finished. It watches its driver: when
the driver's process is gone (same machine) or silent for OWNER_SILENT_S (another
machine), it flushes what it has and exits, sending nothing more.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from batchq.answer import Checker
from batchq.config import Job, Limits
from batchq.engine.context import Counts
from batchq.engine.live import (
    ROWS_PER_SLOT,
    STOP_GRACE_S,
    Journal,
    finished_event,
    first_batchq_error,
)
from batchq.engine.ray_cluster import awaited
from batchq.engine.work import Channel, EndpointWatch, Item, QuotaWatch, send_row
from batchq.errors import BatchqError, RunStopped
from batchq.events import Event, Flushed
from batchq.money.budget import Budget, Hold
from batchq.money.pricing import Price
from batchq.send.ceiling import Settled
from batchq.send.client import Client
from batchq.send.limiter import FIRST_COMPLETION_GUESS, RECHECK_S, RatePacer
from batchq.state import StateDir

__all__ = ["CHUNK", "Owner", "Pacing", "Report", "Sender", "SenderSetup"]

#: Send times a sender books at once, at most, and the span of the timeline one chunk
#: covers: at a high rate one call books CHUNK; at a low one, CHUNK_SPAN_S of it.
CHUNK, CHUNK_SPAN_S = 32, 0.1
#: A booked time this far past when it is taken is dropped (its slot was busy): sending
#: it late would be a burst.
STALE_S = 0.05
#: How often a sender reports what its requests came to, and looks at its driver.
REPORT_EVERY_S, WATCH_EVERY_S = 0.05, 0.25
#: A driver on another machine not heard from for this long is taken for dead.
OWNER_SILENT_S = 2.0


class Pacing:
    """The run's one pacer and budget, for every sender (see the module doc)."""

    def __init__(self, limits: Limits, budget: tuple[float, float, str] | None) -> None:
        self._events: list[Event] = []
        self._pacer = RatePacer(limits, clock=time.time, emit=self._emit)
        self._budget = Budget(*budget) if budget is not None else None

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def book(self, count: int, tokens: int) -> tuple[list[float], int]:
        """Up to ``count`` send times (wall clock) of ``tokens`` each, and the pacer's
        changes so far (a time booked before a later change is void)."""
        times = self._pacer.book(count, tokens, span_s=CHUNK_SPAN_S)
        return times, self._pacer.changes

    def learn(self, sent: list[float], outcomes: list[tuple[int, Settled]]) -> int:
        """When requests went out, and what requests came to; the pacer's changes so far."""
        for at in sorted(sent):
            self._pacer.sent(at)
        for reserved, settled in outcomes:
            self._pacer.learn(reserved, settled)
        return self._pacer.changes

    async def reserve(
        self,
        price: Price,
        prompt_tokens: int,
        max_completion: int | None,
        choices: int,
        prompt_bytes: int,
    ) -> Hold | str:
        """A budget hold, or the stop message when the budget stops the run."""
        assert self._budget is not None
        try:
            return await self._budget.reserve(
                price, prompt_tokens, max_completion, choices=choices, prompt_bytes=prompt_bytes
            )
        except RunStopped as e:
            return str(e)

    def settle(self, hold: Hold, usage: dict[str, Any] | None) -> None:
        assert self._budget is not None
        self._budget.settle(hold, usage)

    def events(self) -> list[Event]:
        """The pacer's events since the last call (slowdowns, speed-ups)."""
        events, self._events[:] = list(self._events), []
        return events


class ChunkPacer:
    """A sender's side of the pacing actor: its share of the run's concurrency, and send
    times booked a chunk at a time (see the module doc). A :class:`~batchq.send.limiter.Pacer`."""

    def __init__(self, pacing: Any, slots: int) -> None:
        self._pacing = pacing
        self._slots = anyio.Semaphore(slots)
        self._chunk = max(1, min(CHUNK, slots))
        self._times: deque[float] = deque()
        self._booked_at = 0  # the pacer's changes when the times held were booked
        self.changes = 0  # the latest changes heard of
        self._booking = anyio.Lock()
        self._outcomes: list[tuple[int, Settled]] = []
        self._sent: list[float] = []
        self._urgent = anyio.Event()

    def now(self) -> float:
        return time.time()

    async def acquire(self, prompt_tokens: int, max_completion: int | None) -> int:
        reserved = prompt_tokens + (max_completion or FIRST_COMPLETION_GUESS)
        await self._slots.acquire()
        try:
            while True:
                at, booked_at = await self._next_time(reserved)
                if (wait := at - time.time()) > 0:
                    await anyio.sleep(wait)
                if booked_at == self.changes:  # else a cut or raise came meanwhile: again
                    break
        except BaseException:
            self._slots.release()
            raise
        self._sent.append(time.time())
        return reserved

    async def _next_time(self, tokens: int) -> tuple[float, int]:
        """The next time booked, and the pacer's changes when it was booked."""
        async with self._booking:
            while True:
                now = time.time()
                while self._times and self._booked_at == self.changes:
                    at = self._times.popleft()
                    if at >= now - STALE_S:
                        return at, self._booked_at
                self._times.clear()
                times, changes = await awaited(self._pacing.book.remote(self._chunk, tokens))
                self.changes = max(self.changes, changes)
                self._booked_at = changes
                if not times:  # far off: look again (the rate may rise meanwhile)
                    await anyio.sleep(RECHECK_S)
                self._times.extend(times)

    def settle(self, reserved: int, settled: Settled) -> None:
        self._slots.release()
        self._outcomes.append((reserved, settled))
        if settled.throttled:  # a 429 is told at once: the run may have to slow
            self._urgent.set()

    async def report(self) -> None:
        """Send what requests came to, every REPORT_EVERY_S (a 429 at once), for the life
        of the sender."""
        while True:
            with anyio.move_on_after(REPORT_EVERY_S):
                await self._urgent.wait()
            self._urgent = anyio.Event()
            if self._outcomes or self._sent:
                sent, self._sent = self._sent, []
                outcomes, self._outcomes = self._outcomes, []
                changes = await awaited(self._pacing.learn.remote(sent, outcomes))
                self.changes = max(self.changes, changes)


class SharedBudget:
    """A sender's side of the run's budget, held by the pacing actor (a ``Spend``)."""

    def __init__(self, pacing: Any) -> None:
        self._pacing = pacing

    async def reserve(
        self,
        price: Price,
        prompt_tokens: int,
        max_completion: int | None,
        *,
        choices: int = 1,
        prompt_bytes: int = 0,
    ) -> Hold:
        got = await awaited(
            self._pacing.reserve.remote(price, prompt_tokens, max_completion, choices, prompt_bytes)
        )
        if isinstance(got, str):
            raise RunStopped(got)
        return got  # type: ignore[no-any-return]

    def settle(self, hold: Hold, usage: dict[str, Any] | None) -> None:
        self._pacing.settle.remote(hold, usage)  # in order after this sender's reserves


@dataclass(frozen=True)
class Owner:
    """The driver a sender serves: its machine and process."""

    node: str
    pid: int


@dataclass(frozen=True)
class SenderSetup:
    """What every sender of a run shares (the key goes apart, as an argument)."""

    job: Job
    state: Path
    slots: int
    keep_raw: bool
    seed: int | None
    prices: dict[str, Price]
    budget: bool
    owner: Owner


@dataclass
class Report:
    """What a sender did since the driver last asked: rows finished (flushed to its
    shards first), its events, requests sent, and why it stopped, if it did."""

    rows: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requests: int = 0
    stopped: BatchqError | None = None
    done: bool = False


class Sender:
    """One sending worker (see the module doc)."""

    def __init__(self, setup: SenderSetup, api_key: str | None, pacing: Any, tag: str) -> None:
        self._setup, self._api_key, self._pacing = setup, api_key, pacing
        self._events: list[Event] = []
        self._state = StateDir.writer(setup.state, tag)
        self._journal = Journal(self._state, self._emit)
        self._queue: deque[Item] = deque()
        self._more = anyio.Event()
        self._closed = self._stopping = self._done = False
        self._finished: list[int] = []  # rows answered, not in a shard yet
        self._saved: list[int] = []  # rows in a shard, not reported yet
        self._told: list[Event] = []  # their RowFinished, until they are in a shard
        self._counts = Counts()
        self._reported = 0
        self._stopped: BatchqError | None = None
        self._heard = time.monotonic()
        self._client: Client | None = None

    def where(self) -> tuple[str, int]:
        """Where the sender runs: its Ray node, and its process."""
        import ray

        return str(ray.get_runtime_context().get_node_id()), os.getpid()

    def check_state(self) -> str | None:
        """Why this sender cannot write the state folder (None: it can)."""
        probe = self._state.shards / f".probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return e.strerror or str(e)
        return None

    def put(self, items: list[Item]) -> None:
        """More rows to send (the driver bounds how many each sender holds)."""
        self._heard = time.monotonic()
        self._queue.extend(items)
        self._wake()

    def close(self) -> None:
        """No more rows: finish those held, then ``run`` returns."""
        self._closed = True
        self._wake()

    def stop(self) -> None:
        """Start no request more; those in flight get STOP_GRACE_S."""
        self._stopping = True
        self._wake()

    def drain(self) -> Report:
        """What was finished and saved (in a shard) since the last drain."""
        self._heard = time.monotonic()
        report = Report(
            self._saved,
            self._events,
            self._counts.requests - self._reported,
            self._stopped,
            self._done,
        )
        self._reported = self._counts.requests
        self._saved, self._events = [], []
        return report

    async def run(self) -> None:
        """Send what is put until closed (or stopped); flush on the way out."""
        setup, job = self._setup, self._setup.job
        pacer = ChunkPacer(self._pacing, setup.slots)
        self._client = client = Client(
            job.request.url,
            api_key=self._api_key,
            timeout_s=job.limits.timeout_s,
            max_connections=setup.slots,
            keep_raw=setup.keep_raw,
        )
        channel = Channel(
            client,
            pacer,
            job.limits.max_attempts,
            self._emit,
            anyio.sleep,
            random.Random(setup.seed),
            QuotaWatch(),
            EndpointWatch(client.url),
            keep=self._keep,
            budget=SharedBudget(self._pacing) if setup.budget else None,
            prices=setup.prices,
            counts=self._counts,
        )
        checker = Checker(job.answer) if job.answer is not None else None
        try:
            async with client, anyio.create_task_group() as tg:
                tg.start_soon(pacer.report)
                tg.start_soon(self._tick)
                tg.start_soon(self._watch_owner)
                async with anyio.create_task_group() as pool:
                    tg.start_soon(self._watch_stop, pool.cancel_scope)
                    for _ in range(setup.slots * ROWS_PER_SLOT):
                        pool.start_soon(self._work, channel, checker)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            first = first_batchq_error(group)
            if not isinstance(first, BatchqError):
                raise
            self._stopped = first
        finally:
            self._journal.flush()
            self._done = True

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if isinstance(event, Flushed):  # what finished before is in a shard now
            self._saved += self._finished
            self._events += self._told
            self._finished, self._told = [], []
        if isinstance(event, Flushed):  # what finished before is in a shard now
            self._saved += self._finished
            self._events += self._told
            self._finished, self._told = [], []

    def _keep(self, row: Any) -> None:
        self._journal.add(row)

    def _wake(self) -> None:
        self._more.set()
        self._more = anyio.Event()

    async def _work(self, channel: Channel, checker: Checker | None) -> None:
        while True:
            while not self._queue:
                if self._closed or self._stopping:
                    return
                await self._more.wait()
            if self._stopping:
                return
            item = self._queue.popleft()
            row = await send_row(item, channel, checker=checker)
            self._finished.append(row.row)
            self._told.append(finished_event(row))  # shown once saved: a lost sender's
            self._journal.add(row)  # no await since the answer: a stop cannot lose it

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self._journal.flush()

    async def _watch_stop(self, pool: anyio.CancelScope) -> None:
        """As the local engine: rows waiting their turn or backoff stop where they are;
        requests in flight (shielded, see ``Client.send``) get STOP_GRACE_S."""
        while not self._stopping:
            await self._more.wait()
        self._queue.clear()
        pool.cancel()
        await anyio.sleep(STOP_GRACE_S)
        if self._client is not None:
            self._client.abort()

    async def _watch_owner(self) -> None:
        """Exit, sending nothing more, once the driver is gone (see the module doc)."""
        owner, here = self._setup.owner, _node()
        while True:
            await anyio.sleep(WATCH_EVERY_S)
            if owner.node == here:
                try:
                    os.kill(owner.pid, 0)
                    continue
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            elif time.monotonic() - self._heard < OWNER_SILENT_S:
                continue
            if self._client is not None:
                self._client.abort()
            self._journal.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _node() -> str:
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call,unused-ignore]
