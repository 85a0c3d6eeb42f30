"""Typed events the runner emits, and the sink protocol that observes them.

The core never prints: progress bars, plain lines and logs are sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "Event",
    "Flushed",
    "Notice",
    "Retrying",
    "RowFinished",
    "RunFinished",
    "RunStarted",
    "RunSummary",
    "Sink",
]


@dataclass(frozen=True, slots=True)
class RunStarted:
    job: str
    total: int
    todo: int
    output: Path


@dataclass(frozen=True, slots=True)
class Notice:
    """Something said once, such as "resuming: 4,000 rows already done"."""

    message: str


@dataclass(frozen=True, slots=True)
class RowFinished:
    status: str
    attempts: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Retrying:
    row_id: str
    attempt: int
    http_status: int | None
    reason: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class Flushed:
    rows: int


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


@dataclass(frozen=True, slots=True)
class RunFinished:
    summary: RunSummary


Event = RunStarted | Notice | RowFinished | Retrying | Flushed | RunFinished


class Sink(Protocol):
    def __call__(self, event: Event) -> None: ...


def discard(event: Event) -> None:
    """The sink that observes nothing."""
