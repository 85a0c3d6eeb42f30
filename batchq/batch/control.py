"""What ``batchq batch status``, ``cancel`` and ``forget`` do to a job's batches: look
them up, cancel those still running, forget those the provider no longer knows (their
rows are pending again). The journal (``journal.py``) is the record they read and keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchq.batch.journal import TERMINAL, Entry, Journal, take_batch, unknown_batch
from batchq.config import Job
from batchq.errors import UsageError
from batchq.state import StateDir

if TYPE_CHECKING:
    from batchq.batch.remote import Remote

__all__ = ["Outcome", "cancel", "forget", "refreshed"]


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
                take_batch(entry, batch)
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
                outcome.notes.append(unknown_batch(entry))
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
        take_batch(entry, found)
    else:
        if entry.file_id is None and entry.uploading:
            found_file = await remote.find_file(journal.name(entry))
            entry.file_id = str(found_file["id"]) if found_file else None
        if entry.file_id is not None:
            await remote.delete(entry.file_id)
        entry.status, entry.imported, entry.cleaned = "not submitted", True, True
    journal.save()
