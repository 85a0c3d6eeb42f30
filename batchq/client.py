"""Send one chat/completions request and classify what came back.

The only module that speaks HTTP. It holds one ``httpx.AsyncClient``; the transport is a
parameter so tests fake it with ``httpx.MockTransport`` and a faster one can be swapped in.
Every outcome is one of four kinds, decided by status code and the API's ``error.code``,
never by searching message text:

    ok         a valid completion
    retry      429 (except quota exhausted), 500/502/503/504, a transport error, a
               timeout, or a 200 whose body is not a valid completion
    row_error  any other 4xx: recorded on the row, the run goes on
    fatal      401/403, or a 429 saying the quota is used up: every row would fail alike
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import httpx
import orjson

from batchq.response import InvalidCompletion, parse_completion, parse_error_body
from batchq.retry import parse_retry_after

__all__ = ["Client", "Outcome", "classify", "redact"]

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403})
#: 429 codes that mean "no money left", not "slow down": retrying cannot help.
QUOTA_CODES = frozenset({"insufficient_quota", "Arrearage", "DataInspectionQuotaExceeded"})

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


class Client:
    """One connection pool to one base URL. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._key = api_key
        self._timeout_s = timeout_s
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            follow_redirects=False,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def send(self, body: dict[str, Any]) -> Outcome:
        """One attempt, never raising for anything the server or network does."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(self._timeout_s):
                response = await self._http.post(self._url, content=orjson.dumps(body))
        except TimeoutError:
            return Outcome("retry", error_type="timeout", error_code="timeout",
                           error_message=f"no answer within {self._timeout_s:g} s")  # fmt: skip
        except httpx.TransportError as e:
            return Outcome("retry", error_type="transport", error_code=type(e).__name__,
                           error_message=str(e) or type(e).__name__)  # fmt: skip
        latency_ms = (time.perf_counter() - started) * 1000
        outcome = classify(response.status_code, response.content, response.headers, latency_ms)
        if outcome.error_message:
            outcome.error_message = redact(outcome.error_message, self._key)
        return outcome


_KEYLIKE = re.compile(r"\b(sk-|Bearer\s+)[\w*.\-]{4,}")


def redact(text: str, key: str | None) -> str:
    """``text`` with the key, and anything shaped like a key (a server's "Incorrect API
    key provided: sk-ab***yz"), replaced by ``***``."""
    if key:
        text = text.replace(key, "***")
    return _KEYLIKE.sub(lambda m: m.group(1) + "***", text)


def classify(
    status: int, content: bytes, headers: httpx.Headers | dict[str, str], latency_ms: float
) -> Outcome:
    """Pure: the outcome of one HTTP answer."""
    if status == 200:
        try:
            result = parse_completion(content)
        except InvalidCompletion as e:
            return Outcome("retry", 200, error_type="invalid_response",
                           error_code="invalid_response", error_message=str(e))  # fmt: skip
        return Outcome("ok", 200, result=result, latency_ms=latency_ms)
    error_type, code, message = parse_error_body(content)
    kind: Kind
    if status == 429 and code in QUOTA_CODES:
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
    )
