"""The pipeline of one run:

    input ──feed──▶ items (bounded stream) ──N workers──▶ journal ──every second──▶ shards
                                                                                     │
                                                output.parquet ◀──merge at the end───┘

One task group; a fixed pool of workers (``limits.concurrency``), never a task per row;
a bounded memory object stream gives back-pressure, so memory is flat in the row count.
Workers hand finished rows to the journal without awaiting, and the journal is flushed
at least once a second and whenever the run stops, so a killed run loses none of them.
Observation goes out as events; nothing here prints.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batchq.answer import Checker
from batchq.batch.flow import BatchPlan, collect_or_refuse, via_batch
from batchq.batch.flow import Journal as BatchJournal
from batchq.config import Job
from batchq.engine.dedupe import Dedupe
from batchq.engine.stop import StopSwitch
from batchq.engine.work import Channel, EndpointWatch, Item, QuotaWatch, answer
from batchq.errors import BatchqError, Interrupted
from batchq.events import (
    Checking,
    Flushed,
    Notice,
    RowFinished,
    RunFinished,
    RunStarted,
    RunSummary,
    Sink,
    Tick,
    discard,
)
from batchq.files import read_parquet
from batchq.io.preflight import InputInfo, completion_cap, preflight, row_id
from batchq.io.reader import read_batches
from batchq.money.budget import MAX_OUTPUT, Budget
from batchq.money.pricing import Price, PriceTable, RowPricer, region_of
from batchq.money.report import cost_report, find_results
from batchq.output.merge import merge_output
from batchq.result import Result
from batchq.send.client import Client
from batchq.send.limiter import Pacer, RatePacer
from batchq.send.request import build_body, estimate_tokens
from batchq.state import RowMask, StateDir, check_output, manifest_for

if TYPE_CHECKING:  # httpx loads only when a caller brings a transport (tests)
    from collections.abc import Callable

    import httpx
    import pyarrow as pa

__all__ = ["FLUSH_EVERY_S", "RunOptions", "RunSummary", "loop_options", "run_job"]

FLUSH_EVERY_S = 1.0
FLUSH_MAX_ROWS = 10_000
#: Characters of answer text (response, reasoning, tool calls, choices, raw) held before a
#: flush. A run of 40,000 rows with 2 KB answers peaked at 172 MB while sending when up to
#: 10,000 rows waited; with this bound, at 135-138 MB.
FLUSH_MAX_TEXT = 4_000_000
STOP_GRACE_S = 5.0
ROWS_PER_SLOT = 4


@dataclass(frozen=True)
class RunOptions:
    """A run's switches: the CLI's flags of the same names."""

    #: throw away the saved results (the state folder's, and a finished output) first
    restart: bool = False
    #: send again the rows whose latest result is an error
    retry_errors: bool = False
    #: ask afresh the rows whose latest answer was not valid (the job's [answer])
    retry_invalid: bool = False
    #: keep the state folder after the merge
    keep_state: bool = False
    #: a ``raw`` column: each response as received
    keep_raw: bool = False
    #: the seed of the backoff jitter (None: from the system)
    seed: int | None = None
    #: how to resume the run, as ``status`` shows it
    command: str | None = None
    #: a price table (TOML) over the built-in one, for the output's ``cost`` column
    prices: Path | None = None
    #: send only these rows (``estimate --sample``), into the state folder; no merge
    sample: frozenset[int] | None = None
    #: send the pending rows through the provider's Batch API first (``--via batch``)
    batch: BatchPlan | None = None

    @property
    def retry(self) -> frozenset[str]:
        """The statuses whose rows are sent again."""
        chosen = (("error", self.retry_errors), ("invalid", self.retry_invalid))
        return frozenset(status for status, on in chosen if on)


def loop_options() -> dict[str, Any]:
    """anyio.run's backend options: uvloop where it is installed (not on Windows)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {"use_uvloop": False}
    return {"use_uvloop": True}


async def run_job(
    job: Job,
    *,
    api_key: str | None,
    options: RunOptions = RunOptions(),
    sink: Sink = discard,
    transport: httpx.AsyncBaseTransport | None = None,
    pacer: Pacer | None = None,
    on_results: Callable[[pa.Table], object] | None = None,
    stop: StopSwitch | None = None,
) -> RunSummary:
    """Run (or resume) ``job`` to its output file. Raises a BatchqError subclass.

    ``sink`` is given the run's events; ``transport`` and ``pacer`` replace the HTTP
    transport and the pacer (tests); ``on_results`` is given each block of results as the
    merge writes it (every row of the output, in order). ``stop`` stops the run when
    pressed (Interrupted); on the main thread, SIGINT and SIGTERM press it."""
    started = time.monotonic()
    stop = stop or StopSwitch()
    _ = job.request.url  # a UsageError for a provider without one, before anything is written
    check_output(job)

    def checking(rows: int, exact: bool) -> None:
        if stop.presses:
            raise Interrupted("stopped before anything was sent: rerun to start")
        sink(Checking(rows, exact))

    info = preflight(job, progress=checking)
    region = region_of(job.request.provider)
    priced = _prices_for_budget(job, info, PriceTable.load(options.prices), region)
    manifest = manifest_for(job, info, region=region, command=options.command)
    collect_or_refuse(StateDir.of(job.output), "batch" if options.batch else "live",
                      options.restart)  # fmt: skip
    finished = not options.restart and StateDir.finished(job, info)
    state = StateDir.open(job, info, manifest=manifest, restart=options.restart)
    try:
        adopted = False
        if finished and options.retry:  # the output's rows back as shards
            adopted = state.adopt_output(job.output, info.id_column, options.retry)
        if finished and not adopted:
            state.remove()
            sink(Notice(f"{job.output} is complete already: nothing to send"))
            return _finish(sink, job, info, statuses=None, sent=0, started=started, done=True)
        batched = 0
        if options.batch is not None:
            before = state.done_mask(info.total_rows).count()
            left = await _via_batch(job, info, state, options.batch, api_key=api_key,
                                    sink=sink, stop=stop, transport=transport)  # fmt: skip
            if left is not None:
                return _unfinished(sink, job, info, state, left, started=started)
            batched = state.done_mask(info.total_rows).count() - before
        todo = await _send_pending(
            job, info, state, options, api_key=api_key, sink=sink, transport=transport,
            pacer=pacer, stop=stop, batched=batched, priced=priced,
        )  # fmt: skip
        if options.sample is not None:  # a sample for ``estimate``: the rest stays pending
            return _unfinished(sink, job, info, state, 0, started=started, sent=todo)
        counts = merge_output(
            state, info, job.output, manifest=manifest, keep_raw=options.keep_raw,
            answers=job.answer is not None, on_block=on_results,
            costs=RowPricer(PriceTable.load(options.prices), region),
        )  # fmt: skip
        if not options.keep_state:
            state.remove()
        return _finish(sink, job, info, statuses=counts.statuses, sent=todo + batched,
                       started=started,
                       done=False)  # fmt: skip
    finally:
        state.close()


async def _send_pending(
    job: Job,
    info: InputInfo,
    state: StateDir,
    options: RunOptions,
    *,
    api_key: str | None,
    sink: Sink,
    transport: httpx.AsyncBaseTransport | None,
    pacer: Pacer | None,
    stop: StopSwitch,
    batched: int = 0,
    priced: tuple[str, dict[str, Price]] | None = None,
) -> int:
    """Send every row without a result (or whose latest result's status is one of
    ``options.retry``) into ``state``; how many there were. ``batched``: rows the Batch
    API answered just before (not "resumed")."""
    reasks = job.answer.reasks if job.answer is not None else None
    done = state.done_mask(info.total_rows, retry=options.retry, reasks=reasks)
    if options.sample is not None:  # every other row is left as if done
        for index in range(info.total_rows):
            if index not in options.sample:
                done[index] = True
    todo = info.total_rows - done.count()
    budget = _budget(job, state, priced, options.prices, sink) if todo else None
    capped = (budget.cap, budget.spent, budget.currency) if budget is not None else None
    sink(RunStarted(job.name, info.total_rows, todo, job.output, capped))
    for note in (*state.notes, *info.notes):
        sink(Notice(note))
    if batched:
        sink(Notice(f"batch: {batched:,} rows answered by the Batch API; {todo:,} left to "
                    "send live"))  # fmt: skip
    elif todo < info.total_rows:
        sink(Notice(f"resuming: {info.total_rows - todo:,} rows already done"))
    if todo:
        prior = state.prior_by_row(options.retry, reasks)
        await _send_all(
            job, info, state, done, prior,
            api_key=api_key, sink=sink, transport=transport,
            pacer=pacer or RatePacer(job.limits, emit=sink),
            rng=random.Random(options.seed), keep_raw=options.keep_raw, stop=stop,
            budget=budget, prices=priced[1] if priced else {},
        )  # fmt: skip
    return todo


async def _via_batch(
    job: Job, info: InputInfo, state: StateDir, plan: BatchPlan, *, api_key: str | None,
    sink: Sink, stop: StopSwitch, transport: httpx.AsyncBaseTransport | None,
) -> int | None:  # fmt: skip
    """The pending rows through the Batch API; the running batches' count when the run
    ends here (submitted, not waited on; or ``then="none"``), else None: the rest is
    sent live."""
    collected = await via_batch(job, info, state, plan, api_key=api_key, sink=sink,
                                stop=stop, transport=transport)  # fmt: skip
    if not collected:
        journal = BatchJournal.load(state)
        return len(journal.open_entries()) if journal is not None else 0
    if plan.then == "none" and state.done_mask(info.total_rows).count() < info.total_rows:
        return 0
    return None


def _prices_for_budget(
    job: Job, info: InputInfo, table: PriceTable, region: str
) -> tuple[str, dict[str, Price]] | None:
    """With ``max_cost``: the currency and the price of every model the rows ask for
    (UsageError, before anything is written, for one without a price)."""
    if job.limits.max_cost is None:
        return None
    models = {str(job.request.model)} if job.request.model else set()
    if any(name == "model" for name, _ in info.columns):
        for batch in read_batches(info.path):
            models.update(str(row.get("model") or job.request.model) for row in batch.rows)
    return Budget.check(models, table, region)


def _budget(
    job: Job, state: StateDir, priced: tuple[str, dict[str, Price]] | None,
    prices: Path | None, sink: Sink,
) -> Budget | None:  # fmt: skip
    """The run's budget: the cap, less what earlier runs of the job spent (as billed,
    retries and re-asks included: the rows' usage columns sum them)."""
    if priced is None or job.limits.max_cost is None:
        return None
    currency = priced[0]
    spent = 0.0
    if state.shard_paths():
        region = region_of(job.request.provider)
        report = cost_report(find_results(state.path), PriceTable.load(prices), region=region)
        spent = report.totals.get(currency, 0.0)
    budget = Budget(job.limits.max_cost, spent, currency)
    capped = "" if job.request.max_tokens else (
        f"; requests without max_tokens count at {MAX_OUTPUT:,} output tokens until they "
        "answer (set max_tokens to spend closer to the cap)")  # fmt: skip
    sink(Notice(f"budget: {budget.text()} spent so far{capped}"))
    return budget


def _unfinished(
    sink: Sink, job: Job, info: InputInfo, state: StateDir, running: int, *, started: float,
    sent: int = 0,
) -> RunSummary:  # fmt: skip
    """A run that leaves rows pending (``--no-wait``, ``--then none``): no output yet."""
    done = state.done_mask(info.total_rows).count()
    answered = state.done_mask(info.total_rows, retry=frozenset({"error"})).count()
    summary = RunSummary(
        job.output, info.total_rows, answered, done - answered, sent,
        time.monotonic() - started, False, pending=info.total_rows - done,
        running_batches=running,
    )  # fmt: skip
    sink(RunFinished(summary))
    return summary


def _finish(
    sink: Sink,
    job: Job,
    info: InputInfo,
    *,
    statuses: dict[str, int] | None,
    sent: int,
    started: float,
    done: bool,
) -> RunSummary:
    if statuses is None:
        statuses = Counter(read_parquet(job.output, ["status"]).column("status").to_pylist())
    summary = RunSummary(
        job.output, info.total_rows, statuses.get("ok", 0), statuses.get("error", 0), sent,
        time.monotonic() - started, done, invalid=statuses.get("invalid", 0),
    )  # fmt: skip
    sink(RunFinished(summary))
    return summary


@dataclass
class _Pipeline:
    """One run's sending stage: feed, workers, journal ticks and the signal watch."""

    job: Job
    info: InputInfo
    done: RowMask
    prior: dict[int, dict[str, Any]]
    client: Client
    pacer: Pacer
    journal: Journal
    sink: Sink
    rng: random.Random
    stop: StopSwitch
    quota: QuotaWatch = field(default_factory=QuotaWatch)
    stopping: bool = False
    budget: Budget | None = None
    prices: dict[str, Price] = field(default_factory=dict)
    dedupe: Dedupe | None = None

    def __post_init__(self) -> None:
        self.channel = Channel(
            self.client, self.pacer, self.job.limits.max_attempts, self.sink, anyio.sleep,
            self.rng, self.quota, EndpointWatch(self.client.url), keep=self.journal.add,
            budget=self.budget, prices=self.prices,
        )  # fmt: skip
        self.checker = Checker(self.job.answer) if self.job.answer is not None else None

    async def run(self) -> None:
        """Send every row not done. Raises Interrupted after a clean stop on a signal."""
        # More rows in progress than requests in flight: a row waiting out its backoff
        # holds no slot of the pacer's concurrency cap.
        workers = max(1, min(self.job.limits.concurrency * ROWS_PER_SLOT, len(self.done)))
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
        dedupe = self.dedupe
        with scope:
            async with items:
                for batch in read_batches(self.info.path):
                    for i, row in enumerate(batch.rows):
                        index = batch.start + i
                        if dedupe is None:
                            if not self.done[index]:
                                await items.send(self._item(index, row))
                            continue
                        body = build_body(row, self.job.request)
                        ident = row_id(row, self.info.id_column, index)
                        lead = dedupe.lead(index, ident, body, done=self.done[index])
                        if lead and not self.done[index]:
                            await items.send(self._item(index, row, body))

    def _item(self, index: int, row: dict[str, Any], body: dict[str, Any] | None = None) -> Item:
        body = body if body is not None else build_body(row, self.job.request)
        ident = row_id(row, self.info.id_column, index)
        cap, prior = completion_cap(body), self.prior.get(index)
        resume = None
        if prior is not None and "error_message" in prior:  # asked again from its last answer
            resume = (prior["response"], prior["error_message"] or "it is not valid")
        return Item(index, ident, body, estimate_tokens(body), cap, prior, resume)

    async def _work(self, items: ObjectReceiveStream[Item]) -> None:
        async with items:
            async for item in items:
                if self.stopping:
                    return
                row = await answer(item, self.channel, checker=self.checker)
                self.journal.add(row)  # no await since the answer: a stop cannot lose it
                self.sink(_finished(row))

    async def _tick(self) -> None:
        """Flush at least every FLUSH_EVERY_S while the run goes on."""
        while True:
            await anyio.sleep(FLUSH_EVERY_S)
            self.journal.flush()
            self.sink(Tick())

    async def _relay_signals(self) -> None:
        """SIGINT / SIGTERM press the stop switch (the CLI's run, on the main thread)."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.stop.press()

    async def _watch_stop(self, pool: anyio.CancelScope, feeding: anyio.CancelScope) -> None:
        """First press (SIGINT, SIGTERM, or a notebook's interrupt): start no request more
        (not even a retry): every row waiting its turn or its backoff stops where it is,
        while the requests in flight (shielded, see ``Client.send``) get STOP_GRACE_S. A
        second one: stop at once. Either way the journal is flushed on the way out.
        (Before, a run at 40 QPS sent 200 requests more in its grace.)"""
        await self.stop.pressed(1)
        self.stopping = True
        feeding.cancel()
        pool.cancel()
        self.sink(Notice(f"stopping: waiting up to {STOP_GRACE_S:g} s for requests "
                         "in flight (Ctrl-C again to stop now)"))  # fmt: skip
        with anyio.move_on_after(STOP_GRACE_S):
            await self.stop.pressed(2)
        self.client.abort()


async def _send_all(
    job: Job,
    info: InputInfo,
    state: StateDir,
    done: RowMask,
    prior: dict[int, dict[str, Any]],
    *,
    api_key: str | None,
    sink: Sink,
    transport: httpx.AsyncBaseTransport | None,
    pacer: Pacer,
    rng: random.Random,
    keep_raw: bool,
    stop: StopSwitch,
    budget: Budget | None = None,
    prices: dict[str, Price] | None = None,
) -> None:
    workers = max(1, min(job.limits.concurrency, info.total_rows))
    client = Client(job.request.url, api_key=api_key, timeout_s=job.limits.timeout_s,
                    max_connections=workers, transport=transport, keep_raw=keep_raw)  # fmt: skip
    journal = Journal(state, sink)
    dedupe = Dedupe.scan(job, info) if job.request.dedupe else None
    pipeline = _Pipeline(job, info, done, prior, client, pacer, journal, sink, rng, stop,
                         budget=budget, prices=prices or {}, dedupe=dedupe)  # fmt: skip
    try:
        await pipeline.run()
    except BaseExceptionGroup as group:
        raise _first_batchq_error(group) from None
    finally:
        journal.flush()
    if dedupe is not None and dedupe.pending:
        copied = dedupe.fill(state)
        sink(Notice(f"dedupe: {copied:,} rows repeat another row's request: they took its "
                    "answer, sent and billed once"))  # fmt: skip


def _first_batchq_error(group: BaseExceptionGroup[Any]) -> BaseException:
    matched, _ = group.split(BatchqError)
    if matched is None:
        return group
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _finished(r: Result) -> RowFinished:
    reasoning = r.reasoning_tokens or 0
    return RowFinished(
        r.id, r.status, r.attempts, r.model, r.prompt_tokens or 0, r.completion_tokens or 0,
        r.cached_tokens or 0, reasoning, reasoning > 0 or r.reasoning is not None,
        r.http_status, r.error_code, r.error_message, r.cache_creation_tokens,
    )  # fmt: skip


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
