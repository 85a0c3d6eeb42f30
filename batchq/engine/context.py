"""One run's context: what every stage of it reads (the job, its input, its state folder,
its options, where events go, how it stops, how it reaches the endpoint) and what it
counts. A setting that every stage needs is a field here, and nowhere else.

The stages: the Batch-API round (``batch.flow``), the sending stage (``engine.live``, or
another engine implementing the same ``send`` over the same context), then the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from batchq.batch.flow import BatchPlan
from batchq.config import Job
from batchq.engine.stop import StopSwitch
from batchq.events import Sink
from batchq.io.preflight import InputInfo
from batchq.money.pricing import Price, PriceTable
from batchq.send.limiter import Pacer
from batchq.state import StateDir

if TYPE_CHECKING:  # httpx loads only when a caller brings a transport (tests)
    import httpx

__all__ = ["Counts", "RunContext", "RunOptions"]


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
    #: show the engine's own logs (Ray's) in the terminal
    verbose: bool = False

    @property
    def retry(self) -> frozenset[str]:
        """The statuses whose rows are sent again."""
        chosen = (("error", self.retry_errors), ("invalid", self.retry_invalid))
        return frozenset(status for status, on in chosen if on)


@dataclass
class Counts:
    """What a run did, for its summary: requests sent live (every attempt and re-ask),
    lines submitted to a Batch API, rows a Batch API answered, rows copied from another
    row's answer (dedupe)."""

    requests: int = 0
    batch_lines: int = 0
    collected: int = 0
    copied: int = 0


@dataclass(frozen=True)
class RunContext:
    """One run (see the module doc). ``pacer`` replaces the rate pacer and ``transport``
    the HTTP transport (tests); ``priced``, with ``max_cost``: the currency, and the price
    of every model the rows ask for."""

    job: Job
    info: InputInfo
    state: StateDir
    options: RunOptions
    sink: Sink
    stop: StopSwitch
    api_key: str | None
    prices: PriceTable
    region: str
    priced: tuple[str, dict[str, Price]] | None = None
    transport: httpx.AsyncBaseTransport | None = None
    pacer: Pacer | None = None
    counts: Counts = field(default_factory=Counts)
