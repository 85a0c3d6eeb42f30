"""The client against httpx.MockTransport: what each kind of answer is classified as."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest

from batchq.send.client import Client, Outcome

pytestmark = pytest.mark.anyio

BODY = {"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]}
OK = {
    "id": "c1",
    "model": "qwen-plus",
    "choices": [{"message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
KEY = "sk-SECRETSECRET1234"


def error(status: int, code: str, message: str = "m", **headers: str) -> httpx.Response:
    body = {"error": {"message": message, "type": code, "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


async def send(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> Outcome:
    transport = httpx.MockTransport(handler)
    client = Client(
        "http://sim/v1", api_key=KEY, timeout_s=5, max_connections=4, transport=transport, **kw
    )  # type: ignore[arg-type]
    async with client:
        return await client.send(BODY)


async def test_ok_sends_the_body_with_the_key_to_the_endpoint() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=OK)

    outcome = await send(handler)
    assert outcome.kind == "ok"
    assert outcome.result is not None
    assert outcome.result["response"] == "yo"
    assert outcome.http_status == 200
    assert str(seen[0].url) == "http://sim/v1/chat/completions"
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert orjson.loads(seen[0].content) == BODY


@pytest.mark.parametrize(
    ("response", "kind", "code"),
    [
        (error(429, "limit_requests"), "retry", "limit_requests"),
        (error(429, "insufficient_quota"), "retry", "insufficient_quota"),
        (error(429, "Throttling.AllocationQuota"), "retry", "Throttling.AllocationQuota"),
        (error(429, "Arrearage"), "fatal", "Arrearage"),
        (error(400, "Arrearage"), "fatal", "Arrearage"),
        (error(400, "PrepaidBillOverdue"), "fatal", "PrepaidBillOverdue"),
        (error(403, "AllocationQuota.FreeTierOnly"), "fatal", "AllocationQuota.FreeTierOnly"),
        (error(400, "CommodityNotPurchased"), "fatal", "CommodityNotPurchased"),
        (error(500, "internal_error"), "retry", "internal_error"),
        (httpx.Response(502, text="Bad Gateway"), "retry", "502"),
        (error(503, "ServiceUnavailable"), "retry", "ServiceUnavailable"),
        (httpx.Response(504), "retry", "504"),
        (error(400, "data_inspection_failed"), "row_error", "data_inspection_failed"),
        (error(400, "invalid_parameter_error"), "row_error", "invalid_parameter_error"),
        (error(404, "model_not_found"), "row_error", "model_not_found"),
        (error(401, "invalid_api_key"), "fatal", "invalid_api_key"),
        (error(403, "AccessDenied"), "fatal", "AccessDenied"),
        (httpx.Response(200, text='{"choices": [{"mess'), "retry", "invalid_response"),
        (httpx.Response(200, json={"object": "error"}), "retry", "invalid_response"),
    ],
)
async def test_classification(response: httpx.Response, kind: str, code: str) -> None:
    outcome = await send(lambda request: response)
    assert (outcome.kind, outcome.error_code) == (kind, code)


@pytest.mark.parametrize(
    ("code", "throttled"),
    [
        ("limit_requests", "rate"),
        ("Throttling", "rate"),
        ("Throttling.RateQuota", "rate"),
        ("LimitRequests", "rate"),
        ("something_new", "rate"),
        ("limit_burst_rate", "burst"),
        ("Throttling.BurstRate", "burst"),
        ("insufficient_quota", "quota"),
        ("Throttling.AllocationQuota", "quota"),
    ],
)
async def test_a_429_says_which_throttling_it_is(code: str, throttled: str) -> None:
    outcome = await send(lambda request: error(429, code))
    assert outcome.throttled == throttled
    assert (await send(lambda request: error(503, code))).throttled is None


async def test_retry_after_is_read_from_a_429() -> None:
    outcome = await send(lambda r: error(429, "limit_requests", **{"Retry-After": "2"}))
    assert outcome.retry_after == 2.0


async def test_transport_errors_are_retried() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    outcome = await send(refuse)
    assert (outcome.kind, outcome.error_type, outcome.error_code) == (
        "retry",
        "transport",
        "ConnectError",
    )


async def test_the_key_never_reaches_an_error_message() -> None:
    echoed = f"Incorrect API key provided: {KEY}. Also sk-ab***yz and Bearer {KEY}"
    outcome = await send(lambda r: error(401, "invalid_api_key", echoed))
    assert outcome.error_message is not None
    assert KEY not in outcome.error_message
    assert "SECRET" not in outcome.error_message
    assert "sk-ab" not in outcome.error_message


def sse(*events: object, done: bool = True) -> bytes:
    lines = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
    return b"".join(lines) + (b"data: [DONE]\n\n" if done else b"")


async def send_streamed(handler: Callable[[httpx.Request], httpx.Response]) -> Outcome:
    client = Client(
        "http://sim/v1",
        api_key=KEY,
        timeout_s=5,
        max_connections=4,
        transport=httpx.MockTransport(handler),
    )
    async with client:
        return await client.send({**BODY, "stream": True})


async def test_a_stream_is_assembled_with_its_time_to_first_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert orjson.loads(request.content)["stream"] is True
        chunk = {"id": "s1", "model": "qwen-plus"}
        body = sse(
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {**chunk, "choices": [{"index": 0, "delta": {"content": "yo"}}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": OK["usage"]},
        )
        return httpx.Response(200, content=body, headers={"Content-Type": "text/event-stream"})

    outcome = await send_streamed(handler)
    assert outcome.kind == "ok"
    assert outcome.result is not None
    assert outcome.result["response"] == "yo"
    assert outcome.result["total_tokens"] == 4
    assert 0 <= outcome.result["ttft_ms"] <= outcome.latency_ms  # type: ignore[operator]


async def test_a_stream_cut_off_is_retried_and_an_error_status_is_classified() -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        delta = {"choices": [{"index": 0, "delta": {"content": "half"}}]}
        return httpx.Response(200, content=sse(delta, done=False))

    outcome = await send_streamed(cut)
    assert (outcome.kind, outcome.error_code) == ("retry", "invalid_response")
    assert "cut off" in (outcome.error_message or "")
    refused = await send_streamed(lambda r: error(400, "invalid_parameter_error"))
    assert (refused.kind, refused.http_status) == ("row_error", 400)
