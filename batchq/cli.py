"""The command line: click commands only. The one place that prints and sets exit codes."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import click
import orjson

from batchq.config import Job, load_job, with_base_url
from batchq.errors import BatchqError, Interrupted, UsageError
from batchq.events import discard
from batchq.progress import PlainProgress
from batchq.runner import RunSummary, run_job
from batchq.simulator import SimConfig, serve_in_thread

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchq")
def main() -> None:
    """Run batches of prompts against OpenAI-compatible chat/completions endpoints."""


def _param(ctx: click.Context, option: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=JSON, e.g. --param top_p=0.8")
        try:
            params[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            params[key] = raw  # a bare word is a string: --param stop=END
    return params


JOB_FLAGS = [
    ("--name", str, "the job's name (default: the job file's)"),
    ("--input", str, "input file: .jsonl, .jsonl.gz or .parquet"),
    ("--output", str, "output Parquet file"),
    ("--id-column", str, "the input column that identifies a row"),
    ("--provider", click.Choice(["dashscope-intl", "dashscope", "openai", "custom"]), "preset"),
    ("--base-url", str, "the endpoint, overriding the preset's"),
    ("--api-key-env", str, "the environment variable holding the API key"),
    ("--model", str, "model name, e.g. qwen-plus"),
    ("--system", str, "system prompt, prepended to every row's messages"),
    ("--template", str, "user message as a str.format template over the row's columns"),
    ("--max-tokens", int, "max_tokens of each request"),
    ("--temperature", float, "sampling temperature"),
    ("--qps", float, "requests per second, at most"),
    ("--qpm", float, "requests per minute, at most"),
    ("--tpm", float, "tokens per minute, at most"),
    ("--concurrency", int, "requests in flight, at most"),
    ("--max-attempts", int, "attempts per row before it is recorded as an error"),
    ("--timeout", float, "seconds before an attempt is given up and retried"),
]


def job_options(f: Any) -> Any:
    for flag, type_, help_ in reversed(JOB_FLAGS):
        f = click.option(flag, type=type_, default=None, help=help_)(f)
    return click.option(
        "--param", "params", multiple=True, callback=_param, metavar="KEY=JSON",
        help="any other request field, e.g. --param top_p=0.8 --param seed=7",
    )(f)  # fmt: skip


def _job(job_file: str | None, flags: dict[str, Any]) -> Job:
    overrides = {k: v for k, v in flags.items() if v is not None}
    if "timeout" in overrides:
        overrides["timeout_s"] = overrides.pop("timeout")
    return load_job(job_file, overrides=overrides)


@main.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@job_options
@click.option(
    "--simulate", is_flag=True, help="run against the built-in simulator: no key, no network"
)
@click.option("--restart", is_flag=True, help="throw away the saved results and start over")
@click.option("--retry-errors", is_flag=True, help="resend only the rows whose status is error")
@click.option("--keep-state", is_flag=True, help="keep the state folder after the merge")
@click.option("--quiet", "-q", is_flag=True, help="print only the final summary")
@click.option("--seed", type=int, default=None, hidden=True)
def run(job_file: str | None, simulate: bool, restart: bool, retry_errors: bool,
        keep_state: bool, quiet: bool, seed: int | None, **flags: Any) -> None:  # fmt: skip
    """Run (or resume) a job: JOB_FILE and/or flags."""
    sink = discard if quiet else PlainProgress(sys.stderr)
    options = {"restart": restart, "retry_errors": retry_errors, "keep_state": keep_state}
    try:
        job = _job(job_file, flags)
        if simulate:
            with serve_in_thread(SimConfig(latency_ms=20)) as sim:
                summary = _run(with_base_url(job, sim.base_url), None, sink, options, seed)
        else:
            summary = _run(job, job.request.api_key(), sink, options, seed)
    except BatchqError as e:
        _fail(e)
    except KeyboardInterrupt:
        _fail(Interrupted("interrupted: finished rows are saved; rerun the same command to resume"))
    _print_summary(summary)


def _run(
    job: Job, key: str | None, sink: Any, options: dict[str, Any], seed: int | None
) -> RunSummary:
    async def go() -> RunSummary:
        return await run_job(job, api_key=key, sink=sink, seed=seed, **options)

    return anyio.run(go, backend_options={"use_uvloop": _has_uvloop()})


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _print_summary(s: RunSummary) -> None:
    if s.already_complete:
        click.echo(f"{s.output}: complete already ({s.ok:,} ok, {s.error:,} error); nothing sent")
        return
    click.echo(
        f"done: {s.total:,} rows ({s.ok:,} ok, {s.error:,} error), {s.sent:,} sent this run, "
        f"in {s.elapsed_s:.1f} s -> {s.output}"
    )


def _fail(error: BatchqError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="loopback address to bind")
@click.option("--port", default=0, type=int, help="port (default: a free one)")
@click.option("--latency-ms", default=0.0, type=float, help="median latency (lognormal)")
@click.option("--latency-sigma", default=0.5, type=float, help="lognormal sigma of the latency")
@click.option("--qps", type=float, default=None, help="answer 429 above this many requests/s")
@click.option("--qpm", type=float, default=None, help="answer 429 above this many requests/min")
@click.option("--retry-after", type=float, default=None, help="Retry-After seconds on a 429")
@click.option("--fail-500", default=0.0, type=float, help="share of requests answered 500")
@click.option("--fail-503", default=0.0, type=float, help="share of requests answered 503")
@click.option("--fail-429", default=0.0, type=float, help="share answered 429 whatever the rate")
@click.option("--fail-drop", default=0.0, type=float, help="share whose connection is dropped")
@click.option("--fail-truncate", default=0.0, type=float, help="share answered half a body")
@click.option("--fail-malformed", default=0.0, type=float, help="share answered 200 non-completion")
@click.option("--fail-slow", default=0.0, type=float, help="share answered after --slow-s")
@click.option("--slow-s", default=30.0, type=float, help="how slow a slow answer is")
@click.option("--burst-s", default=0.0, type=float, help="a fault repeats for this many seconds")
@click.option("--api-key-env", default=None, help="require the key held in this variable")
@click.option("--seed", default=0, type=int, help="seed of the latency and failure draws")
def simulate(host: str, port: int, api_key_env: str | None, **options: Any) -> None:
    """Serve the built-in OpenAI-compatible simulator until Ctrl-C."""
    import asyncio
    import os

    from batchq.simulator.server import Simulator, start

    if host not in ("127.0.0.1", "localhost", "::1"):
        raise UsageError("the simulator serves on loopback only: use --host 127.0.0.1")
    key = os.environ.get(api_key_env) if api_key_env else None
    simulator = Simulator(SimConfig(api_key=key, **options))

    async def serve() -> None:
        runner = await start(simulator, host=host, port=port)
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


if __name__ == "__main__":
    main()
