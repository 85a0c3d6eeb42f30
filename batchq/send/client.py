"""Send one chat/completions request and classify what came back.

The only module that speaks HTTP. Bytes go over a *wire*: by default one aiohttp session
(its per-request CPU cost is a fraction of httpx's pool: see bench/), or, when an
``httpx`` transport is given, an ``httpx.AsyncClient`` on it, which is how tests fake the
server (``httpx.MockTransport``). Everything above the wire is the same code.
Every outcome is one of four kinds, decided by status code and the API's ``error.code``,
never by searching message text:

    ok         a valid completion
    retry      429, 500/502/503/504, a transport error, a timeout, or a 200 whose body
               is not a valid completion
    row_error  any other 4xx: recorded on the row, the run goes on
    fatal      401/403, or a billing code whatever the status: every row would fail alike

A 429 also says which kind of throttling it is (``Outcome.throttled``), by its code.
Model Studio's rate-limit page (alibabacloud.com/help/en/model-studio/rate-limit, last
updated 2026-02-09): "Requests rate limit exceeded" is the RPM limit, "Allocated quota
exceeded or You exceeded your current quota" the TPM limit, "Request rate increased too
quickly" the burst protection, which fires below RPM and TPM:

    rate   limit_requests, Throttling, Throttling.RateQuota, LimitRequests, any other code
    burst  limit_burst_rate, Throttling.BurstRate
    quota  insufficient_quota, Throttling.AllocationQuota: token-rate throttling first;
           the run stops only after a minute of nothing else (``batchq.engine.work``)
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp
import anyio
import orjson

from batchq.send.limiter import Throttle
from batchq.send.response import (
    InvalidCompletion,
    Stream,
    completion_columns,
    parse_completion,
    parse_error_body,
)
from batchq.send.retry import parse_retry_after

if TYPE_CHECKING:  # httpx loads only when a caller brings a transport (tests): 18 MB saved
    import httpx

__all__ = ["Client", "Outcome", "classify", "redact"]

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403})
#: Codes that mean "no money on the account", whatever the status: retrying cannot help.
BILLING_CODES = frozenset({
    "PrepaidBillOverdue", "PostpaidBillOverdue", "CommodityNotPurchased", "Arrearage",
    "AllocationQuota.FreeTierOnly",
})  # fmt: skip
BURST_CODES = frozenset({"limit_burst_rate", "Throttling.BurstRate"})
QUOTA_CODES = frozenset({"insufficient_quota", "Throttling.AllocationQuota"})

Kind = Literal["ok", "retry", "row_error", "fatal"]


@dataclass(slots=True)
class Outcome:
    """What one attempt produced. ``result`` holds the parsed columns when ``kind == "ok"``."""

    kind: Kind
    http_status: int | None = None
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after: float | None = None
    latency_ms: float | None = None
    #: for a 429: a request-rate limit, a burst limit, or token quota throttling
    throttled: Throttle | None = None
    #: an error's body as received (``--keep-raw``; an answer's goes in ``result``)
    raw: str | None = None


class WireError(Exception):
    """A request that got no HTTP answer: connection refused or reset, a broken body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Wire(Protocol):
    """How bytes reach the server: POST ``content`` to ``url``, return status, body, headers.

    ``on_line`` (for a streamed request) is given each line of a 200 body as it arrives,
    and the body returned is then empty; other statuses return their body whole."""

    async def post(
        self, url: str, content: bytes, on_line: Callable[[bytes], None] | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]: ...

    async def aclose(self) -> None: ...


class HttpxWire:
    """Through an ``httpx.AsyncClient`` on the given transport (``httpx.MockTransport`` in
    tests, or any transport a user brings)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, headers: dict[str, str]) -> None:
        import httpx

        self._http = httpx.AsyncClient(transport=transport, headers=headers, timeout=None)

    async def post(
        self, url: str, content: bytes, on_line: Callable[[bytes], None] | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        import httpx

        try:
            async with self._http.stream("POST", url, content=content) as response:
                if on_line is None or response.status_code != 200:
                    return response.status_code, await response.aread(), response.headers
                async for line in response.aiter_lines():
                    on_line(line.encode())
                return response.status_code, b"", response.headers
        except httpx.TransportError as e:
            raise WireError(type(e).__name__, str(e) or type(e).__name__) from None

    async def aclose(self) -> None:
        await self._http.aclose()


class AiohttpWire:
    """Through one ``aiohttp.ClientSession``: the default, since its per-request CPU cost is
    a fraction of httpx's own pool (see bench/), which scans every connection per request."""

    def __init__(self, headers: dict[str, str], *, max_connections: int) -> None:
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def post(
        self, url: str, content: bytes, on_line: Callable[[bytes], None] | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        try:
            async with self._session.post(url, data=content) as response:
                if on_line is None or response.status != 200:
                    return response.status, await response.read(), response.headers
                async for line in response.content:
                    on_line(line.rstrip(b"\r\n"))
                return response.status, b"", response.headers
        except aiohttp.ClientError as e:
            raise WireError(type(e).__name__, str(e) or type(e).__name__) from None

    async def aclose(self) -> None:
        await self._session.close()


class Client:
    """One connection pool to one base URL. Use as an async context manager (in a running
    asyncio loop). ``transport`` sends through httpx on that transport instead of aiohttp."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        keep_raw: bool = False,
    ) -> None:
        self._headers = {"Content-Type": "application/json", "User-Agent": "batchq"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._key = api_key
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._transport = transport
        self._keep_raw = keep_raw
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._wire: Wire | None = None
        # Requests in flight: shielded from the run's stop, which lets them finish (see
        # ``abort``), while every row waiting its turn or its backoff stops at once.
        self._in_flight: set[anyio.CancelScope] = set()

    async def __aenter__(self) -> Client:
        if self._transport is not None:
            self._wire = HttpxWire(self._transport, self._headers)
        else:
            self._wire = AiohttpWire(self._headers, max_connections=self._max_connections)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._wire is not None:
            await self._wire.aclose()

    def abort(self) -> None:
        """Cancel the requests in flight (a stop's grace is over, or a second Ctrl-C)."""
        for scope in self._in_flight:
            scope.cancel()

    @property
    def url(self) -> str:
        """Where requests go: the base URL's ``/chat/completions``."""
        return self._url

    async def send(self, body: dict[str, Any]) -> Outcome:
        """One attempt, never raising for anything the server or network does."""
        assert self._wire is not None, "use the client as an async context manager"
        started = time.perf_counter()
        stream = _Streamed(keep_lines=self._keep_raw) if body.get("stream") else None
        answered: tuple[int, bytes, Mapping[str, str]] | None = None
        try:
            with anyio.fail_after(self._timeout_s, shield=True) as scope:
                self._in_flight.add(scope)
                try:
                    answered = await self._wire.post(
                        self._url, orjson.dumps(body), stream.feed if stream else None
                    )
                finally:
                    self._in_flight.discard(scope)
        except TimeoutError:
            return Outcome(
                "retry",
                error_type="timeout",
                error_code="timeout",
                error_message=f"no answer within {self._timeout_s:g} s",
            )
        except WireError as e:
            message = redact(str(e), self._key)
            return Outcome(
                "retry", error_type="transport", error_code=e.code, error_message=message
            )
        if answered is None:  # aborted: the run is stopping
            return Outcome(
                "retry",
                error_type="transport",
                error_code="stopped",
                error_message="the run stopped before the answer came",
            )
        status, content, headers = answered
        latency_ms = (time.perf_counter() - started) * 1000
        if stream is not None and status == 200:
            outcome = stream.outcome(started, latency_ms)
            content = b"\n".join(stream.lines)
        else:
            outcome = classify(status, content, headers, latency_ms)
        if self._keep_raw:
            raw = content.decode("utf-8", "replace")
            if outcome.result is not None:
                outcome.result["raw"] = raw
            else:
                outcome.raw = redact(raw, self._key)
        if outcome.error_message:
            outcome.error_message = redact(outcome.error_message, self._key)
        return outcome


class _Streamed:
    """A streamed answer as it arrives: its assembly, when its first token came, and (for
    ``--keep-raw``) its lines."""

    def __init__(self, *, keep_lines: bool) -> None:
        self.stream = Stream()
        self.first_token: float | None = None
        self.lines: list[bytes] = []
        self._keep_lines = keep_lines

    def feed(self, line: bytes) -> None:
        if self.stream.feed(line):
            self.first_token = time.perf_counter()
        if self._keep_lines:
            self.lines.append(line)

    def outcome(self, started: float, latency_ms: float) -> Outcome:
        outcome = classify_stream(self.stream, latency_ms)
        if self.first_token is not None and outcome.result is not None:
            outcome.result["ttft_ms"] = (self.first_token - started) * 1000
        return outcome


_KEYLIKE = re.compile(r"\b(sk-|Bearer\s+)[\w*.\-]{4,}")


def redact(text: str, key: str | None) -> str:
    """``text`` with the key, and anything shaped like a key (a server's "Incorrect API
    key provided: sk-ab***yz"), replaced by ``***``."""
    if key:
        text = text.replace(key, "***")
    return _KEYLIKE.sub(lambda m: m.group(1) + "***", text)


def classify_stream(stream: Stream, latency_ms: float) -> Outcome:
    """Pure: the outcome of a streamed 200: a whole completion, or a retryable fault."""
    try:
        result = completion_columns(stream.completion())
    except InvalidCompletion as e:
        return Outcome(
            "retry",
            200,
            error_type="invalid_response",
            error_code="invalid_response",
            error_message=str(e),
        )
    return Outcome("ok", 200, result=result, latency_ms=latency_ms)


def classify(status: int, content: bytes, headers: Mapping[str, str], latency_ms: float) -> Outcome:
    """Pure: the outcome of one HTTP answer."""
    if status == 200:
        try:
            result = parse_completion(content)
        except InvalidCompletion as e:
            return Outcome(
                "retry",
                200,
                error_type="invalid_response",
                error_code="invalid_response",
                error_message=str(e),
            )
        return Outcome("ok", 200, result=result, latency_ms=latency_ms)
    error_type, code, message = parse_error_body(content)
    kind: Kind
    if code in BILLING_CODES:
        kind = "fatal"
    elif status in RETRY_STATUS:
        kind = "retry"
    elif status in FATAL_STATUS:
        kind = "fatal"
    else:
        kind = "row_error"
    retry_after = parse_retry_after(headers.get("retry-after")) if kind == "retry" else None
    return Outcome(
        kind,
        status,
        error_type=error_type or "http_error",
        error_code=code or str(status),
        error_message=message or f"HTTP {status}",
        retry_after=retry_after,
        throttled=_throttle(code) if status == 429 and kind == "retry" else None,
    )


def _throttle(code: str | None) -> Throttle:
    if code in QUOTA_CODES:
        return "quota"
    return "burst" if code in BURST_CODES else "rate"
