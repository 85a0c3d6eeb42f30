"""Peer clients for bench/throughput.py, each run as its own process:

    python bench/peers.py reference URL INPUT --in-flight 256
    python bench/peers.py openai-sdk URL INPUT --in-flight 256 [--qps 200]
    python bench/peers.py cookbook URL INPUT [--qps 200]
    python bench/peers.py cookbook-script URL INPUT --script PATH [--qps 200]

``reference`` is the floor: the same requests through a bare aiohttp + uvloop + orjson
loop, nothing else. ``openai-sdk`` is how many users write it: the openai SDK's
AsyncOpenAI with an asyncio.Semaphore (and aiolimiter for a rate), retrying 429 and 5xx
with the SDK's own retries. ``cookbook`` is the openai-cookbook's
api_request_parallel_processor.py re-implemented line for line in its approach (not its
code): one aiohttp session, a main loop that sends at most one request per turn and sleeps
1 ms every turn, each request's tokens counted with tiktoken before sending, a rate limit
recognised only by the error code "429" (Model Studio's code is "limit_requests"), then a
15 s pause; other errors retried at once, 5 attempts; an INFO log line per request; each
answer appended to a JSONL file opened for it. ``cookbook-script`` runs the script itself,
given as --script PATH (see bench/README.md for fetching it and tiktoken's encoding).
None writes Parquet or checkpoints. Each prints one JSON line:
rows done, failed rows, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson


def load(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [
            {"model": "qwen-plus", "messages": [{"role": "user", "content": row["prompt"]}]}
            for row in map(orjson.loads, f)
        ]


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


async def cookbook(url: str, bodies: list[dict[str, Any]], qps: float | None, out: str) -> int:
    import logging

    import aiohttp

    count = tokens_counter()
    per_minute = (qps or 1e9) * 60
    capacity, updated = per_minute, time.monotonic()
    todo = iter(bodies)
    retry: asyncio.Queue[tuple[int, dict[str, Any], int]] = asyncio.Queue()
    started, in_progress, failed = 0, 0, 0
    last_rate_limit = 0.0
    waiting: tuple[int, dict[str, Any], int] | None = None
    logging.basicConfig(level=logging.INFO)  # the script's default level

    async def call(task_id: int, body: dict[str, Any], attempts_left: int) -> None:
        nonlocal in_progress, failed, last_rate_limit
        logging.info(f"Starting request #{task_id}")
        error: object = None
        try:
            async with session.post(url + "/chat/completions", json=body) as r:
                data = await r.json(content_type=None)
            if "error" in data:
                error = data
                if data["error"].get("code") == "429":
                    last_rate_limit = time.monotonic()
        except Exception as e:
            error = e
        if error is None:
            append(out, [body, data])
            in_progress -= 1
        elif attempts_left:
            retry.put_nowait((task_id, body, attempts_left))
        else:
            append(out, [body, [str(error)]])
            in_progress -= 1
            failed += 1

    async with aiohttp.ClientSession() as session:
        while True:
            if waiting is None:
                if not retry.empty():
                    waiting = retry.get_nowait()
                elif (body := next(todo, None)) is not None:
                    count(body)
                    waiting = (started, body, 5)
                    started += 1
                    in_progress += 1
            now = time.monotonic()
            capacity = min(per_minute, capacity + per_minute * (now - updated) / 60)
            updated = now
            if waiting is not None and capacity >= 1:
                capacity -= 1
                task_id, body, left = waiting
                asyncio.create_task(call(task_id, body, left - 1))  # noqa: RUF006
                waiting = None
            if in_progress == 0:
                break
            await asyncio.sleep(0.001)  # every turn, as the script does
            if (pause := 15 - (time.monotonic() - last_rate_limit)) > 0:
                await asyncio.sleep(pause)
    return failed


def append(path: str, data: object) -> None:
    with open(path, "a") as f:  # opened for every answer, as the script does
        f.write(json.dumps(data) + "\n")


def tokens_counter() -> Callable[[dict[str, Any]], int]:
    """The script's token count of a chat request: tiktoken's cl100k_base when it loads
    (its encodings are downloaded at first use: see bench/README.md), else a rough
    4-characters-a-token stand-in, which is cheaper than the real count."""
    try:
        import tiktoken

        encode = tiktoken.get_encoding("cl100k_base").encode
    except Exception:  # no tiktoken, or no encoding
        print("cookbook: tiktoken unavailable, counting tokens roughly", file=sys.stderr)

        def encode(text: str) -> list[int]:
            return [0] * (len(text) // 4)

    def count(body: dict[str, Any]) -> int:
        tokens = 2 + 15 * body.get("n", 1)
        for message in body["messages"]:
            tokens += 4 + sum(len(encode(value)) for value in message.values())
        return tokens

    return count


def cookbook_script(
    script: str, url: str, bodies: list[dict[str, Any]], qps: float | None, out: str
) -> int:
    """The openai-cookbook script itself, loaded from SCRIPT. One change: it finds the
    endpoint with a pattern that only takes https:// addresses, so that function is
    replaced by one that also takes the simulator's http:// address."""
    import importlib.util
    import logging
    import re

    spec = importlib.util.spec_from_file_location("cookbook_script", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.api_endpoint_from_url = lambda u: re.sub(r"^http://[^/]+/v\d+/", "", u)
    requests = out + ".requests.jsonl"
    with open(requests, "w") as f:
        f.writelines(json.dumps(body) + "\n" for body in bodies)
    run = module.process_api_requests_from_file(
        requests_filepath=requests,
        save_filepath=out,
        request_url=url + "/chat/completions",
        api_key="none",
        max_requests_per_minute=(qps or 1e9) * 60,
        max_tokens_per_minute=1e12,
        token_encoding_name="cl100k_base",
        max_attempts=5,
        logging_level=logging.INFO,
    )
    asyncio.run(run)
    with open(out, "rb") as f:
        return sum("choices" not in orjson.loads(line)[1] for line in f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "client", choices=["reference", "openai-sdk", "cookbook", "cookbook-script"]
    )
    parser.add_argument("url")
    parser.add_argument("input")
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--qps", type=float, default=None)
    parser.add_argument("--script", help="the cookbook's api_request_parallel_processor.py")
    args = parser.parse_args()
    bodies = load(args.input)
    out = f"{args.input}.{args.client}.jsonl"
    Path(out).unlink(missing_ok=True)  # the cookbook appends
    import uvloop

    started = time.perf_counter()
    if args.client == "reference":
        failed = uvloop.run(reference(args.url, bodies, args.in_flight))
    elif args.client == "cookbook":  # the script runs on the default asyncio loop
        failed = asyncio.run(cookbook(args.url, bodies, args.qps, out))
    elif args.client == "cookbook-script":
        failed = cookbook_script(args.script, args.url, bodies, args.qps, out)
    else:
        failed = uvloop.run(openai_sdk(args.url, bodies, args.in_flight, args.qps))
    seconds = time.perf_counter() - started
    sys.stdout.write(
        orjson.dumps({"rows": len(bodies), "failed": failed, "seconds": seconds}).decode() + "\n"
    )


if __name__ == "__main__":
    main()
