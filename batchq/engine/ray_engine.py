"""The Ray engine's sending stage (``--engine ray``): the same stage as ``engine.live``,
over the same run context, with the rows sent by workers on Ray (``actors``).

    driver: plan (done rows, dedupe) ─chunks─▶ the least busy sender
            every DRAIN_EVERY_S, each sender: rows finished (in its shards), events
            a sender lost: its rows not journalled go to the others

Everything before and after (checks, budget set-up, the merge, reports) is the runner's,
shared with the local engine. The driver holds the run's progress and nothing of the
input but the rows in flight (at most HELD_PER_SLOT a slot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anyio

from batchq.engine.context import RunContext
from batchq.engine.dedupe import Dedupe
from batchq.engine.live import STOP_GRACE_S, fill_copies, pending_items, resume_from
from batchq.engine.ray_actors import Owner, Pacing, Report, Sender, SenderSetup, _node
from batchq.engine.ray_cluster import awaited, connect, default_workers, import_ray
from batchq.engine.work import Item
from batchq.errors import BatchqError, Interrupted, RunStopped, UsageError
from batchq.events import Notice, Tick
from batchq.money.budget import Budget
from batchq.state import RowMask

__all__ = ["send_ray"]

#: How often the driver asks each sender what it finished (also its heartbeat).
DRAIN_EVERY_S = 0.2
#: Rows put to a sender at once, and rows a sender holds at most, per slot.
CHUNK_ROWS, HELD_PER_SLOT = 16, 8


async def send_ray(
    ctx: RunContext,
    done: RowMask,
    prior: dict[int, dict[str, Any]],
    *,
    budget: Budget | None,
    dedupe: Dedupe | None,
) -> None:
    """``engine.live.send_live``'s contract, on Ray (see the module doc)."""
    end = connect(ctx.job.ray_address, verbose=ctx.options.verbose)
    try:
        fleet = _Fleet.start(ctx, budget, todo=len(done) - done.count())
        try:
            await fleet.run(pending_items(ctx, done, prior, dedupe))
        finally:
            fleet.kill()
    finally:
        end()
    fill_copies(ctx, dedupe)


class _Fleet:
    """The run's pacing actor and senders, seen from the driver."""

    def __init__(self, ctx: RunContext, pacing: Any, senders: list[Any], slots: list[int]) -> None:
        self.ctx, self.pacing, self.senders, self.slots = ctx, pacing, senders, slots
        self.held: list[dict[int, Item]] = [{} for _ in senders]
        self.alive = set(range(len(senders)))
        self.room = anyio.Event()
        self.stopped: BatchqError | None = None
        self.stopping = False
        self.replanning = 0  # lost senders whose rows are being put to the others

    @classmethod
    def start(cls, ctx: RunContext, budget: Budget | None, *, todo: int) -> _Fleet:
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        job = ctx.job
        workers = max(
            1, min(job.workers or default_workers(), job.limits.concurrency, max(1, todo))
        )
        share, extra = divmod(job.limits.concurrency, workers)
        slots = [share + (i < extra) for i in range(workers)]
        run = uuid.uuid4().hex[:8]
        held = (budget.cap, budget.billed, budget.currency) if budget is not None else None
        pacing = (
            ray.remote(Pacing)
            .options(
                name=f"batchq-pacing-{run}",
                num_cpus=0,
                max_restarts=0,
                max_task_retries=0,
            )
            .remote(job.limits, held)
        )
        owner = Owner(_node(), os.getpid())
        prices = ctx.priced[1] if ctx.priced else {}
        actor = ray.remote(Sender)
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        senders = []
        for i, n in enumerate(slots):
            setup = SenderSetup(
                job,
                ctx.state.path,
                n,
                ctx.options.keep_raw,
                ctx.options.seed,
                prices,
                budget is not None,
                owner,
            )
            # Round the nodes: a fleet's replicas are reached from every machine.
            spread = NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)
            senders.append(
                actor.options(
                    name=f"batchq-sender-{run}-{i + 1}",
                    num_cpus=0,
                    max_restarts=0,
                    max_task_retries=0,
                    scheduling_strategy=spread,
                ).remote(setup, ctx.api_key, pacing, f"w{i + 1}")
            )
        return cls(ctx, pacing, senders, slots)

    async def run(self, items: Iterator[Item]) -> None:
        ctx = self.ctx
        await self._check_state()
        runs = [s.run.remote() for s in self.senders]
        async with anyio.create_task_group() as tg:
            for i in range(len(self.senders)):
                tg.start_soon(self._drain, i)
            tg.start_soon(self._pace_events)
            if threading.current_thread() is threading.main_thread():
                tg.start_soon(self._relay_signals)
            tg.start_soon(self._watch_stop)
            await self._feed(items)
            while (any(self.held[i] for i in self.alive) or self.replanning) and not self._ending:
                await self._wait_room()
            for i in sorted(self.alive):
                self.senders[i].close.remote()
            with anyio.move_on_after(STOP_GRACE_S + 5):
                for i in sorted(self.alive):
                    await _quietly(runs[i])
            await self._last_drains()
            tg.cancel_scope.cancel()
        if self.stopped is not None:
            raise self.stopped
        if self.stopping or ctx.stop.presses:
            raise Interrupted(
                "stopped: finished rows are saved; rerun the same command to "
                "resume (from Python: the same call)"
            )
        if any(self.held):
            raise RunStopped(
                f"{sum(map(len, self.held)):,} rows were not sent: every Ray "
                "worker was lost; rerun the same command to resume"
            )

    @property
    def _ending(self) -> bool:
        return self.stopping or self.stopped is not None or not self.alive

    async def _check_state(self) -> None:
        """Every sender can write the state folder (one machine, or a shared path)."""
        nodes = {node for node, _ in [await awaited(s.where.remote()) for s in self.senders]}
        self.ctx.sink(
            Notice(
                f"ray: {len(self.senders)} workers on {len(nodes)} "
                f"node{'s' if len(nodes) > 1 else ''}"
            )
        )
        for i, sender in enumerate(self.senders):
            problem = await awaited(sender.check_state.remote())
            if problem is not None:
                self.kill()
                raise UsageError(
                    f"Ray worker {i + 1} cannot write the state folder "
                    f"{self.ctx.state.path} ({problem}): give an --output on a "
                    "path every node reaches (one machine, or a shared "
                    "filesystem)"
                )

    async def _feed(self, items: Iterator[Item]) -> None:
        chunk: list[Item] = []
        for item in items:
            if self._ending:
                return
            chunk.append(item)
            if len(chunk) == CHUNK_ROWS:
                await self._put(chunk)
                chunk = []
        if chunk:
            await self._put(chunk)

    async def _put(self, chunk: list[Item]) -> None:
        """To the alive sender holding the fewest rows for its slots, when it has room."""
        while not self._ending:
            i = min(self.alive, key=lambda k: len(self.held[k]) / self.slots[k])
            if len(self.held[i]) + len(chunk) <= self.slots[i] * HELD_PER_SLOT + CHUNK_ROWS:
                self.held[i].update((item.row, item) for item in chunk)
                self.senders[i].put.remote(chunk)
                return
            await self._wait_room()

    async def _wait_room(self) -> None:
        with anyio.move_on_after(DRAIN_EVERY_S * 2):
            await self.room.wait()

    def _freed(self) -> None:
        self.room.set()
        self.room = anyio.Event()

    async def _drain(self, i: int) -> None:
        ray = import_ray()
        sender = self.senders[i]
        while True:
            try:
                report = await awaited(sender.drain.remote())
            except ray.exceptions.RayActorError:
                await self._lost(i)
                return
            self._take(i, report)
            if report.done:
                return
            await anyio.sleep(DRAIN_EVERY_S)

    def _take(self, i: int, report: Report) -> None:
        for row in report.rows:
            self.held[i].pop(row, None)
        for event in report.events:
            self.ctx.sink(event)
        self.ctx.counts.requests += report.requests
        if report.stopped is not None and self.stopped is None:
            self.stopped = report.stopped
            self._stop_all()
        self._freed()

    async def _last_drains(self) -> None:
        ray = import_ray()
        for i in sorted(self.alive):
            try:
                self._take(i, await awaited(self.senders[i].drain.remote()))
            except ray.exceptions.RayActorError:
                await self._lost(i)

    async def _lost(self, i: int) -> None:
        """Sender ``i`` died: its rows not journalled go to the others."""
        self.alive.discard(i)
        rows, self.held[i] = self.held[i], {}
        if not rows:
            return
        ctx = self.ctx
        reasks = ctx.job.answer.reasks if ctx.job.answer is not None else None
        done = ctx.state.done_mask(ctx.info.total_rows, reasks=reasks)
        prior = ctx.state.prior_by_row(frozenset(), reasks)
        again = []
        for row, item in sorted(rows.items()):
            if not done[row]:
                earlier = prior.get(row, item.prior)
                again.append(
                    dataclasses.replace(
                        item, prior=earlier, resume=resume_from(earlier) or item.resume
                    )
                )
        ctx.sink(
            Notice(
                f"Ray worker {i + 1} was lost: {len(rows) - len(again):,} of its rows "
                f"were saved; the other workers send the {len(again):,} others"
            )
        )
        if not self.alive or self._ending:
            self.held[i] = {item.row: item for item in again}  # reported as not sent
            return
        self.replanning += 1  # no sender is closed while they are put
        try:
            for start in range(0, len(again), CHUNK_ROWS):
                await self._put(again[start : start + CHUNK_ROWS])
        finally:
            self.replanning -= 1

    async def _pace_events(self) -> None:
        while True:
            await anyio.sleep(1.0)
            for event in await awaited(self.pacing.events.remote()):
                self.ctx.sink(event)
            self.ctx.sink(Tick())

    async def _relay_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.ctx.stop.press()

    async def _watch_stop(self) -> None:
        await self.ctx.stop.pressed(1)
        self.stopping = True
        self.ctx.sink(Notice(f"stopping: waiting up to {STOP_GRACE_S:g} s for requests in flight"))
        self._stop_all()

    def _stop_all(self) -> None:
        for i in sorted(self.alive):
            self.senders[i].stop.remote()
        self._freed()

    def kill(self) -> None:
        """No actor of the run outlives it (Ray's own retries are off: none comes back)."""
        ray = import_ray()
        for actor in (*self.senders, self.pacing):
            with contextlib.suppress(Exception):  # gone already
                ray.kill(actor, no_restart=True)


async def _quietly(ref: Any) -> None:
    with contextlib.suppress(Exception):  # a lost sender: its drain says so
        await awaited(ref)
