"""One run, from the job to its output:

    check ─▶ plan ─▶ [Batch-API rounds] ─▶ send what is pending ─▶ merge ─▶ summary

Everything before and after sending is here; sending is a stage of its own over the run's
context (``engine.context``): the local engine's is ``engine.live``. The Batch API's
rounds (``batch.flow``) take what the budget and dedupe let them (``_BatchSelection``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchq.batch.flow import collect_or_refuse, via_batch
from batchq.batch.journal import Journal as BatchJournal
from batchq.config import Job
from batchq.engine.context import Counts, RunContext, RunOptions
from batchq.engine.dedupe import Dedupe
from batchq.engine.live import FLUSH_EVERY_S, send_live
from batchq.engine.stop import StopSwitch
from batchq.errors import Interrupted, RunStopped
from batchq.events import Checking, Notice, RunFinished, RunStarted, RunSummary, Sink, discard
from batchq.files import read_parquet
from batchq.io.preflight import InputInfo, completion_cap, preflight
from batchq.io.reader import read_batches
from batchq.money.budget import MAX_OUTPUT, Budget
from batchq.money.pricing import Price, PriceTable, RowPricer, region_of
from batchq.money.report import cost_report, find_results
from batchq.output.merge import merge_output
from batchq.send.limiter import Pacer
from batchq.send.request import choices, estimate_tokens, prompt_bytes
from batchq.state import StateDir, check_output, manifest_for

if TYPE_CHECKING:  # httpx loads only when a caller brings a transport (tests)
    from collections.abc import Callable

    import httpx
    import pyarrow as pa

__all__ = ["FLUSH_EVERY_S", "RunOptions", "RunSummary", "loop_options", "run_job"]


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
    options: RunOptions | None = None,
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
    stop, options = stop or StopSwitch(), options or RunOptions()
    _ = job.request.url  # a UsageError for a provider without one, before anything is written
    check_output(job)
    if job.engine == "ray":  # exit 2 with the install line before anything is written
        from batchq.engine.ray_cluster import import_ray

        import_ray()

    def checking(rows: int, exact: bool) -> None:
        if stop.presses:
            raise Interrupted("stopped before anything was sent: rerun to start")
        sink(Checking(rows, exact))

    info = preflight(job, progress=checking)
    region = region_of(job.request.provider)
    # A resume prices as the run it resumes did, with no --prices repeated.
    earlier = None if options.restart else StateDir.of(job.output).manifest()
    prices = PriceTable.for_results(options.prices, earlier)
    priced = _prices_for_budget(job, info, prices, region)
    manifest = manifest_for(job, info, region=region, command=options.command, prices=prices.text)
    collect_or_refuse(
        StateDir.of(job.output), "batch" if options.batch else "live", options.restart, sink
    )
    finished = not options.restart and StateDir.finished(job, info)
    state = StateDir.open(job, info, manifest=manifest, restart=options.restart)
    ctx = RunContext(
        job, info, state, options, sink, stop, api_key, prices, region, priced, transport, pacer
    )
    try:
        if finished and not (
            options.retry and state.adopt_output(job.output, info.id_column, options.retry)
        ):
            state.remove()
            sink(Notice(f"{job.output} is complete already: nothing to send"))
            return _finish(ctx, None, started=started, done=True)
        dedupe = Dedupe.scan(job, info) if job.request.dedupe else None
        if options.batch is not None:
            running = await _batch_stage(ctx, dedupe)
            if running is not None:
                return _unfinished(ctx, running, started=started)
        todo = await _live_stage(ctx, Dedupe(dedupe.repeated) if dedupe else None)
        if options.sample is not None:  # a sample for ``estimate``: the rest stays pending
            return _unfinished(ctx, 0, started=started, sent=todo)
        counts = merge_output(
            state,
            info,
            job.output,
            manifest=manifest,
            keep_raw=options.keep_raw,
            answers=job.answer is not None,
            on_block=on_results,
            costs=RowPricer(prices, region),
        )
        if not options.keep_state:
            state.remove()
        return _finish(
            ctx, counts.statuses, started=started, done=False, sent=todo + ctx.counts.collected
        )
    finally:
        state.close()


async def _live_stage(ctx: RunContext, dedupe: Dedupe | None) -> int:
    """Send every row without a result (or whose latest result's status is one of
    ``options.retry``) into the state folder; how many there were."""
    job, info, state, options, sink = ctx.job, ctx.info, ctx.state, ctx.options, ctx.sink
    reasks = job.answer.reasks if job.answer is not None else None
    done = state.done_mask(info.total_rows, retry=options.retry, reasks=reasks)
    if options.sample is not None:  # every other row is left as if done
        for index in range(info.total_rows):
            if index not in options.sample:
                done[index] = True
    todo = info.total_rows - done.count()
    budget = _budget(ctx) if todo else None
    capped = (budget.cap, budget.spent, budget.currency) if budget is not None else None
    sink(RunStarted(job.name, info.total_rows, todo, job.output, capped))
    for note in (*state.notes, *info.notes):
        sink(Notice(note))
    if ctx.counts.collected:
        sink(
            Notice(
                f"batch: {ctx.counts.collected:,} rows answered by the Batch API; "
                f"{todo:,} left to send live"
            )
        )
    elif todo < info.total_rows:
        sink(Notice(f"resuming: {info.total_rows - todo:,} rows already done"))
    if todo:
        prior = state.prior_by_row(options.retry, reasks)
        if job.engine == "ray":
            from batchq.engine.ray_engine import send_ray  # Ray loads only when asked for

            await send_ray(ctx, done, prior, budget=budget, dedupe=dedupe)
        else:
            await send_live(ctx, done, prior, budget=budget, dedupe=dedupe)
    return todo


async def _batch_stage(ctx: RunContext, dedupe: Dedupe | None) -> int | None:
    """The pending rows through the Batch API; the running batches' count when the run
    ends here (submitted, not waited on; or ``then="none"``), else None: the rest is
    sent live."""
    plan, state, total = ctx.options.batch, ctx.state, ctx.info.total_rows
    assert plan is not None
    before = state.done_mask(total).count()
    select = _BatchSelection(ctx, dedupe, _budget(ctx, quiet=True))
    collected = await via_batch(
        ctx.job,
        ctx.info,
        state,
        plan,
        api_key=ctx.api_key,
        sink=ctx.sink,
        stop=ctx.stop,
        transport=ctx.transport,
        select=select,
    )
    ctx.counts.collected += state.done_mask(total).count() - before - ctx.counts.copied
    if not collected:
        journal = BatchJournal.load(state)
        return len(journal.open_entries()) if journal is not None else 0
    if plan.then == "none" and state.done_mask(total).count() < total:
        return 0
    return None


@dataclass
class _BatchSelection:
    """Which pending rows a Batch-API round takes: one row of each repeated request
    (``dedupe``: the others take its answer once it is collected), and, with
    ``max_cost``, only as many as fit the budget at their worst case at the Batch API's
    share of the price (the rest stay pending)."""

    ctx: RunContext
    dedupe: Dedupe | None
    budget: Budget | None
    taken: int = 0
    left: int = 0  # rows the budget left out of this round
    worst: float = 0.0  # the worst case of the first of them

    def take(self, index: int, ident: str, body: dict[str, Any], done: bool) -> bool:
        if self.dedupe is not None and not self.dedupe.sends(index, ident, body, done=done):
            return False
        if done:
            return False
        if self.budget is not None:
            assert self.ctx.priced is not None
            price = self.ctx.priced[1][str(body.get("model"))]
            worst = self.budget.worst(
                price,
                estimate_tokens(body),
                completion_cap(body),
                choices=choices(body),
                prompt_bytes=prompt_bytes(body),
                batch=True,
            )
            if not self.budget.fits(worst):
                self.left += 1
                self.worst = self.worst or worst
                return False
            self.budget.in_flight += worst
        self.taken += 1
        self.ctx.counts.batch_lines += 1
        return True

    def exported(self) -> None:
        """After a round's export: the budget took none of the pending rows: stop."""
        if self.budget is not None and self.left:
            if not self.taken:
                raise RunStopped(self.budget.stopped(self.worst))
            self.ctx.sink(
                Notice(
                    f"budget: {self.taken:,} rows fit --max-cost at the Batch "
                    f"API's price; {self.left:,} stay pending"
                )
            )
        self.taken = self.left = 0

    def collected(self, state: StateDir) -> None:
        """After a round is imported: each repeated request's other rows take its answer."""
        if self.dedupe is not None and self.dedupe.pending:
            self.ctx.counts.copied += self.dedupe.fill(state)


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


def _budget(ctx: RunContext, *, quiet: bool = False) -> Budget | None:
    """The run's budget: the cap, less what earlier runs of the job spent (as billed,
    retries and re-asks included: the rows' usage columns sum them)."""
    if ctx.priced is None or ctx.job.limits.max_cost is None:
        return None
    currency = ctx.priced[0]
    spent = 0.0
    if ctx.state.shard_paths():
        report = cost_report(find_results(ctx.state.path), ctx.prices, region=ctx.region)
        spent = report.totals.get(currency, 0.0)
    budget = Budget(ctx.job.limits.max_cost, spent, currency)
    capped = (
        ""
        if ctx.job.request.max_tokens
        else (
            f"; requests without max_tokens count at {MAX_OUTPUT:,} output tokens until they "
            "answer (set max_tokens to spend closer to the cap)"
        )
    )
    if not quiet:
        ctx.sink(Notice(f"budget: {budget.text()} spent so far{capped}"))
    return budget


def _summary(ctx: RunContext, **fields: Any) -> RunSummary:
    counts: Counts = ctx.counts
    return RunSummary(
        output=ctx.job.output,
        total=ctx.info.total_rows,
        requests=counts.requests,
        batch_lines=counts.batch_lines,
        collected=counts.collected,
        copied=counts.copied,
        **fields,
    )


def _unfinished(ctx: RunContext, running: int, *, started: float, sent: int = 0) -> RunSummary:
    """A run that leaves rows pending (``--no-wait``, ``--then none``): no output yet."""
    total = ctx.info.total_rows
    done = ctx.state.done_mask(total).count()
    answered = ctx.state.done_mask(total, retry=frozenset({"error"})).count()
    summary = _summary(
        ctx,
        ok=answered,
        error=done - answered,
        sent=sent,
        elapsed_s=time.monotonic() - started,
        already_complete=False,
        pending=total - done,
        running_batches=running,
    )
    ctx.sink(RunFinished(summary))
    return summary


def _finish(
    ctx: RunContext,
    statuses: dict[str, int] | None,
    *,
    started: float,
    done: bool,
    sent: int = 0,
) -> RunSummary:
    if statuses is None:
        column = read_parquet(ctx.job.output, ["status"]).column("status")
        statuses = Counter(column.to_pylist())
    summary = _summary(
        ctx,
        ok=statuses.get("ok", 0),
        error=statuses.get("error", 0),
        sent=sent,
        elapsed_s=time.monotonic() - started,
        already_complete=done,
        invalid=statuses.get("invalid", 0),
    )
    ctx.sink(RunFinished(summary))
    return summary
