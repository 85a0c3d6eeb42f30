"""The journal of a job's remote Batch-API steps (``batches.json`` in the state folder),
recorded before the next step, so that a run killed at any moment resumes without
uploading a file or creating a batch twice (``flow.py`` takes the steps).

It holds a token made once for the state folder, and an entry per file: its model and
lines, the name it is uploaded as (the token and the file's key), ``uploading`` /
``file_id``, ``creating`` / ``batch_id``, the batch's last status and counts, what was
downloaded, whether it was imported and cleaned up.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchq.config import Job
from batchq.files import write_atomic
from batchq.state import StateDir

__all__ = [
    "FORGOTTEN",
    "SIMULATOR",
    "TERMINAL",
    "Entry",
    "Journal",
    "describe",
    "endpoint_of",
    "progress_line",
    "take_batch",
    "unknown_batch",
]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: The journal's endpoint when its batches went to the built-in simulator (``--simulate``).
#: That simulator lives as long as its command: its batches are never looked up again,
#: here or on a real endpoint, and a later command forgets those it left open.
SIMULATOR = "the built-in simulator"
#: An entry's status once forgotten: its rows are pending again.
FORGOTTEN = "forgotten"


def endpoint_of(job: Job) -> str:
    """Where ``job``'s batches go: its endpoint, or SIMULATOR for a rehearsal."""
    return SIMULATOR if job.request.simulated else job.request.url


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


def take_batch(entry: Entry, batch: dict[str, Any]) -> bool:
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


def unknown_batch(entry: Entry) -> str:
    return (
        f"the provider no longer knows batch {entry.batch_id} ({entry.model}, "
        f"{entry.lines:,} rows): `batchq batch forget JOB` forgets it, and the next run "
        "sends its rows again"
    )


def progress_line(entry: Entry) -> str:
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
