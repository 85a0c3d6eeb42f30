"""The Batch API client over httpx.MockTransport: retries what the service could not
answer, re-sends an upload whole, stops on a refusal without ever saying the key."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from batchq.batch.remote import ATTEMPTS, Remote
from batchq.errors import RunStopped

KEY = "sk-remote-secret-123"


async def no_sleep(_: float) -> None:
    return None


@pytest.mark.anyio
async def test_an_upload_is_retried_whole_after_503s_and_drops(tmp_path: Path) -> None:
    path = tmp_path / "r1.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n' * 1000)
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        bodies.append(request.read())
        if len(bodies) == 1:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        if len(bodies) == 2:
            raise httpx.RemoteProtocolError("peer closed the connection", request=request)
        return httpx.Response(200, json={"id": "file-1", "filename": "x.jsonl"})

    transport = httpx.MockTransport(answer)
    async with Remote("http://h/v1", api_key=KEY, transport=transport, sleep=no_sleep) as remote:
        file = await remote.upload(path, "batchq-t-r1-001.jsonl")
    assert file["id"] == "file-1"
    assert len(bodies) == 3
    sent = path.read_bytes()
    assert all(sent in body for body in bodies)  # whole, each time
    assert b'name="purpose"\r\n\r\nbatch' in bodies[0]


@pytest.mark.anyio
async def test_a_refusal_stops_at_once_and_never_says_the_key(tmp_path: Path) -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        message = f"Incorrect API key provided: {KEY}."
        return httpx.Response(401, json={"error": {"message": message}})

    transport = httpx.MockTransport(answer)
    async with Remote("http://h/v1", api_key=KEY, transport=transport, sleep=no_sleep) as remote:
        with pytest.raises(RunStopped) as stopped:
            await remote.batch("batch_1")
    assert calls == ["/v1/batches/batch_1"]
    assert KEY not in str(stopped.value)
    assert "check the API key" in str(stopped.value)
    assert stopped.value.http_status == 401


@pytest.mark.anyio
async def test_a_download_is_streamed_into_place_and_gives_up_after_its_tries(
    tmp_path: Path,
) -> None:
    content = b"".join(orjson.dumps({"custom_id": str(i)}) + b"\n" for i in range(50_000))
    tries = {"n": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/file-ok/content"):
            return httpx.Response(200, content=content)
        tries["n"] += 1
        return httpx.Response(500, json={"error": {"message": "internal"}})

    transport = httpx.MockTransport(answer)
    async with Remote("http://h/v1", api_key=None, transport=transport, sleep=no_sleep) as remote:
        await remote.download("file-ok", tmp_path / "out.jsonl")
        with pytest.raises(RunStopped, match=f"no answer after {ATTEMPTS} tries"):
            await remote.download("file-bad", tmp_path / "bad.jsonl")
    assert tries["n"] == ATTEMPTS
    assert (tmp_path / "out.jsonl").read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # noqa: ASYNC240 - no .part
