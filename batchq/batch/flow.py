"""``batchq run --via batch``: the pending rows through the provider's Batch API, every
remote step recorded before the next, so that a run killed at any moment resumes without
uploading a file or creating a batch twice.

    export ─▶ upload ─▶ create ─▶ wait ─▶ download ─▶ import ─▶ delete remote files
      │         │          │                  │           │
      └─────────┴──────────┴── batches.json ──┴───────────┘   (written atomically)

The journal (``batches.json`` in the state folder) holds a token made once for the state
folder, and an entry per file: its model and lines, the name it is uploaded as (the
token and the file's key), ``uploading`` / ``file_id``, ``creating`` / ``batch_id``,
the batch's last status and counts, what was downloaded, whether it was imported and
cleaned up. An upload whose answer was lost (killed before the id was recorded) is found
again by its name in ``GET /files``; a batch, by its metadata in ``GET /batches``.

A round is one export of the pending rows. After it, what the batches did not finish
(retryable failures, rows not reached before ``expired``) is sent live (``then="live"``,
by the caller), submitted as a new round (``"batch"``), or left pending (``"none"``).
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import orjson

from batchq.batch.api import export_rows, read_into, row_index
from batchq.batch.rules import MODEL_STUDIO, OPENAI, BatchRules, window_hours
from batchq.config import Job
from batchq.errors import BatchqError, Interrupted, RunStopped, UsageError
from batchq.events import Notice, Sink
from batchq.files import write_atomic
from batchq.io.preflight import InputInfo
from batchq.state import StateDir

if TYPE_CHECKING:
    import httpx

    from batchq.batch.remote import Remote

__all__ = [
    "SIMULATOR",
    "BatchPlan",
    "Entry",
    "Journal",
    "collect_or_refuse",
    "endpoint_of",
    "rules_of",
    "via_batch",
]


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


TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: Rounds one command submits at most with ``then="batch"`` (rows failing in every round
#: are left pending).
MAX_ROUNDS = 3
POLL_MAX_S = 60.0
Then = Literal["live", "batch", "none"]
#: The journal's endpoint when its batches went to the built-in simulator (``--simulate``).
#: That simulator lives as long as its command: its batches are never looked up again,
#: here or on a real endpoint, and a later command forgets those it left open.
SIMULATOR = "the built-in simulator"
#: An entry's status once forgotten: its rows are pending again.
FORGOTTEN = "forgotten"


def endpoint_of(job: Job) -> str:
    """Where ``job``'s batches go: its endpoint, or SIMULATOR for a rehearsal."""
    return SIMULATOR if job.request.simulated else job.request.url


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


@dataclass
class Entry:
    """One uploaded file and its batch, as far as they went."""

    key: str  # r<round>-<number>: the file's name in the journal and on the provider
    model: str
    lines: int
    path: str  # relative to the state folder's batch/ folder
    uploading: bool = False
    file_id: str | None = None
    creating: bool = False
    batch_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    created_at: int | None = None
    expires_at: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    downloaded: list[str] = field(default_factory=list)
    imported: bool = False
    cleaned: bool = False

    @property
    def done(self) -> bool:
        """Nothing is left to do for it here (collected, forgotten, or never created)."""
        return self.imported

    @property
    def collected(self) -> bool:
        """Its batch finished and its results were read in."""
        return self.imported and self.status in TERMINAL


@dataclass
class Journal:
    """The state folder's ``batches.json``: what was done remotely, and what is next."""

    token: str
    window: str
    rounds: int = 0
    #: where the batches are (``endpoint_of``); None in a journal from before it was kept
    endpoint: str | None = None
    entries: list[Entry] = field(default_factory=list)
    path: Path = Path()

    @classmethod
    def load(cls, state: StateDir) -> Journal | None:
        try:
            data = orjson.loads(state.batch_journal.read_bytes())
        except FileNotFoundError:
            return None
        entries = [Entry(**e) for e in data.pop("entries")]
        return cls(**data, entries=entries, path=state.batch_journal)

    @classmethod
    def begin(cls, state: StateDir, window: str, endpoint: str) -> Journal:
        journal = cls(secrets.token_hex(8), window, endpoint=endpoint, path=state.batch_journal)
        journal.save()
        return journal

    def save(self) -> None:
        data = {
            "token": self.token,
            "window": self.window,
            "rounds": self.rounds,
            "endpoint": self.endpoint,
            "entries": [asdict(e) for e in self.entries],
        }
        text = orjson.dumps(data, option=orjson.OPT_INDENT_2)
        write_atomic(self.path, lambda f: f.write(text))

    def open_entries(self) -> list[Entry]:
        return [e for e in self.entries if not e.done]

    @property
    def simulated(self) -> bool:
        """Whether the batches went to a built-in simulator, gone with its command."""
        return self.endpoint == SIMULATOR

    def url(self, job: Job) -> str:
        """Where the batches are looked up: where they went (the job's endpoint for a
        journal that did not keep it). A rehearsal's are this command's simulator's: an
        earlier command's were forgotten before this one began (``collect_or_refuse``)."""
        if self.simulated:
            assert job.request.simulated, "a rehearsal's batches asked of a real endpoint"
            return job.request.url
        return self.endpoint or job.request.url

    def forget(self, entries: list[Entry]) -> int:
        """Give ``entries`` up (their batches are gone): their rows are pending again,
        for the next run to send. The rows they held."""
        for entry in entries:
            entry.status, entry.imported, entry.cleaned = FORGOTTEN, True, True
        self.save()
        return sum(e.lines for e in entries)

    def name(self, entry: Entry) -> str:
        """The file's name on the provider: found again by it after a lost answer."""
        return f"batchq-{self.token}-{entry.key}.jsonl"

    def metadata(self, entry: Entry) -> dict[str, str]:
        return {"batchq_run": self.token, "batchq_file": entry.key}


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
        changed = _take(entry, batch)
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
                    raise RunStopped(_unknown(entry))
                if self._seen(entry, batch):
                    self.sink(Notice(_progress(entry)))
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


def _take(entry: Entry, batch: dict[str, Any]) -> bool:
    """``entry`` as the provider's ``batch`` object says; whether its status or counts
    changed."""
    counts = {k: int(v or 0) for k, v in (batch.get("request_counts") or {}).items()}
    before = (entry.status, entry.counts)
    entry.batch_id = str(batch["id"])
    entry.status = str(batch.get("status"))
    entry.counts = counts
    entry.created_at = batch.get("created_at")
    entry.expires_at = batch.get("expires_at")
    entry.output_file_id = batch.get("output_file_id")
    entry.error_file_id = batch.get("error_file_id")
    entry.errors = list((batch.get("errors") or {}).get("data") or [])
    return before != (entry.status, entry.counts)


def _unknown(entry: Entry) -> str:
    return (
        f"the provider no longer knows batch {entry.batch_id} ({entry.model}, "
        f"{entry.lines:,} rows): `batchq batch forget JOB` forgets it, and the next run "
        "sends its rows again"
    )


def _progress(entry: Entry) -> str:
    counts = entry.counts
    total = counts.get("total") or entry.lines
    done, failed = counts.get("completed", 0), counts.get("failed", 0)
    return (
        f"batch {entry.batch_id} ({entry.model}): {entry.status}, {done:,}/{total:,} "
        f"done, {failed:,} failed"
    )


def describe(entry: Entry) -> dict[str, Any]:
    """An entry as ``batchq batch status`` shows it."""
    return {
        "batch_id": entry.batch_id,
        "model": entry.model,
        "key": entry.key,
        "status": entry.status or ("uploading" if entry.file_id is None else "creating"),
        "counts": entry.counts,
        "created_at": entry.created_at,
        "expires_at": entry.expires_at,
        "collected": entry.collected,
        "age_s": int(time.time() - entry.created_at) if entry.created_at else None,
    }


async def refreshed(
    job: Job, api_key: Callable[[], str | None], *, ask: bool = True
) -> list[Entry]:
    """The job's batches, each as the provider says it is now (the journal unchanged);
    as last recorded when not ``ask`` (``--simulate``: no key, no network), and for a
    rehearsal's batches, which went with its simulator. ``api_key`` is called only when
    the provider is asked."""
    journal = Journal.load(StateDir.of(job.output))
    if journal is None:
        return []
    open_ = [e for e in journal.open_entries() if e.batch_id]
    if journal.simulated:
        for entry in journal.open_entries():
            entry.status = "gone with the rehearsal's simulator"
        return journal.entries
    if not ask or not open_:
        return journal.entries
    from batchq.batch.remote import Remote  # httpx: only a batch run loads it

    async with Remote(journal.url(job), api_key=api_key()) as remote:
        for entry in open_:
            assert entry.batch_id is not None
            batch = await remote.batch(entry.batch_id)
            if batch is None:
                entry.status = "unknown to the provider (`batchq batch forget JOB`)"
            else:
                _take(entry, batch)
    return journal.entries


@dataclass
class Outcome:
    """What ``cancel`` or ``forget`` did: the batches it cancelled or forgot, and a word
    on each it left as it was."""

    done: list[str] = field(default_factory=list)
    rows: int = 0
    notes: list[str] = field(default_factory=list)


async def cancel(job: Job, api_key: Callable[[], str | None]) -> Outcome:
    """Cancel the job's batches still running on the provider. A rehearsal's are gone
    with its simulator: forgotten instead."""
    state = StateDir.of(job.output)
    journal = Journal.load(state)
    outcome = Outcome()
    if journal is None or not journal.open_entries():
        return outcome
    if journal.simulated:
        return _forget_rehearsal(journal)
    held = state.holder()[0]  # a run waits on them: it alone writes the journal
    from batchq.batch.remote import Remote  # httpx: only a batch run loads it

    async with Remote(journal.url(job), api_key=api_key()) as remote:
        for entry in journal.open_entries():
            if entry.batch_id is None and not held:
                await _never_submit(journal, entry, remote)
            if entry.batch_id is None:
                continue
            batch = await remote.batch(entry.batch_id)
            if batch is None:
                outcome.notes.append(_unknown(entry))
            elif batch.get("status") not in TERMINAL:
                await remote.cancel(entry.batch_id)
                outcome.done.append(entry.batch_id)
    return outcome


async def forget(job: Job, api_key: Callable[[], str | None]) -> Outcome:
    """Forget the job's batches the provider no longer knows (or that went with a
    rehearsal's simulator): their rows are pending again. A batch the provider still
    knows is kept: forgetting it could pay for its rows twice."""
    state = StateDir.of(job.output)
    if state.holder()[0]:
        raise UsageError(
            f"a run is using {state.path}: stop it (or let it end) first; "
            "it collects its batches itself"
        )
    journal = Journal.load(state)
    outcome = Outcome()
    if journal is None or not journal.open_entries():
        return outcome
    if journal.simulated:
        return _forget_rehearsal(journal)
    from batchq.batch.remote import Remote  # httpx: only a batch run loads it

    gone: list[Entry] = []
    async with Remote(journal.url(job), api_key=api_key()) as remote:
        for entry in journal.open_entries():
            if entry.batch_id is None:
                await _never_submit(journal, entry, remote)
                if entry.batch_id is None:  # it never became a batch: dropped already
                    outcome.done.append(entry.key)
                    outcome.rows += entry.lines
                    continue
            batch = await remote.batch(entry.batch_id)
            if batch is None:
                gone.append(entry)
                continue
            status = batch.get("status")
            then = (
                "`batchq batch cancel JOB` cancels it"
                if status not in TERMINAL
                else "`batchq run JOB --via batch` collects it"
            )
            outcome.notes.append(
                f"batch {entry.batch_id} is {status} on the provider: kept ({then})"
            )
    outcome.rows += journal.forget(gone)
    outcome.done += [str(e.batch_id) for e in gone]
    return outcome


def _forget_rehearsal(journal: Journal) -> Outcome:
    gone = journal.open_entries()
    rows = journal.forget(gone)
    return Outcome(
        [e.batch_id or e.key for e in gone],
        rows,
        ["the rehearsal's batches went with its simulator"],
    )


async def _never_submit(journal: Journal, entry: Entry, remote: Remote) -> None:
    """A file uploaded (or about to be) whose batch may not exist: the batch, if its
    creation got through (to be cancelled); else the entry is dropped, its file deleted."""
    found = await remote.find_batch(journal.metadata(entry)) if entry.creating else None
    if found is not None:
        _take(entry, found)
    else:
        if entry.file_id is None and entry.uploading:
            found_file = await remote.find_file(journal.name(entry))
            entry.file_id = str(found_file["id"]) if found_file else None
        if entry.file_id is not None:
            await remote.delete(entry.file_id)
        entry.status, entry.imported, entry.cleaned = "not submitted", True, True
    journal.save()
