"""``batchq run --via batch``: the pending rows through the provider's Batch API, every
remote step recorded before the next, so that a run killed at any moment resumes without
uploading a file or creating a batch twice.

    export ─▶ upload ─▶ create ─▶ wait ─▶ download ─▶ import ─▶ delete remote files
      │         │          │                  │           │
      └─────────┴──────────┴── batches.json ──┴───────────┘   (written atomically)

The journal (``journal.py``: ``batches.json`` in the state folder) says how far each
file and its batch went. An upload whose answer was lost (killed before the id was
recorded) is found again by its name in ``GET /files``; a batch, by its metadata in
``GET /batches``.

A round is one export of the pending rows. After it, what the batches did not finish
(retryable failures, rows not reached before ``expired``) is sent live (``then="live"``,
by the caller), submitted as a new round (``"batch"``), or left pending (``"none"``).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio

from batchq.batch.api import export_rows, read_into, row_index
from batchq.batch.journal import (
    TERMINAL,
    Entry,
    Journal,
    endpoint_of,
    progress_line,
    take_batch,
    unknown_batch,
)
from batchq.batch.rules import MODEL_STUDIO, OPENAI, BatchRules, window_hours
from batchq.config import Job
from batchq.errors import BatchqError, Interrupted, RunStopped, UsageError
from batchq.events import Notice, Sink
from batchq.io.preflight import InputInfo
from batchq.state import StateDir

if TYPE_CHECKING:
    import httpx

    from batchq.batch.remote import Remote

__all__ = ["BatchPlan", "collect_or_refuse", "rules_of", "via_batch"]


class Selection(Protocol):
    """Which pending rows a round takes (the caller's budget, its dedupe), told when the
    round is exported and when it is collected."""

    def take(self, index: int, ident: str, body: dict[str, Any], done: bool) -> bool: ...

    def exported(self) -> None: ...

    def collected(self, state: StateDir) -> None: ...


class StopSwitch(Protocol):
    """The run's stop switch (``engine.stop``): pressed by a signal or an interrupt."""

    @property
    def presses(self) -> int: ...

    def press(self) -> None: ...

    async def pressed(self, times: int) -> None: ...


#: Rounds one command submits at most with ``then="batch"`` (rows failing in every round
#: are left pending).
MAX_ROUNDS = 3
POLL_MAX_S = 60.0
Then = Literal["live", "batch", "none"]


@dataclass(frozen=True)
class BatchPlan:
    """How a ``--via batch`` run goes: the CLI's ``--window``, ``--no-wait``, ``--then``,
    ``--keep-remote``; ``poll_s``, the first wait between polls (it grows to 60 s)."""

    window: str = "24h"
    wait: bool = True
    then: Then = "live"
    keep_remote: bool = False
    poll_s: float = 5.0
    #: whether to submit the pending rows (False: only collect what is submitted)
    submit: bool = True


def rules_of(job: Job) -> BatchRules:
    return MODEL_STUDIO if job.request.model_studio else OPENAI


def collect_or_refuse(state: StateDir, via: str, restart: bool, sink: Sink) -> None:
    """A live run, or ``--restart``, while batches of this job are on the provider would
    pay for their rows twice (or lose them): refused, saying how to collect them. The
    batches an earlier rehearsal left open went with its simulator: forgotten, said."""
    journal = Journal.load(state)
    if journal is None or not journal.open_entries():
        return
    if journal.simulated:
        if state.holder()[0]:  # the rehearsal is still on: opening the state refuses
            return
        gone = journal.open_entries()
        rows = journal.forget(gone)
        sink(
            Notice(
                f"{len(gone)} batches of an earlier rehearsal (--simulate) went with its "
                f"simulator: forgotten, their {rows:,} rows are pending again"
            )
        )
        return
    running = [e for e in journal.open_entries() if e.batch_id or e.uploading or e.creating]
    if via == "batch" and not restart:
        return
    if not running:
        return
    raise UsageError(
        f"{len(running)} batches of this job are on the provider, not collected yet: "
        "collect them with the same command and --via batch (or cancel them with "
        "`batchq batch cancel JOB`; if the provider no longer knows them, `batchq batch "
        "forget JOB`) first; a live run or --restart now would pay for their rows twice"
    )


async def via_batch(
    job: Job,
    info: InputInfo,
    state: StateDir,
    plan: BatchPlan,
    *,
    api_key: str | None,
    sink: Sink,
    stop: StopSwitch,
    transport: httpx.AsyncBaseTransport | None = None,
    select: Selection | None = None,
) -> bool:
    """Send ``job``'s pending rows (those ``select`` takes) through the Batch API into
    ``state``; False when the batches were submitted and left running (``plan.wait``
    false)."""
    rules = rules_of(job)
    window_hours(plan.window, rules)
    journal = Journal.load(state) or Journal.begin(state, plan.window, endpoint_of(job))
    if journal.endpoint is None:  # a journal from before endpoints were kept
        journal.endpoint = endpoint_of(job)
        journal.save()
    failed: BatchqError | None = None
    from batchq.batch.remote import Remote  # httpx: only a batch run loads it

    async with Remote(journal.url(job), api_key=api_key, transport=transport) as remote:
        flow = _Flow(job, info, state, plan, journal, remote, sink, stop, rules, select)
        async with anyio.create_task_group() as tg:
            if threading.current_thread() is threading.main_thread():
                tg.start_soon(_relay_signals, stop)
            try:
                collected = await flow.rounds()
            except BatchqError as e:  # raised as itself, not in an exception group
                failed = e
            finally:
                tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return collected


async def _relay_signals(stop: StopSwitch) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.press()


@dataclass
class _Flow:
    job: Job
    info: InputInfo
    state: StateDir
    plan: BatchPlan
    journal: Journal
    remote: Remote
    sink: Sink
    stop: StopSwitch
    rules: BatchRules
    select: Selection | None = None

    async def rounds(self) -> bool:
        """Submit, wait and collect round after round (see ``via_batch``)."""
        rounds = 0
        while True:
            if not self.journal.open_entries():
                last = rounds and (self.plan.then != "batch" or rounds >= MAX_ROUNDS)
                if not self.plan.submit or last or not self.export_round():
                    return True
            rounds += 1
            await self.submit()
            if not self.plan.wait:
                return False
            await self.wait()
            await self.collect()

    def export_round(self) -> bool:
        """Export the pending rows as the next round's files; False when none is pending."""
        done = self.state.done_mask(self.info.total_rows)
        if done.count() == self.info.total_rows:
            return False
        number = self.journal.rounds + 1
        folder = self.state.batch_files / f"r{number}"
        take = self.select.take if self.select is not None else None
        exported = export_rows(
            self.job,
            self.info,
            folder,
            done,
            max_lines=self.rules.max_lines,
            max_bytes=self.rules.max_bytes,
            take=take,
        )
        if self.select is not None:
            self.select.exported()
        if not exported.rows:
            return False
        for i, file in enumerate(exported.files, start=1):
            key, path = f"r{number}-{i:03d}", f"r{number}/{file['file']}"
            self.journal.entries.append(Entry(key, file["model"], file["lines"], path))
        self.journal.rounds = number
        self.journal.save()
        where = f"{self.rules.name}'s Batch API"
        self.sink(
            Notice(
                f"batch: {exported.rows:,} rows in {len(exported.files)} files "
                f"(round {number}), submitting them to {where}"
            )
        )
        return True

    async def submit(self) -> None:
        """Upload each file and create its batch, recording each step before the next."""
        for entry in self.journal.open_entries():
            self._check_stop("before every batch was submitted")
            if entry.file_id is None:
                await self._upload(entry)
            if entry.batch_id is None:
                await self._create(entry)

    async def _upload(self, entry: Entry) -> None:
        name = self.journal.name(entry)
        found = await self.remote.find_file(name) if entry.uploading else None
        if found is None:
            entry.uploading = True
            self.journal.save()  # before the upload: a lost answer is looked for by name
            found = await self.remote.upload(self.state.batch_files / entry.path, name)
        entry.file_id = str(found["id"])
        self.journal.save()

    async def _create(self, entry: Entry) -> None:
        assert entry.file_id is not None
        metadata = self.journal.metadata(entry)
        found = await self.remote.find_batch(metadata) if entry.creating else None
        if found is None:
            entry.creating = True
            self.journal.save()  # before the create: a lost answer is found by metadata
            found = await self.remote.create(entry.file_id, self.journal.window, metadata)
        self._seen(entry, found)
        self.sink(
            Notice(f"batch {entry.batch_id} ({entry.model}, {entry.lines:,} rows): {entry.status}")
        )

    def _seen(self, entry: Entry, batch: dict[str, Any]) -> bool:
        """Record what the provider says of ``entry``'s batch; whether it changed."""
        changed = take_batch(entry, batch)
        self.journal.save()
        return changed

    async def wait(self) -> None:
        """Poll the open batches until each is finished, no faster than ``poll_s``,
        slower as they take longer (to POLL_MAX_S)."""
        delay = self.plan.poll_s
        while waiting := [e for e in self.journal.open_entries() if e.status not in TERMINAL]:
            for entry in waiting:
                assert entry.batch_id is not None
                batch = await self.remote.batch(entry.batch_id)
                if batch is None:
                    raise RunStopped(unknown_batch(entry))
                if self._seen(entry, batch):
                    self.sink(Notice(progress_line(entry)))
            if all(e.status in TERMINAL for e in waiting):
                return
            with anyio.move_on_after(delay):
                await self.stop.pressed(1)
            self._check_stop("while waiting")
            delay = min(delay * 1.5, POLL_MAX_S)

    def _check_stop(self, when: str) -> None:
        if self.stop.presses:
            running = sum(1 for e in self.journal.open_entries() if e.batch_id)
            raise Interrupted(
                f"stopped {when}: {running} batches keep running on the provider (they are "
                "not cancelled); rerun the same command to collect them, or `batchq batch "
                "cancel JOB` to cancel them"
            )

    async def collect(self) -> None:
        """Download each finished batch's files, import them, then delete the remote
        files (unless ``keep_remote``)."""
        rows = row_index(self.job, self.info)
        for entry in self.journal.open_entries():
            if entry.status == "failed":
                errors = "; ".join(str(e.get("message") or e.get("code")) for e in entry.errors)
                self.sink(
                    Notice(
                        f"batch {entry.batch_id} ({entry.model}) failed validation: "
                        f"{errors or 'the provider gave no reason'}; its "
                        f"{entry.lines:,} rows stay pending"
                    )
                )
            files = await self._download(entry)
            _, retryable = read_into(self.state, self.job, self.info, files, rows)
            if retryable:
                what = "as a live run would retry (5xx, 429, expired): pending"
                self.sink(Notice(f"batch {entry.batch_id}: {len(retryable):,} rows failed {what}"))
            entry.imported = True
            self.journal.save()
            if self.select is not None:
                self.select.collected(self.state)
            if not self.plan.keep_remote:
                await self.clean(entry)

    async def _download(self, entry: Entry) -> list[Path]:
        paths = []
        for kind, file_id in (("output", entry.output_file_id), ("error", entry.error_file_id)):
            if not file_id:
                continue
            local = f"{entry.key}-{kind}.jsonl"
            path = self.state.batch_files / local
            if local not in entry.downloaded:
                await self.remote.download(file_id, path)
                entry.downloaded.append(local)
                self.journal.save()
            paths.append(path)
        return paths

    async def clean(self, entry: Entry) -> None:
        """Delete the entry's files on the provider; a failure is a notice, not an error."""
        ids = [i for i in (entry.file_id, entry.output_file_id, entry.error_file_id) if i]
        try:
            for file_id in ids:
                await self.remote.delete(file_id)
        except Exception as e:
            self.sink(
                Notice(
                    f"batch {entry.batch_id}: could not delete its files on the "
                    f"provider ({e}); delete {', '.join(ids)} by hand"
                )
            )
            return
        entry.cleaned = True
        self.journal.save()
