"""An OpenAI-compatible ``POST …/chat/completions`` server on 127.0.0.1 (aiohttp.web).

Content is a deterministic function of the request: the reply to a conversation is
``"echo: "`` followed by its last user message, so a test can check that every row got
*its* answer. Usage counts words (one token a word, three more a message); ``max_tokens``
truncates the reply and gives ``finish_reason: "length"``. Around that: a lognormal
latency, server-side QPS / QPM limits answered with 429 and Model Studio's error body
(optionally with ``Retry-After``), injected 500 / 503 rates, 401 for a wrong key, and
a moderation refusal (400 ``data_inspection_failed``) for a message with MODERATION_MARKER.
It serves every path ending in ``/chat/completions`` (``/v1/…``, ``/compatible-mode/v1/…``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

#: A user message containing this is refused like Model Studio's content moderation.
MODERATION_MARKER = "FLAGGED-CONTENT"

__all__ = [
    "MODERATION_MARKER",
    "SimConfig",
    "SimStats",
    "Simulator",
    "reply_for",
    "serve_in_thread",
]


@dataclass(frozen=True)
class SimConfig:
    """How the simulated server behaves. Rates are probabilities per request."""

    latency_ms: float = 0.0
    latency_sigma: float = 0.5
    qps: float | None = None
    qpm: float | None = None
    retry_after: float | None = None
    fail_500: float = 0.0
    fail_503: float = 0.0
    api_key: str | None = None
    seed: int = 0


@dataclass
class SimStats:
    """What the server saw. ``by_prompt`` counts completed requests per last user message."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)


def reply_for(messages: list[dict[str, Any]]) -> str:
    """The simulator's deterministic answer to a conversation."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = last.get("content") if last else ""
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return f"echo: {content}"


def _error(status: int, code: str, message: str, type_: str) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class _Window:
    """Requests admitted within the last ``period`` seconds, up to ``limit``."""

    def __init__(self, limit: float, period: float) -> None:
        self.limit, self.period = limit, period
        self.times: deque[float] = deque()

    def admit(self, now: float) -> bool:
        while self.times and self.times[0] <= now - self.period:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


class Simulator:
    """The request handler and its state; ``app`` is the aiohttp application."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._rng = random.Random(self.config.seed)
        self._ids = itertools.count(1)
        self._windows = [
            _Window(limit, period)
            for limit, period in ((self.config.qps, 1.0), (self.config.qpm, 60.0))
            if limit
        ]
        self.app = web.Application(client_max_size=64 * 1024**2)
        self.app.router.add_post(r"/{prefix:.*}chat/completions", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        response = await self._answer(request)
        self.stats.by_status[response.status] += 1
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        config = self.config
        if config.api_key and request.headers.get("Authorization") != f"Bearer {config.api_key}":
            return _error(
                401, "invalid_api_key", "Incorrect API key provided.", "invalid_request_error"
            )
        now = time.monotonic()
        if not all(w.admit(now) for w in self._windows):
            return self._too_many()
        roll = self._rng.random()
        if roll < config.fail_500:
            return _error(
                500, "internal_error", "An internal error has occurred.", "internal_error"
            )
        if roll < config.fail_500 + config.fail_503:
            return _error(
                503, "ServiceUnavailable", "The service is overloaded.", "service_unavailable"
            )
        try:
            body = orjson.loads(await request.read())
            messages = body["messages"]
            model = str(body["model"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, "invalid_parameter_error", "The request body is not valid: "
                          "it needs model and messages.", "invalid_request_error")  # fmt: skip
        if config.latency_ms > 0:
            await asyncio.sleep(self._latency_s())
        reply = reply_for(messages)
        self.stats.by_prompt[reply] += 1
        if MODERATION_MARKER in reply:
            return _error(400, "data_inspection_failed", "Input data may contain inappropriate "
                          "content.", "data_inspection_failed")  # fmt: skip
        return web.Response(body=orjson.dumps(self._completion(body, messages, model)),
                            content_type="application/json")  # fmt: skip

    def _too_many(self) -> web.Response:
        response = _error(429, "limit_requests", "Requests rate limit exceeded, please try "
                          "again later.", "limit_requests")  # fmt: skip
        if self.config.retry_after is not None:
            response.headers["Retry-After"] = f"{self.config.retry_after:g}"
        return response

    def _latency_s(self) -> float:
        sigma = self.config.latency_sigma
        return self.config.latency_ms / 1000 * math.exp(sigma * self._rng.gauss(0, 1))

    def _completion(self, body: dict[str, Any], messages: list[Any], model: str) -> dict[str, Any]:
        words = reply_for(messages).split(" ")
        cap = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "stop"
        if isinstance(cap, int) and len(words) > cap:
            words, finish = words[:cap], "length"
        prompt_tokens = sum(3 + len(str(m.get("content", "")).split()) for m in messages)
        return {
            "id": f"chatcmpl-sim-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }


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
    runner = web.AppRunner(simulator.app, access_log=None, handle_signals=False)
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
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

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
        loop.close()
