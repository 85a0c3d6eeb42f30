"""Peer clients for bench/throughput.py, each run as its own process:

    python bench/peers.py reference URL INPUT --in-flight 256
    python bench/peers.py openai-sdk URL INPUT --in-flight 256 [--qps 200]
    python bench/peers.py cookbook URL INPUT --in-flight 256 [--qps 200]

``reference`` is the floor: the same requests through a bare aiohttp + uvloop + orjson
loop, nothing else. ``openai-sdk`` is how many users write it: the openai SDK's
AsyncOpenAI with an asyncio.Semaphore (and aiolimiter for a rate), retrying 429 and 5xx
with the SDK's own retries. ``cookbook`` follows the openai-cookbook's
api_request_parallel_processor.py as it is written (a re-implementation of its approach,
not its code): a new aiohttp ClientSession for every request, a main loop that polls a
request/token capacity every millisecond, a rate limit recognised by "Rate limit" in the
error message (then every sender pauses 15 s), other errors retried at once, each answer
appended to a JSONL file. None writes Parquet or checkpoints. Each prints one JSON line:
rows done, failed rows, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson


def load(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [{"model": "qwen-plus", "messages": [{"role": "user", "content": row["prompt"]}]}
                for row in map(orjson.loads, f)]  # fmt: skip


async def reference(url: str, bodies: list[dict[str, Any]], in_flight: int) -> int:
    import aiohttp

    failed = 0
    todo = iter(bodies)
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failed
            headers = {"Content-Type": "application/json"}
            for body in todo:
                content = orjson.dumps(body)
                async with session.post(
                    url + "/chat/completions", data=content, headers=headers
                ) as r:
                    data = orjson.loads(await r.read())
                    failed += "choices" not in data

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return failed


async def openai_sdk(
    url: str, bodies: list[dict[str, Any]], in_flight: int, qps: float | None
) -> int:
    import openai
    from aiolimiter import AsyncLimiter

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=8)
    gate = asyncio.Semaphore(in_flight)
    limiter = AsyncLimiter(qps, 1) if qps else None
    failed = 0

    async def one(body: dict[str, Any]) -> None:
        nonlocal failed
        async with gate:
            if limiter is not None:
                await limiter.acquire()
            try:
                await client.chat.completions.create(**body)
            except openai.APIError:
                failed += 1

    await asyncio.gather(*(one(b) for b in bodies))
    await client.close()
    return failed


async def cookbook(
    url: str, bodies: list[dict[str, Any]], in_flight: int, qps: float | None, out: str
) -> int:
    import aiohttp

    per_minute = (qps or 1e9) * 60
    capacity, updated = per_minute, time.monotonic()
    queue = list(reversed(bodies))
    retry: list[tuple[dict[str, Any], int]] = []
    in_progress, failed, done = 0, 0, 0
    last_rate_limit = -1e9
    results = open(out, "ab")  # noqa: ASYNC230, SIM115 (the script appends synchronously)

    async def call(body: dict[str, Any], attempts_left: int) -> None:
        nonlocal in_progress, failed, done, last_rate_limit
        error = None
        try:
            async with (
                aiohttp.ClientSession() as session,  # one session a request
                session.post(url + "/chat/completions", json=body) as r,
            ):
                data = await r.json(content_type=None)
            if "error" in data:
                error = data["error"]
                if "Rate limit" in str(error.get("message", "")):
                    last_rate_limit = time.monotonic()
        except (aiohttp.ClientError, ValueError) as e:
            error = {"message": str(e)}
        if error is None:
            results.write(orjson.dumps([body, data]) + b"\n")
            done += 1
        elif attempts_left:
            retry.append((body, attempts_left - 1))
        else:
            results.write(orjson.dumps([body, error]) + b"\n")
            failed += 1
        in_progress -= 1

    while queue or retry or in_progress:
        now = time.monotonic()
        capacity = min(per_minute, capacity + per_minute * (now - updated) / 60)
        updated = now
        if now - last_rate_limit < 15:
            await asyncio.sleep(0.001)
            continue
        if (retry or queue) and capacity >= 1 and in_progress < in_flight:
            body, left = retry.pop() if retry else (queue.pop(), 5)
            capacity -= 1
            in_progress += 1
            asyncio.ensure_future(call(body, left))  # noqa: RUF006 (as the script does)
        else:
            await asyncio.sleep(0.001)
    results.close()
    return failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=["reference", "openai-sdk", "cookbook"])
    parser.add_argument("url")
    parser.add_argument("input")
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--qps", type=float, default=None)
    args = parser.parse_args()
    bodies = load(args.input)
    import uvloop

    started = time.perf_counter()
    if args.client == "reference":
        failed = uvloop.run(reference(args.url, bodies, args.in_flight))
    elif args.client == "cookbook":  # the script runs on the default asyncio loop
        out = args.input + ".cookbook.jsonl"
        failed = asyncio.run(cookbook(args.url, bodies, args.in_flight, args.qps, out))
    else:
        failed = uvloop.run(openai_sdk(args.url, bodies, args.in_flight, args.qps))
    seconds = time.perf_counter() - started
    sys.stdout.write(orjson.dumps({"rows": len(bodies), "failed": failed,
                                   "seconds": seconds}).decode() + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
