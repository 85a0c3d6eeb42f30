"""``batchq.ray.map``: a Ray Dataset's rows sent as requests, the output columns added to
each row; a lazy Dataset transform, under one budget for every block (the Ray engine's
pacing actor, see ``engine.ray_actors``).

    >>> import ray, batchq.ray
    >>> ds = ray.data.from_items([{"id": "a", "prompt": "Hi"}])
    >>> labeled = batchq.ray.map(ds, model="qwen-plus", simulate=True)  # doctest: +SKIP

With ``output=`` (a path every worker reaches) each block journals its rows into that
output's state folder as it goes, and a rerun sends only the rows whose id (``id_column``,
required then) has no result there yet.
"""

from __future__ import annotations

import random
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import anyio
import pyarrow as pa

from batchq.answer import Checker
from batchq.api import _FRONT, RunKeys, _answer, _check_names, _endpoint, _options
from batchq.config import Job, load_job
from batchq.engine.context import Counts
from batchq.engine.live import FLUSH_EVERY_S, Journal
from batchq.engine.ray_actors import ChunkPacer, Pacing, SharedBudget
from batchq.engine.ray_cluster import connect, default_workers, import_ray
from batchq.engine.work import Channel, EndpointWatch, Item, QuotaWatch, send_row
from batchq.errors import UsageError
from batchq.money.budget import Budget
from batchq.money.pricing import Price, PriceTable, RowPricer, region_of
from batchq.result import COST, Result, output_fields, shard_table
from batchq.send.client import Client
from batchq.send.request import build_body, completion_cap, estimate_tokens
from batchq.state import StateDir
from batchq.state.layout import state_path

__all__ = ["map"]

#: Rows of a block sent at once by one worker.
BATCH_ROWS = 256


def map(ds: Any, /, **keys: Unpack[RunKeys]) -> Any:
    """``ds`` (a ``ray.data.Dataset``) with each row's request sent and the output
    columns (``status``, ``response``, the usage, ``cost``, ...) added; the keywords are
    ``batchq.run``'s (``workers``: the blocks sent at once). Lazy: nothing is sent until
    the Dataset is consumed. ``simulate=True`` serves the simulator for this process."""
    settings: dict[str, Any] = dict(keys)
    _check_names(settings, RunKeys, "batchq.ray.map")
    front = {k: settings.pop(k) for k in _FRONT if k in settings}
    options = _options(settings)
    answers, _ = _answer(front.get("answer"))
    job = load_job(
        None, overrides={"input": "dataset", **settings, **answers}, source="batchq.ray.map"
    )
    output = Path(front["output"]).absolute() if front.get("output") else None
    if output is not None and job.id_column is None:
        raise UsageError(
            "batchq.ray.map(output=...) finds the rows done by their id: give "
            "id_column=, the column that names each row"
        )
    stack = ExitStack()  # the simulator lives as long as this process (the Dataset is lazy)
    job, key = _endpoint(job, stack, simulate=bool(front.get("simulate")))
    connect(job.ray_address)
    prices = PriceTable.load(None)
    region = region_of(job.request.provider)
    budget, priced = None, dict[str, Price]()
    if job.limits.max_cost is not None:
        currency, priced = Budget.check({str(job.request.model)}, prices, region)
        budget = (job.limits.max_cost, 0.0, currency)
    ray = import_ray()
    pacing = (
        ray.remote(Pacing)
        .options(name=f"batchq-map-{uuid.uuid4().hex[:8]}", num_cpus=0, max_restarts=0)
        .remote(job.limits, budget)
    )
    workers = job.workers or default_workers()
    rename = {c: form for form in ("messages", "prompt") if (c := front.get(form)) is not None}
    setup = _MapSetup(
        job,
        key,
        max(1, job.limits.concurrency // workers),
        output,
        priced,
        options.keep_raw,
        rename,
    )
    return ds.map_batches(
        _SendBlock,
        fn_constructor_args=(setup, pacing),
        batch_format="pyarrow",
        batch_size=BATCH_ROWS,
        concurrency=workers,
        num_cpus=0,
        zero_copy_batch=True,
    )


@dataclass(frozen=True)
class _MapSetup:
    job: Job
    api_key: str | None
    slots: int
    output: Path | None
    prices: dict[str, Price]
    keep_raw: bool
    rename: dict[str, str]


class _SendBlock:
    """One worker of ``map``: sends each block it is given (a pyarrow Table)."""

    def __init__(self, setup: _MapSetup, pacing: Any) -> None:
        self._setup, self._pacing = setup, pacing
        self._fields = output_fields(answers=setup.job.answer is not None, keep_raw=setup.keep_raw)
        self._pricer = RowPricer(PriceTable.load(None), region_of(setup.job.request.provider))
        self._state: StateDir | None = None
        self._done: dict[str, dict[str, Any]] = {}
        if setup.output is not None:
            folder = state_path(setup.output)
            StateDir.of(setup.output).shards.mkdir(parents=True, exist_ok=True)
            self._state = StateDir.writer(folder, f"m{uuid.uuid4().hex[:8]}")
            for table in self._state.by_id([f.name for f in self._result_fields]):
                for row in table.to_pylist():
                    self._done[row.pop("_id")] = row

    @property
    def _result_fields(self) -> list[pa.Field]:
        return [f for f in self._fields if f.name != COST.name]

    def __call__(self, block: pa.Table) -> pa.Table:
        rows = block.rename_columns([self._setup.rename.get(n, n) for n in block.column_names])
        results: dict[int, dict[str, Any]] = {}
        items = []
        for i, row in enumerate(rows.to_pylist()):
            ident = str(row.get(self._setup.job.id_column)) if self._setup.job.id_column else str(i)
            if ident in self._done:
                results[i] = self._done[ident]
                continue
            body = build_body(row, self._setup.job.request)
            items.append(Item(i, ident, body, estimate_tokens(body), completion_cap(body)))
        sent = anyio.run(self._send, items) if items else []
        if sent:  # one table for the block's answers, not one a row
            names = [f.name for f in self._result_fields]
            answered = shard_table(sent).select(names).to_pylist()
            results.update((r.row, values) for r, values in zip(sent, answered, strict=True))
        table = pa.Table.from_pylist(
            [results[i] for i in range(block.num_rows)], schema=pa.schema(self._result_fields)
        )
        at = [f.name for f in self._fields].index(COST.name)
        table = table.add_column(at, COST, self._pricer(table))
        for name, column in zip(table.column_names, table.columns, strict=True):
            block = block.append_column(name, column)
        return block

    async def _send(self, items: list[Item]) -> list[Result]:
        setup, job = self._setup, self._setup.job
        done: list[Result] = []
        journal = Journal(self._state, lambda event: None) if self._state else None
        pacer = ChunkPacer(self._pacing, setup.slots)
        client = Client(
            job.request.url,
            api_key=setup.api_key,
            timeout_s=job.limits.timeout_s,
            max_connections=setup.slots,
            keep_raw=setup.keep_raw,
        )
        channel = Channel(
            client,
            pacer,
            job.limits.max_attempts,
            lambda event: None,
            anyio.sleep,
            random.Random(),
            QuotaWatch(),
            EndpointWatch(client.url),
            keep=journal.add if journal else None,
            budget=SharedBudget(self._pacing) if setup.prices else None,
            prices=setup.prices,
            counts=Counts(),
        )
        checker = Checker(job.answer) if job.answer is not None else None
        queue = list(reversed(items))

        async def work() -> None:
            while queue:
                row = await send_row(queue.pop(), channel, checker=checker)
                done.append(row)
                if journal is not None:
                    journal.add(row)

        async def flush() -> None:
            while journal is not None:
                await anyio.sleep(FLUSH_EVERY_S)
                journal.flush()

        try:
            async with client, anyio.create_task_group() as tg:
                tg.start_soon(pacer.report)
                tg.start_soon(flush)
                async with anyio.create_task_group() as pool:
                    for _ in range(min(len(items), setup.slots)):
                        pool.start_soon(work)
                tg.cancel_scope.cancel()
        finally:
            if journal is not None:
                journal.flush()
        return done
