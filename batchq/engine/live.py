"""The local engine's sending stage: every pending row sent from this process.

    input ──feed──▶ items (bounded stream) ──N workers──▶ journal ──every second──▶ shards

One task group; a fixed pool of workers (``limits.concurrency`` × ROWS_PER_SLOT), never a
task per row; a bounded memory object stream gives back-pressure, so memory is flat in
the row count. Workers hand finished rows to the journal without awaiting, and the
journal is flushed at least once a second and whenever the run stops, so a killed run
loses none of them. Observation goes out as events; nothing here prints.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batchq.answer import Checker
from batchq.engine.context import RunContext
from batchq.engine.dedupe import Dedupe
from batchq.engine.work import Channel, EndpointWatch, Item, QuotaWatch, send_row
from batchq.errors import BatchqError, Interrupted
from batchq.events import Flushed, Notice, RowFinished, Sink, Tick
from batchq.io.preflight import completion_cap, row_id
from batchq.io.reader import read_batches
from batchq.money.budget import Budget
from batchq.result import Result
from batchq.send.client import Client
from batchq.send.limiter import Pacer, RatePacer
from batchq.send.request import build_body, estimate_tokens
from batchq.state import RowMask, StateDir

__all__ = [
    "FLUSH_EVERY_S",
    "FLUSH_MAX_ROWS",
    "FLUSH_MAX_TEXT",
    "Journal",
    "fill_copies",
    "finished_event",
    "first_batchq_error",
    "make_item",
    "pending_items",
    "send_live",
]

FLUSH_EVERY_S = 1.0
FLUSH_MAX_ROWS = 10_000
#: Characters of answer text (response, reasoning, tool calls, choices, raw) held before a
#: flush. A run of 40,000 rows with 2 KB answers peaked at 172 MB while sending when up to
#: 10,000 rows waited; with this bound, at 135-138 MB.
FLUSH_MAX_TEXT = 4_000_000
STOP_GRACE_S = 5.0
ROWS_PER_SLOT = 4


async def send_live(
    ctx: RunContext,
    done: RowMask,
    prior: dict[int, dict[str, Any]],
    *,
    budget: Budget | None,
    dedupe: Dedupe | None,
) -> None:
    """Send every row not ``done`` (``prior``: what earlier runs sent and billed for the
    rows sent again), journalling into the state folder; a ``dedupe``'s copies are filled
    from their leaders once sending is over. Raises Interrupted after a clean stop."""
    job = ctx.job
    workers = max(1, min(job.limits.concurrency, ctx.info.total_rows))
    client = Client(
        job.request.url,
        api_key=ctx.api_key,
        timeout_s=job.limits.timeout_s,
        max_connections=workers,
        transport=ctx.transport,
        keep_raw=ctx.options.keep_raw,
    )
    journal = Journal(ctx.state, ctx.sink)
    pacer = ctx.pacer or RatePacer(job.limits, emit=ctx.sink)
    pipeline = _Pipeline(ctx, done, prior, client, pacer, journal, budget, dedupe)
    try:
        await pipeline.run()
    except BaseExceptionGroup as group:
        raise first_batchq_error(group) from None
    finally:
        journal.flush()
    fill_copies(ctx, dedupe)


def fill_copies(ctx: RunContext, dedupe: Dedupe | None) -> None:
    """After sending: a ``dedupe``'s repeated rows take their first row's answer."""
    if dedupe is not None and dedupe.pending:
        copied = dedupe.fill(ctx.state)
        ctx.counts.copied += copied
        ctx.sink(
            Notice(
                f"dedupe: {copied:,} rows repeat another row's request: they took "
                "its answer, sent and billed once"
            )
        )


@dataclass
class _Pipeline:
    """One run's sending stage: feed, workers, journal ticks and the signal watch."""

    ctx: RunContext
    done: RowMask
    prior: dict[int, dict[str, Any]]
    client: Client
    pacer: Pacer
    journal: Journal
    budget: Budget | None
    dedupe: Dedupe | None
    quota: QuotaWatch = field(default_factory=QuotaWatch)
    stopping: bool = False

    def __post_init__(self) -> None:
        ctx = self.ctx
        self.channel = Channel(
            self.client,
            self.pacer,
            ctx.job.limits.max_attempts,
            ctx.sink,
            anyio.sleep,
            random.Random(ctx.options.seed),
            self.quota,
            EndpointWatch(self.client.url),
            keep=self.journal.add,
            budget=self.budget,
            prices=ctx.priced[1] if ctx.priced else {},
            counts=ctx.counts,
        )
        self.checker = Checker(ctx.job.answer) if ctx.job.answer is not None else None

    async def run(self) -> None:
        """Send every row not done. Raises Interrupted after a clean stop on a signal."""
        # More rows in progress than requests in flight: a row waiting out its backoff
        # holds no slot of the pacer's concurrency cap.
        workers = max(1, min(self.ctx.job.limits.concurrency * ROWS_PER_SLOT, len(self.done)))
        items_send, items_recv = anyio.create_memory_object_stream[Item](workers)
        feeding = anyio.CancelScope()
        async with self.client, anyio.create_task_group() as tg:
            tg.start_soon(self._tick)
            async with anyio.create_task_group() as pool:
                if threading.current_thread() is threading.main_thread():
                    tg.start_soon(self._relay_signals)
                tg.start_soon(self._watch_stop, pool.cancel_scope, feeding)
                pool.start_soon(self._feed, items_send, feeding)
                async with items_recv:
                    for _ in range(workers):
                        pool.start_soon(self._work, items_recv.clone())
            tg.cancel_scope.cancel()
        if self.stopping:
            raise Interrupted(
                "stopped: finished rows are saved; rerun the same command to resume "
                "(from Python: the same call)"
            )

    async def _feed(self, items: ObjectSendStream[Item], scope: anyio.CancelScope) -> None:
        with scope:
            async with items:
                for item in pending_items(self.ctx, self.done, self.prior, self.dedupe):
                    await items.send(item)

    async def _work(self, items: ObjectReceiveStream[Item]) -> None:
        async with items:
            async for item in items:
                if self.stopping:
                    return
                row = await send_row(item, self.channel, checker=self.checker)
                self.journal.add(row)  # no await since the answer: a stop cannot lose it
                self.ctx.sink(finished_event(row))

    async def _tick(self) -> None:
        """Flush at least every FLUSH_EVERY_S while the run goes on."""
        while True:
            await anyio.sleep(FLUSH_EVERY_S)
            self.journal.flush()
            self.ctx.sink(Tick())

    async def _relay_signals(self) -> None:
        """SIGINT / SIGTERM press the stop switch (the CLI's run, on the main thread)."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.ctx.stop.press()

    async def _watch_stop(self, pool: anyio.CancelScope, feeding: anyio.CancelScope) -> None:
        """First press (SIGINT, SIGTERM, or a notebook's interrupt): start no request more
        (not even a retry): every row waiting its turn or its backoff stops where it is,
        while the requests in flight (shielded, see ``Client.send``) get STOP_GRACE_S. A
        second one: stop at once. Either way the journal is flushed on the way out.
        (Before, a run at 40 QPS sent 200 requests more in its grace.)"""
        await self.ctx.stop.pressed(1)
        self.stopping = True
        feeding.cancel()
        pool.cancel()
        self.ctx.sink(
            Notice(
                f"stopping: waiting up to {STOP_GRACE_S:g} s for requests "
                "in flight (Ctrl-C again to stop now)"
            )
        )
        with anyio.move_on_after(STOP_GRACE_S):
            await self.ctx.stop.pressed(2)
        self.client.abort()


def pending_items(
    ctx: RunContext, done: RowMask, prior: dict[int, dict[str, Any]], dedupe: Dedupe | None
) -> Iterator[Item]:
    """The rows to send, in input order: those not ``done``, and of a ``dedupe``'s
    repeated requests only the first (the others take its answer after sending)."""
    job, info = ctx.job, ctx.info
    for batch in read_batches(info.path):
        for i, row in enumerate(batch.rows):
            index = batch.start + i
            if dedupe is None:
                if not done[index]:
                    yield make_item(ctx, index, row, prior.get(index))
                continue
            body = build_body(row, job.request)
            ident = row_id(row, info.id_column, index)
            if dedupe.sends(index, ident, body, done=done[index]) and not done[index]:
                yield make_item(ctx, index, row, prior.get(index), body)


def make_item(
    ctx: RunContext,
    index: int,
    row: dict[str, Any],
    prior: dict[str, Any] | None,
    body: dict[str, Any] | None = None,
) -> Item:
    """Input row ``index`` as a request to send (``prior``: what earlier runs sent and
    billed for it)."""
    body = body if body is not None else build_body(row, ctx.job.request)
    ident = row_id(row, ctx.info.id_column, index)
    return Item(
        index, ident, body, estimate_tokens(body), completion_cap(body), prior, resume_from(prior)
    )


def resume_from(prior: dict[str, Any] | None) -> tuple[str | None, str] | None:
    """A row asked again from its last answer (``prior`` holds why it was not valid)."""
    if prior is not None and "error_message" in prior:
        return prior["response"], prior["error_message"] or "it is not valid"
    return None


def first_batchq_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first BatchqError in ``group`` (a stop's reason), or ``group`` without one."""
    matched, _ = group.split(BatchqError)
    if matched is None:
        return group
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def finished_event(r: Result) -> RowFinished:
    reasoning = r.reasoning_tokens or 0
    return RowFinished(
        r.id,
        r.status,
        r.attempts,
        r.model,
        r.prompt_tokens or 0,
        r.completion_tokens or 0,
        r.cached_tokens or 0,
        reasoning,
        reasoning > 0 or r.reasoning is not None,
        r.http_status,
        r.error_code,
        r.error_message,
        r.cache_creation_tokens,
    )


class Journal:
    """Finished rows on their way to a shard.

    Workers add rows synchronously (no await, so a row that came back is never lost to
    a cancellation); ``flush`` writes them as one atomic shard.
    """

    def __init__(self, state: StateDir, sink: Sink) -> None:
        self._state = state
        self._sink = sink
        self._rows: dict[int, Result] = {}  # by input row: a later result replaces one
        self._text = 0

    def add(self, row: Result) -> None:
        """A row's result (or its answer while it is asked again, replaced by the next)."""
        if (earlier := self._rows.pop(row.row, None)) is not None:
            self._text -= earlier.text_length()
        self._rows[row.row] = row
        self._text += row.text_length()
        if len(self._rows) >= FLUSH_MAX_ROWS or self._text >= FLUSH_MAX_TEXT:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._state.write(list(self._rows.values()))  # on a disk error they stay here
            self._sink(Flushed(len(self._rows)))
            self._rows = {}
            self._text = 0
