"""The per-row work: send one row's request, retrying as SPEC says, into a result row.

This is a plain function of a row, a client, a pacer and the limits, with no global
state, so that many workers (or worker processes) can run it side by side.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from batchq.answer import Checker
from batchq.engine.context import Counts
from batchq.errors import RunStopped
from batchq.events import Reasking, Retrying, Sink
from batchq.money.budget import Spend
from batchq.money.pricing import Price
from batchq.result import BATCH_PART, PRIOR_COLUMNS, Result
from batchq.send.client import Client, Outcome
from batchq.send.limiter import Pacer, Settled
from batchq.send.request import choices, estimate_tokens, prompt_bytes
from batchq.send.retry import backoff_delay

__all__ = ["QUOTA_STOP_S", "Channel", "EndpointWatch", "Item", "QuotaWatch", "send_row"]


@dataclass(slots=True)
class Item:
    """One row to send: its input position, id, request body, and its token estimate
    (prompt, and the completion cap when the body sets one)."""

    row: int
    id: str
    body: dict[str, Any]
    prompt_tokens: int
    max_completion: int | None
    #: what earlier runs sent and billed for the row (PRIOR_COLUMNS), when it is sent again
    prior: dict[str, Any] | None = None
    #: its last answer and why it was not valid, when the row is asked again from there
    #: (a Batch-API answer checked on import)
    resume: tuple[str | None, str] | None = None


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

    def record(self, outcome: Outcome, now: float) -> bool:
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

    def record(self, outcome: Outcome) -> str | None:
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
            hint = (
                f"HTTP 404 ({outcome.error_message}): check the base_url, which ends "
                "where /chat/completions would follow, such as https://host/v1 or "
                ".../compatible-mode/v1; a 404 also comes for a model the service does "
                "not have: check the model name"
            )
        else:
            hint = f"{outcome.error_code}: {_UNREACHABLE[what]}"
        return (
            f"the run stopped: the last {self._same} answers from {self._url} were all "
            f"the same failure, so every row would fail alike. {hint}; then rerun the "
            "same command to resume"
        )


def _endpoint_failure(outcome: Outcome) -> str | None:
    if outcome.http_status == 404:
        return "404"
    if outcome.error_type == "transport" and outcome.error_code in _UNREACHABLE:
        return outcome.error_code
    return None


@dataclass(frozen=True, slots=True)
class Channel:
    """How a run's requests go out: the client, the pacer, the attempts a request may
    take, where events go, how to wait (``sleep``) and with what jitter (``rng``), and
    the watches every worker shares (quota 429s; endpoint-level failures); and where a
    row's answer goes while it is asked again (``keep``: the journal), so that a run
    killed meanwhile has it and does not pay for it twice."""

    client: Client
    pacer: Pacer
    max_attempts: int
    emit: Sink
    sleep: Callable[[float], Awaitable[None]]
    rng: random.Random
    quota: QuotaWatch
    endpoint: EndpointWatch | None = None
    keep: Callable[[Result], None] | None = None
    #: ``--max-cost``: the run's spend, and each model's price
    budget: Spend | None = None
    prices: dict[str, Price] = field(default_factory=dict)
    #: what the run sent (every request counted as it goes out)
    counts: Counts = field(default_factory=Counts)


async def send_row(item: Item, channel: Channel, *, checker: Checker | None = None) -> Result:
    """The result row for ``item``. Raises RunStopped on a fatal answer (401/403, billing)
    or when the channel's quota watch says the token quota has been exhausted for a minute.

    With a ``checker`` (the job's [answer]), an answer that is not valid is asked again,
    up to its ``reasks``: the same conversation, the answer, and a message saying why
    (SPEC "Answers you can use"). Every request sent counts in the row's ``attempts``,
    every answer billed (the invalid ones too) in its usage columns."""
    bill = _Bill(item.prior)
    body, prompt_tokens = item.body, item.prompt_tokens
    reasks = checker.spec.reasks if checker is not None else 0
    if checker is not None and item.resume is not None:  # the re-asks left, from its answer
        text, reason = item.resume
        reasks -= bill.reasks
        bill.asked_again = 1
        channel.emit(Reasking(item.id, bill.reasks, reason))
        body = checker.reask_body(body, {"response": text}, reason)
        prompt_tokens = estimate_tokens(body)
    while True:
        outcome = await _ask(item, body, prompt_tokens, bill, channel)
        model = item.body.get("model")
        if outcome.kind != "ok":
            return bill.fill(
                Result.failed(
                    row=item.row,
                    id=item.id,
                    model=model,
                    attempts=0,
                    via="live",
                    http_status=outcome.http_status,
                    error_type=outcome.error_type,
                    error_code=outcome.error_code,
                    error_message=outcome.error_message,
                    raw=outcome.raw,
                )
            )
        completion = outcome.result or {}
        bill.add(completion)
        result = Result.answered(
            row=item.row,
            id=item.id,
            model=model,
            attempts=0,
            via="live",
            completion=completion,
            latency_ms=outcome.latency_ms,
        )
        if checker is None:
            return bill.fill(result)
        verdict = checker.verdict(completion)
        if verdict.value is not None:
            result.answer, result.agreement = verdict.value, verdict.agreement
            return bill.fill(result)
        reason = verdict.reason or "it is not valid"
        if bill.asked_again >= reasks:
            return bill.fill(result.invalid(reason))
        if channel.keep is not None:  # saved as it stands: a resumed run asks again from it
            channel.keep(bill.fill(result.invalid(reason)))
        bill.asked_again += 1
        channel.emit(Reasking(item.id, bill.reasks, reason))
        body = checker.reask_body(body, completion, reason)
        prompt_tokens = estimate_tokens(body)


async def _ask(
    item: Item, body: dict[str, Any], prompt_tokens: int, bill: _Bill, channel: Channel
) -> Outcome:
    """One request of the row, retried as SPEC says: its ok answer, or the last failure.
    Quota 429s do not use up ``max_attempts`` (the run stops instead of writing error
    rows); every request sent counts in ``bill``."""
    c = channel
    sent = counted = 0
    while True:
        hold = None
        if c.budget is not None:
            price = c.prices[str(item.body.get("model"))]
            hold = await c.budget.reserve(
                price,
                prompt_tokens,
                item.max_completion,
                choices=choices(body),
                prompt_bytes=prompt_bytes(body),
            )
        reserved = await c.pacer.acquire(prompt_tokens, item.max_completion)
        sent_at = c.pacer.now()
        outcome: Outcome | None = None
        c.counts.requests += 1
        try:
            outcome = await c.client.send(body)
        finally:
            c.pacer.settle(reserved, _settled(sent_at, outcome))
            if hold is not None:
                assert c.budget is not None
                c.budget.settle(hold, _billed(outcome))
        bill.attempts += 1
        sent += 1
        counted += outcome.throttled != "quota"
        if c.endpoint is not None and (stop := c.endpoint.record(outcome)) is not None:
            raise RunStopped(stop, **_context(outcome))
        if outcome.kind == "ok":
            c.quota.record(outcome, c.pacer.now())
            return outcome
        if outcome.kind == "fatal":
            raise RunStopped(_fatal_message(outcome), **_context(outcome))
        if c.quota.record(outcome, c.pacer.now()):
            raise RunStopped(_quota_message(outcome), **_context(outcome))
        if outcome.kind == "row_error" or counted >= c.max_attempts:
            return outcome
        delay = backoff_delay(sent, retry_after=outcome.retry_after, rng=c.rng)
        reason = outcome.error_code or outcome.error_type or "error"
        c.emit(
            Retrying(
                item.id, bill.attempts, outcome.http_status, reason, delay, outcome.retry_after
            )
        )
        await c.sleep(delay)


class _Bill:
    """What a row has cost so far, this run and (``prior``) earlier ones: requests sent,
    re-asks, and the usage of every answer billed (of it, what a Batch API answered)."""

    _USAGE = PRIOR_COLUMNS[2:]

    def __init__(self, prior: dict[str, Any] | None) -> None:
        prior = prior or {}
        self.attempts = 0
        self.asked_again = 0  # this run's re-asks, against the job's reasks
        self._prior_attempts = prior.get("attempts") or 0
        self._prior_reasks = prior.get("reasks") or 0
        self._usage: dict[str, int | None] = {k: prior.get(k) for k in self._USAGE}
        # a Batch-API answer asked again live: priced apart (SPEC "Answers you can use")
        self._batch = {k: prior.get(k) for k in BATCH_PART}

    @property
    def reasks(self) -> int:
        return self._prior_reasks + self.asked_again

    def add(self, completion: dict[str, Any]) -> None:
        for key in self._USAGE:
            if (n := completion.get(key)) is not None:
                self._usage[key] = (self._usage[key] or 0) + n

    def fill(self, result: Result) -> Result:
        """``result`` with the row's totals."""
        result.attempts = self._prior_attempts + self.attempts
        result.reasks = self.reasks
        for key, value in (*self._usage.items(), *self._batch.items()):
            setattr(result, key, value)
        if self._batch["batch_prompt_tokens"] is not None:
            result.via = "batch"
        return result


def _billed(outcome: Outcome | None) -> dict[str, Any] | None:
    """What a request was billed, for the budget: its usage when answered; nothing for
    an HTTP refusal (429, 5xx, 400); None (perhaps all of it) when no answer came, or a
    200 without usage (cut off, not a completion)."""
    if outcome is None:
        return None
    if outcome.result is None:
        return None if outcome.http_status in (None, 200) else {}
    return outcome.result


def _settled(sent_at: float, outcome: Outcome | None) -> Settled:
    if outcome is None:  # cancelled mid-request: nothing learned
        return Settled(sent_at)
    usage = outcome.result if outcome.result is not None else {}
    return Settled(
        sent_at,
        usage.get("total_tokens"),
        usage.get("completion_tokens"),
        outcome.throttled,
        outcome.retry_after,
    )


def _context(outcome: Outcome) -> dict[str, Any]:
    """What RunStopped carries of the answer that stopped the run."""
    return {"http_status": outcome.http_status, "error_code": outcome.error_code}


def _fatal_message(outcome: Outcome) -> str:
    what = f"HTTP {outcome.http_status}" if outcome.http_status else "the server"
    detail = f" ({outcome.error_code}: {outcome.error_message})" if outcome.error_message else ""
    if outcome.http_status in (401, 403):
        hint = "check the API key, its region and the base URL, then rerun to resume"
    else:
        hint = (
            "the account has a billing problem (an overdue bill, a model not purchased, "
            "or free quota only): settle it in the console, then rerun to resume"
        )
    return f"the run stopped: {what}{detail}, so every row would fail alike; {hint}"


def _quota_message(outcome: Outcome) -> str:
    return (
        f"the run stopped: quota or token rate exhausted: for {QUOTA_STOP_S:g} s every "
        f"answer was HTTP 429 {outcome.error_code}. Check the account's quota and the "
        "model's TPM limit in the console (or set a lower --tpm), then rerun the same "
        "command to resume"
    )
