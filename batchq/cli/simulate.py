"""``batchq simulate``: the built-in simulator as a server of its own."""

from __future__ import annotations

from typing import Any

import click

from batchq.cli._common import fail
from batchq.errors import UsageError
from batchq.simulator.limits import SHAPES

__all__ = ["simulate"]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="loopback address to bind")
@click.option("--port", default=0, type=int, help="port (default: a free one)")
@click.option("--latency-ms", default=0.0, type=float, help="median latency (lognormal)")
@click.option("--latency-sigma", default=0.5, type=float, help="lognormal sigma of the latency")
@click.option("--qps", type=float, default=None, help="answer 429 above this many requests/s")
@click.option("--qpm", type=float, default=None, help="answer 429 above this many requests/min")
@click.option(
    "--limit-shape",
    type=click.Choice(SHAPES),
    default="window",
    show_default=True,
    help="how --qps/--qpm are enforced: a sliding window, a token bucket of a second's or a "
    "minute's worth, a fixed window per minute",
)
@click.option("--retry-after", type=float, default=None, help="Retry-After seconds on a 429")
@click.option(
    "--quota-for",
    default=0.0,
    type=float,
    help="refuse every request for this many seconds (a shared account's spike)",
)
@click.option(
    "--quota-after",
    default=5.0,
    type=float,
    show_default=True,
    help="...starting this many seconds after the first request",
)
@click.option(
    "--quota-code",
    default="insufficient_quota",
    show_default=True,
    help="...with a 429 of this error.code (429: none; 503: a gateway's 503)",
)
@click.option("--fail-500", default=0.0, type=float, help="share of requests answered 500")
@click.option("--fail-503", default=0.0, type=float, help="share of requests answered 503")
@click.option("--fail-429", default=0.0, type=float, help="share answered 429 whatever the rate")
@click.option(
    "--fail-429-code",
    default="limit_requests",
    show_default=True,
    help="error.code of those 429s (insufficient_quota, limit_burst_rate, Arrearage...)",
)
@click.option("--fail-drop", default=0.0, type=float, help="share whose connection is dropped")
@click.option("--fail-truncate", default=0.0, type=float, help="share answered half a body")
@click.option("--fail-malformed", default=0.0, type=float, help="share answered 200 non-completion")
@click.option("--fail-slow", default=0.0, type=float, help="share answered after --slow-s")
@click.option("--slow-s", default=30.0, type=float, help="how slow a slow answer is")
@click.option("--burst-s", default=0.0, type=float, help="a fault repeats for this many seconds")
@click.option(
    "--batch-seconds",
    default=2.0,
    type=float,
    help="the Batch API: seconds a batch takes to finish",
)
@click.option(
    "--batch-fail-lines",
    default=0.0,
    type=float,
    help="the Batch API: share of a batch's lines failed with a 500",
)
@click.option("--batch-expire", is_flag=True, help="the Batch API: batches expire half-done")
@click.option(
    "--tokens-per-char",
    type=float,
    default=None,
    help="bill this many tokens a character (1.0: a CJK tokenizer's way)",
)
@click.option("--api-key-env", default=None, help="require the key held in this variable")
@click.option("--seed", default=0, type=int, help="seed of the latency and failure draws")
def simulate(host: str, port: int, api_key_env: str | None, **options: Any) -> None:
    """Serve the built-in OpenAI-compatible simulator until Ctrl-C."""
    import asyncio
    import os

    from batchq.simulator.server import SimConfig, Simulator, start  # aiohttp.web: here only

    if host not in ("127.0.0.1", "localhost", "::1"):
        fail(UsageError("the simulator serves on loopback only: use --host 127.0.0.1"))
    key = os.environ.get(api_key_env) if api_key_env else None
    simulator = Simulator(SimConfig(api_key=key, **options))

    async def serve() -> None:
        try:
            runner = await start(simulator, host=host, port=port)
        except OSError as e:
            fail(
                UsageError(
                    f"cannot serve on {host}:{port}: {e.strerror or e}; choose another "
                    "--port (or leave it out for a free one)"
                )
            )
        bound = runner.addresses[0]
        click.echo(f"batchq simulator on http://{bound[0]}:{bound[1]}/v1 (Ctrl-C stops it)")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        click.echo(f"stopped after {simulator.stats.requests:,} requests", err=True)
