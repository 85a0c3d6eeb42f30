"""The per-row work: send one row's request, retrying as SPEC says, into a result row.

This is a plain function of a row, a client, a pacer and the limits, with no global
state, so that many workers (or worker processes) can run it side by side.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from batchq.errors import RunStopped
from batchq.events import Retrying, Sink
from batchq.result import Result
from batchq.send.client import Client, Outcome
from batchq.send.limiter import Pacer, Settled
from batchq.send.retry import backoff_delay

__all__ = ["QUOTA_STOP_S", "EndpointWatch", "Item", "QuotaWatch", "answer"]


@dataclass(slots=True)
class Item:
    """One row to send: its input position, id, request body, and its token estimate
    (prompt, and the completion cap when the body sets one)."""

    row: int
    id: str
    body: dict[str, Any]
    prompt_tokens: int
    max_completion: int | None
    prior_attempts: int = 0


#: A run whose answers have been nothing but quota 429s for this long stops (exit 3).
QUOTA_STOP_S = 60.0


class QuotaWatch:
    """How long every answer has been a quota 429 (``insufficient_quota``,
    ``Throttling.AllocationQuota``). Model Studio sends those for its token-rate limit, so
    they are throttling first: the run stops only after ``stop_s`` of nothing else. One
    watch is shared by every worker of a run."""

    def __init__(self, stop_s: float = QUOTA_STOP_S) -> None:
        self._stop_s = stop_s
        self._since: float | None = None

    def saw(self, outcome: Outcome, now: float) -> bool:
        """Note an answer; True when quota 429s alone have come back for ``stop_s``."""
        if outcome.throttled != "quota":
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self._stop_s


#: Answers in a row that are one endpoint-level failure before a run stops: before any
#: answer was ok, and after one.
ENDPOINT_STOP_N, ENDPOINT_STOP_AFTER_OK_N = 10, 100
#: Transport errors that say nothing answers at the URL (aiohttp's and httpx's names).
_REFUSED = (
    "nothing answers there (connection refused): is the server running, and are the host "
    "and port right?"
)
_UNREACHABLE = {
    "ClientConnectorError": _REFUSED,
    "ConnectError": _REFUSED,
    "ClientConnectorDNSError": "the host name does not resolve: check it",
    "ClientConnectorCertificateError": "its TLS certificate is not trusted: check https vs http",
    "ClientConnectorSSLError": "TLS failed: check https vs http",
    "ClientSSLError": "TLS failed: check https vs http",
}


class EndpointWatch:
    """Whether the answers are all one endpoint-level failure: a 404 (the path, or a model
    the service does not have), a connection refused, a DNS or TLS failure. Then every row
    would fail alike, each after all its attempts: the run stops instead (exit 3). One
    watch is shared by every worker of a run."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._ok = False
        self._what: str | None = None
        self._same = 0

    def saw(self, outcome: Outcome) -> str | None:
        """Note an answer; the stop message when the run must stop."""
        if outcome.kind == "ok":
            self._ok, self._what, self._same = True, None, 0
            return None
        what = _endpoint_failure(outcome)
        if what is None or what != self._what:
            self._what, self._same = what, int(what is not None)
            return None
        self._same += 1
        if self._same < (ENDPOINT_STOP_AFTER_OK_N if self._ok else ENDPOINT_STOP_N):
            return None
        if outcome.http_status == 404:
            hint = (f"HTTP 404 ({outcome.error_message}): check the base_url, which ends "
                    "where /chat/completions would follow, such as https://host/v1 or "
                    ".../compatible-mode/v1; a 404 also comes for a model the service does "
                    "not have: check the model name")  # fmt: skip
        else:
            hint = f"{outcome.error_code}: {_UNREACHABLE[what]}"
        return (f"the run stopped: the last {self._same} answers from {self._url} were all "
                f"the same failure, so every row would fail alike. {hint}; then rerun the "
                "same command to resume")  # fmt: skip


def _endpoint_failure(outcome: Outcome) -> str | None:
    if outcome.http_status == 404:
        return "404"
    if outcome.error_type == "transport" and outcome.error_code in _UNREACHABLE:
        return outcome.error_code
    return None


async def answer(
    item: Item,
    *,
    client: Client,
    pacer: Pacer,
    max_attempts: int,
    emit: Sink,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    quota: QuotaWatch,
    endpoint: EndpointWatch | None = None,
) -> Result:
    """The result row for ``item``. Raises RunStopped on a fatal answer (401/403, billing)
    or when ``quota`` says the token quota has been exhausted for a minute.

    Quota 429s do not use up the row's ``max_attempts`` (the run stops instead of writing
    error rows); every request sent counts in its ``attempts`` column."""
    sent = counted = 0
    while True:
        reserved = await pacer.acquire(item.prompt_tokens, item.max_completion)
        sent_at = pacer.now()
        outcome: Outcome | None = None
        try:
            outcome = await client.send(item.body)
        finally:
            pacer.release(reserved, _settled(sent_at, outcome))
        sent += 1
        counted += outcome.throttled != "quota"
        if endpoint is not None and (stop := endpoint.saw(outcome)) is not None:
            raise RunStopped(stop)
        if outcome.kind == "ok":
            quota.saw(outcome, pacer.now())
            return _row(item, outcome, sent)
        if outcome.kind == "fatal":
            raise RunStopped(_fatal_message(outcome))
        if quota.saw(outcome, pacer.now()):
            raise RunStopped(_quota_message(outcome))
        if outcome.kind == "row_error" or counted >= max_attempts:
            return _row(item, outcome, sent)
        delay = backoff_delay(sent, retry_after=outcome.retry_after, rng=rng)
        reason = outcome.error_code or outcome.error_type or "error"
        emit(Retrying(item.id, sent, outcome.http_status, reason, delay, outcome.retry_after))
        await sleep(delay)


def _settled(sent_at: float, outcome: Outcome | None) -> Settled:
    if outcome is None:  # cancelled mid-request: nothing learned
        return Settled(sent_at)
    usage = outcome.result if outcome.result is not None else {}
    return Settled(
        sent_at, usage.get("total_tokens"), usage.get("completion_tokens"),
        outcome.throttled, outcome.retry_after,
    )  # fmt: skip


def _row(item: Item, outcome: Outcome, attempts: int) -> Result:
    model, attempts = item.body.get("model"), item.prior_attempts + attempts
    if outcome.kind == "ok":
        return Result.answered(
            row=item.row, id=item.id, model=model, attempts=attempts, via="live",
            completion=outcome.result or {}, latency_ms=outcome.latency_ms,
        )  # fmt: skip
    return Result.failed(
        row=item.row, id=item.id, model=model, attempts=attempts, via="live",
        http_status=outcome.http_status, error_type=outcome.error_type,
        error_code=outcome.error_code, error_message=outcome.error_message, raw=outcome.raw,
    )  # fmt: skip


def _fatal_message(outcome: Outcome) -> str:
    what = f"HTTP {outcome.http_status}" if outcome.http_status else "the server"
    detail = f" ({outcome.error_code}: {outcome.error_message})" if outcome.error_message else ""
    if outcome.http_status in (401, 403):
        hint = "check the API key, its region and the base URL, then rerun to resume"
    else:
        hint = ("the account has a billing problem (an overdue bill, a model not purchased, "
                "or free quota only): settle it in the console, then rerun to resume")  # fmt: skip
    return f"the run stopped: {what}{detail}, so every row would fail alike; {hint}"


def _quota_message(outcome: Outcome) -> str:
    return (
        f"the run stopped: quota or token rate exhausted: for {QUOTA_STOP_S:g} s every "
        f"answer was HTTP 429 {outcome.error_code}. Check the account's quota and the "
        "model's TPM limit in the console (or set a lower --tpm), then rerun the same "
        "command to resume"
    )
