"""An OpenAI-compatible ``POST …/chat/completions`` server on 127.0.0.1 (aiohttp.web).

Content is a deterministic function of the request (see ``content.py``): the reply to a
conversation is ``"echo: "`` followed by its last user message, so a test can check that
every row got *its* answer; ``n``, ``tools``, thinking and ``stream`` (server-sent events,
usage in the last chunk with ``stream_options.include_usage``) are served as Model Studio
serves them, including its refusal of non-streamed thinking and of ``n`` above 1 with
``tools``. Around that: a lognormal
latency, server-side QPS / QPM limits answered with 429 and Model Studio's error body
(optionally with ``Retry-After``), injected 500 / 503 rates, 401 for a wrong key, and
a moderation refusal (400 ``data_inspection_failed``) for a message with MODERATION_MARKER.
It serves every path ending in ``/chat/completions`` (``/v1/…``, ``/compatible-mode/v1/…``),
and the Batch API's ``/files`` and ``/batches`` beside it (``batches.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batchq.simulator.batches import BatchService
from batchq.simulator.content import MODERATION_MARKER, chunks, completion, refusal, reply_for
from batchq.simulator.ledger import Ledger
from batchq.simulator.limits import Limit, Shape, SlidingWindow, limit

__all__ = [
    "MODERATION_MARKER",
    "SimConfig",
    "SimStats",
    "Simulator",
    "reply_for",
    "serve_in_thread",
]


#: Model Studio's messages for its 429 codes (its rate-limit page: "Requests rate limit
#: exceeded" is RPM, "Allocated quota exceeded" TPM, "Request rate increased too quickly"
#: the burst protection; alibabacloud.com/help/en/model-studio/rate-limit, 2026-02-09).
MESSAGES_429 = {
    "limit_requests": "Requests rate limit exceeded, please try again later.",
    "Throttling.RateQuota": "Requests rate limit exceeded, please try again later.",
    "limit_burst_rate": "Request rate increased too quickly.",
    "Throttling.BurstRate": "Request rate increased too quickly.",
    "insufficient_quota": "You exceeded your current quota, please check your plan and "
    "billing details.",
    "Throttling.AllocationQuota": "Allocated quota exceeded, please increase your quota limit.",
    "Arrearage": "Access denied, please make sure your account is in good standing.",
}

#: The faults the simulator can inject, each at its own rate per request.
FAULTS = ("500", "503", "429", "drop", "truncate", "malformed", "slow")


@dataclass(frozen=True)
class SimConfig:
    """How the simulated server behaves. ``fail_*`` are probabilities per request.

    A ``drop`` closes the connection without an answer, ``truncate`` sends half of a
    completion's JSON with status 200, ``malformed`` a 200 whose JSON is no completion,
    ``slow`` waits ``slow_s`` before answering. With ``burst_s``, a fault that fires
    repeats for every request in the next ``burst_s`` seconds.
    """

    latency_ms: float = 0.0
    latency_sigma: float = 0.5
    qps: float | None = None
    qpm: float | None = None
    #: how the QPS / QPM limits are enforced (``limits.py``): a sliding window, a token
    #: bucket of a second's or a minute's worth, or a fixed window per minute
    limit_shape: Shape = "window"
    retry_after: float | None = None
    #: every request is refused for ``quota_for`` seconds, from ``quota_after`` seconds
    #: after the first request: a 429 with ``quota_code`` (``429``: no code; ``503``: an
    #: overloaded gateway's 503 instead), as a shared account's spike refuses them
    quota_for: float = 0.0
    quota_after: float = 5.0
    quota_code: str = "insufficient_quota"
    fail_500: float = 0.0
    fail_503: float = 0.0
    fail_429: float = 0.0
    #: the ``error.code`` of the 429s injected by ``fail_429`` (Model Studio's codes)
    fail_429_code: str = "limit_requests"
    fail_drop: float = 0.0
    fail_truncate: float = 0.0
    fail_malformed: float = 0.0
    fail_slow: float = 0.0
    slow_s: float = 30.0
    burst_s: float = 0.0
    api_key: str | None = None
    seed: int = 0
    #: tokens a character of the messages and answers (a CJK-like tokenizer); None: a
    #: token a word
    tokens_per_char: float | None = None
    #: the Batch API (``batches.py``): seconds a batch takes; the share of its lines that
    #: fail with a 500; whether it expires half-done; a step that answers ``stall_s`` late
    batch_seconds: float = 2.0
    batch_fail_lines: float = 0.0
    batch_expire: bool = False
    #: every batch fails validation (as a file of two models does)
    batch_invalid: bool = False
    stall: str | None = None
    stall_s: float = 30.0


@dataclass
class SimStats:
    """What the server saw. ``by_prompt`` counts requests per reply (so per input row, when
    rows differ), whatever the answer; ``by_status`` counts answers by status (0: dropped)."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    #: 429s for going beyond the QPS / QPM limits (the rest of the 429s are injected)
    limited: int = 0
    #: those 429s per whole second
    limited_by_second: Counter[int] = field(default_factory=Counter)
    #: answers ok per whole second of the server's monotonic clock
    ok_by_second: Counter[int] = field(default_factory=Counter)
    #: requests received, and first requests for a reply (a row's first attempt), per second
    received_by_second: Counter[int] = field(default_factory=Counter)
    first_by_second: Counter[int] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)
    #: the first 10,000 request bodies received, as sent
    bodies: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Seen:
    """What the handler saw of one request, for the ledger: its body and reply, and the
    usage of the completion it generated (billed when it answers 200)."""

    body: dict[str, Any] = field(default_factory=dict)
    reply: str = ""
    billed: dict[str, Any] | None = None


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _error(status: int, code: str, message: str, type_: str) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _limits(config: SimConfig) -> list[Limit]:
    """The server's QPS and QPM limits, of the configured shape (a QPM limit's window is a
    minute long; its other shapes let QPM/60 a second through)."""
    shape, limits = config.limit_shape, []
    if config.qps:
        limits.append(limit(config.qps, shape))
    if config.qpm:
        qpm = config.qpm
        limits.append(SlidingWindow(qpm, 60.0) if shape == "window" else limit(qpm / 60, shape))
    return limits


class Simulator:
    """The request handler and its state; ``app`` is the aiohttp application."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._rng = random.Random(self.config.seed)
        self._ids = itertools.count(1)
        self._limits = _limits(self.config)
        self._first: float | None = None  # when the first request came
        self._burst: tuple[str, float] | None = None
        self.app = web.Application(client_max_size=64 * 1024**2)
        # Only where an OpenAI-compatible server serves it (/v1, .../compatible-mode/v1):
        # elsewhere a 404, as a real one answers, so that a rehearsal catches a missing /v1.
        self.app.router.add_post(r"/{prefix:(?:.*/)?}v1/chat/completions", self.handle)
        self.app.router.add_get("/_stats", self.report)
        self.app.router.add_get("/_ledger", self.report_ledger)
        self.ledger = Ledger()
        self.batch = BatchService(self.config, self.app, self.ledger)

    async def report(self, request: web.Request) -> web.Response:
        """``GET /_stats``: requests seen and answers by status, for benchmarks."""
        stats = self.stats
        by_status = {str(k): v for k, v in stats.by_status.items()}
        start = min(stats.received_by_second, default=0)
        end = max(stats.received_by_second, default=-1) + 1

        def per_second(counts: Counter[int]) -> list[int]:
            return [counts[s] for s in range(start, end)]

        return _json(
            {
                "requests": stats.requests,
                "by_status": by_status,
                "limited": stats.limited,
                "ok_per_second": per_second(stats.ok_by_second),
                "received_per_second": per_second(stats.received_by_second),
                "first_per_second": per_second(stats.first_by_second),
                "limited_per_second": per_second(stats.limited_by_second),
            }
        )

    async def report_ledger(self, request: web.Request) -> web.Response:
        """``GET /_ledger``: every request answered or refused, with what it was billed."""
        return _json(self.ledger.report())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        seen = _Seen()
        response = await self._answer(request, seen)
        status = response.status if response is not None else 0
        usage = seen.billed if status == 200 else None
        self.ledger.add("live", seen.body, status, seen.reply, usage)
        self.stats.by_status[response.status if response is not None else 0] += 1
        if response is not None and response.status == 200:
            self.stats.ok_by_second[int(time.monotonic())] += 1
        if response is None:  # a dropped connection
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        return response

    async def _answer(self, request: web.Request, seen: _Seen) -> web.StreamResponse | None:
        config = self.config
        try:
            body = orjson.loads(await request.read())
            reply = reply_for(body["messages"])
            str(body["model"])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return _error(
                400,
                "invalid_parameter_error",
                "The request body is not valid: it needs model and messages.",
                "invalid_request_error",
            )
        seen.body, seen.reply = body, reply
        self.stats.by_prompt[reply] += 1
        second = int(time.monotonic())
        self.stats.received_by_second[second] += 1
        if self.stats.by_prompt[reply] == 1:
            self.stats.first_by_second[second] += 1
        if len(self.stats.bodies) < 10_000:
            self.stats.bodies.append(body)
        sent = request.headers.get("Authorization", "")
        if config.api_key and sent != f"Bearer {config.api_key}":
            # Echo what was sent, as some servers do: clients must not repeat it anywhere.
            return _error(
                401,
                "invalid_api_key",
                f"Incorrect API key provided: {sent[7:]}.",
                "invalid_request_error",
            )
        if (throttled := self._throttled()) is not None:
            return throttled
        if not all(w.admit(time.monotonic()) for w in self._limits):
            self.stats.limited += 1
            self.stats.limited_by_second[second] += 1
            return self._too_many()
        if MODERATION_MARKER in reply:  # input moderation comes before any generation
            return _error(
                400,
                "data_inspection_failed",
                "Input data may contain inappropriate content.",
                "data_inspection_failed",
            )
        if (refused := refusal(body)) is not None:
            return _error(400, "invalid_parameter_error", refused, "invalid_request_error")
        if config.latency_ms > 0:
            await asyncio.sleep(self._latency_s())
        fault = self._fault()
        if fault is not None:
            return await self._inject(fault, body, request, seen)
        whole = self._completion(body, seen)
        if body.get("stream"):
            return await self._stream(request, whole, body)
        return _json(whole)

    async def _stream(
        self,
        request: web.Request,
        whole: dict[str, Any],
        body: dict[str, Any],
        *,
        cut: bool = False,
    ) -> web.StreamResponse:
        """Send ``whole`` as server-sent events; ``cut`` stops half-way, as a broken
        connection would, without the last chunks or ``[DONE]``."""
        options = body.get("stream_options") or {}
        events = list(chunks(whole, include_usage=bool(options.get("include_usage"))))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events[: len(events) // 2] if cut else events:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        if not cut:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _fault(self) -> str | None:
        now = time.monotonic()
        if self._burst is not None and now < self._burst[1]:
            return self._burst[0]
        roll = self._rng.random()
        for kind in FAULTS:
            rate = getattr(self.config, f"fail_{kind}")
            if roll < rate:
                self._burst = (kind, now + self.config.burst_s)
                return kind
            roll -= rate
        return None

    async def _inject(
        self, fault: str, body: dict[str, Any], request: web.Request, seen: _Seen
    ) -> web.StreamResponse | None:
        if fault == "500":
            return _error(
                500, "internal_error", "An internal error has occurred.", "internal_error"
            )
        if fault == "503":
            return _error(
                503, "ServiceUnavailable", "The service is overloaded.", "service_unavailable"
            )
        if fault == "429":
            return self._too_many(self.config.fail_429_code)
        if fault == "drop":
            return None
        if fault == "malformed":
            return _json({"object": "error", "detail": "upstream returned no choices"})
        whole = self._completion(body, seen)  # generated (and billed), then cut or slow
        if fault == "truncate" and body.get("stream"):
            return await self._stream(request, whole, body, cut=True)
        full = orjson.dumps(whole)
        if fault == "truncate":
            return web.Response(body=full[: len(full) // 2], content_type="application/json")
        await asyncio.sleep(self.config.slow_s)  # slow
        if body.get("stream"):
            return await self._stream(request, whole, body)
        return web.Response(body=full, content_type="application/json")

    def _completion(self, body: dict[str, Any], seen: _Seen) -> dict[str, Any]:
        whole = completion(
            body, f"chatcmpl-sim-{next(self._ids)}", per_char=self.config.tokens_per_char
        )
        seen.billed = whole["usage"]
        return whole

    def _throttled(self) -> web.Response | None:
        """Within the configured quota window: its refusal."""
        now, config = time.monotonic(), self.config
        if self._first is None:
            self._first = now
        if not config.quota_for or not (
            0 <= now - self._first - config.quota_after < config.quota_for
        ):
            return None
        if config.quota_code == "503":
            return _error(
                503, "ServiceUnavailable", "The service is overloaded.", "service_unavailable"
            )
        if config.quota_code == "429":
            return web.Response(status=429, text="Too Many Requests")
        return self._too_many(config.quota_code)

    def _too_many(self, code: str = "limit_requests") -> web.Response:
        message = MESSAGES_429.get(code, "Too many requests.")
        response = _error(429, code, message, code)
        if self.config.retry_after is not None:
            response.headers["Retry-After"] = f"{self.config.retry_after:g}"
        return response

    def _latency_s(self) -> float:
        sigma = self.config.latency_sigma
        return self.config.latency_ms / 1000 * math.exp(sigma * self._rng.gauss(0, 1))


def _transports(server: web.Server | None) -> set[asyncio.Transport]:
    connections = list(server.connections) if server is not None else []
    return {c.transport for c in connections if isinstance(c.transport, asyncio.Transport)}


async def _cancel_the_rest() -> None:
    """Cancel the handlers still answering (slow faults) so the loop closes cleanly."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    # A closed transport shuts its socket in a callback of the next loop turns: give them
    # those turns, or a socket outlives the loop and warns (unclosed transport) at GC.
    for _ in range(3):
        await asyncio.sleep(0.01)


@dataclass
class Running:
    """A simulator serving in a background thread."""

    base_url: str
    simulator: Simulator

    @property
    def stats(self) -> SimStats:
        return self.simulator.stats


async def start(simulator: Simulator, *, host: str = "127.0.0.1", port: int = 0) -> web.AppRunner:
    """Start serving on the running loop; ``runner.addresses[0]`` is where."""
    # On shutdown, requests still being answered (a ``slow`` fault) get 0.5 s, not 60.
    runner = web.AppRunner(
        simulator.app, access_log=None, handle_signals=False, shutdown_timeout=0.5
    )
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    return runner


@contextlib.contextmanager
def serve_in_thread(config: SimConfig | None = None, *, port: int = 0) -> Iterator[Running]:
    """Serve a simulator on a free loopback port from a thread of its own, until exit."""
    simulator = Simulator(config)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    addresses: list[Any] = []

    async def main() -> None:
        runner = await start(simulator, port=port)
        addresses.extend(runner.addresses)
        ready.set()
        server = runner.server
        try:
            await stop.wait()
        finally:
            # Every connection's transport, as it was before cleanup() and after it, is cut
            # once cleanup() is done: cleanup() forgets connections it only asked to close
            # (a client that went away mid-answer), and such a socket would outlive the
            # loop and warn (unclosed transport) later, in whatever test runs then.
            transports = _transports(server)
            await runner.cleanup()
            for transport in transports | _transports(server):
                transport.abort()
            await _cancel_the_rest()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(timeout=10):
        raise RuntimeError("the simulator did not start within 10 s")
    host, bound = addresses[0][:2]
    try:
        yield Running(f"http://{host}:{bound}/v1", simulator)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
