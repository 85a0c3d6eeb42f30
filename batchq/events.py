"""Typed events the runner emits, and the sink protocol that observes them.

The core never prints: progress bars, plain lines and logs are sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "Checking",
    "Event",
    "Flushed",
    "Notice",
    "Reasking",
    "Retrying",
    "RowFinished",
    "RunFinished",
    "RunStarted",
    "RunSummary",
    "Sink",
    "Slowdown",
    "Speedup",
    "Tick",
    "fan_out",
]


@dataclass(frozen=True, slots=True)
class RunStarted:
    job: str
    total: int
    todo: int
    output: Path
    #: ``--max-cost``: the cap, what earlier runs spent, and their currency
    budget: tuple[float, float, str] | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """Something said once, such as "resuming: 4,000 rows already done"."""

    message: str


@dataclass(frozen=True, slots=True)
class RowFinished:
    """A row has its result (``ok``, ``invalid`` or ``error``), with its usage or its
    error."""

    row_id: str
    status: str
    attempts: int
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    thinking: bool
    http_status: int | None
    error_code: str | None
    error_message: str | None
    #: tokens written to an explicit cache (None: the implicit cache, or none)
    cache_creation_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Retrying:
    """An attempt failed in a way worth retrying; the row waits ``delay_s`` first."""

    row_id: str
    attempt: int
    http_status: int | None
    reason: str
    delay_s: float
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Reasking:
    """A row's answer was not valid (the job's [answer]): it is asked again, for the
    ``reasks``-th time, saying ``reason``."""

    row_id: str
    reasks: int
    reason: str


@dataclass(frozen=True, slots=True)
class Slowdown:
    """429s came back on ``share`` of the answers, beyond what comes at any rate: the
    whole run now sends at ``rate`` requests/s (after pausing ``pause_s``, the server's
    Retry-After, when the 429s were a wall); undone if they do not become rarer."""

    rate: float
    pause_s: float
    share: float = 0.0
    #: nothing was let through: the rate keeps halving down to ``rate`` until answers
    #: come back
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Speedup:
    """The whole run may send faster: at ``rate`` requests/s (None: its own limits), for
    ``reason`` (answers are back after a block, a cut that was not needed, a limit read
    higher than at the cut)."""

    rate: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class Flushed:
    rows: int


@dataclass(frozen=True, slots=True)
class Checking:
    """The preflight's progress: rows of the input checked so far (``exact``: by the exact
    pass, which the fast path handed over to, counting from the start again)."""

    rows: int
    exact: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """A second went by while sending, whatever the run was doing (waiting included)."""


@dataclass(frozen=True)
class RunSummary:
    """What a run came to: the whole output's counts, and what this run sent."""

    output: Path
    total: int
    ok: int
    error: int
    #: Rows answered by this run (not counting rows resumed from the state folder).
    sent: int
    elapsed_s: float
    already_complete: bool
    #: Rows whose answer failed the job's [answer] check after their re-asks.
    invalid: int = 0
    #: ``--via batch``: rows left without a result (``--no-wait``, ``--then none``): the
    #: output is not written yet; batches submitted and still running on the provider.
    pending: int = 0
    running_batches: int = 0
    #: What this run sent: requests live (every attempt and re-ask), lines submitted to a
    #: Batch API; rows a Batch API answered (collected this run), rows that took another
    #: row's answer (dedupe: not sent, not billed).
    requests: int = 0
    batch_lines: int = 0
    collected: int = 0
    copied: int = 0


@dataclass(frozen=True, slots=True)
class RunFinished:
    summary: RunSummary


Event = (
    Checking
    | RunStarted
    | Notice
    | RowFinished
    | Retrying
    | Reasking
    | Slowdown
    | Speedup
    | Flushed
    | Tick
    | RunFinished
)


class Sink(Protocol):
    def __call__(self, event: Event) -> None: ...


def discard(event: Event) -> None:
    """The sink that observes nothing."""


def fan_out(*sinks: Sink) -> Sink:
    """One sink that passes each event to every one of ``sinks``, in order."""

    def emit(event: Event) -> None:
        for sink in sinks:
            sink(event)

    return emit
