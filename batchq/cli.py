"""The command line: click commands only. The one place that prints and sets exit codes."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

import anyio
import click
import orjson

from batchq import batch_api, report
from batchq.config import Job, load_job, with_base_url
from batchq.errors import BatchqError, Interrupted, UsageError
from batchq.events import Sink, fan_out
from batchq.logfile import JsonLog
from batchq.pricing import PriceTable, region_of
from batchq.progress import LiveProgress, PlainProgress, money
from batchq.report import CostLine, CostReport, cost_report, find_results
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


PRICE_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

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
@click.option("--keep-raw", is_flag=True, help="add a raw column: each response as received")
@click.option("--quiet", "-q", is_flag=True, help="print only the final summary")
@click.option(
    "--log-file", type=click.Path(dir_okay=False, path_type=Path),
    help="append one JSON line per retry, slowdown, flush and error row to this file",
)  # fmt: skip
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option("--seed", type=int, default=None, hidden=True)
def run(job_file: str | None, simulate: bool, quiet: bool, log_file: Path | None,
        prices: Path | None, seed: int | None, **flags: Any) -> None:  # fmt: skip
    """Run (or resume) a job: JOB_FILE and/or flags."""
    options = {k: flags.pop(k) for k in ("restart", "retry_errors", "keep_state", "keep_raw")}
    options["command"] = shlex.join(["batchq", *(a for a in sys.argv[1:] if a != "--restart")])
    sinks = _Sinks()
    try:
        job = _job(job_file, flags)
        table = PriceTable.load(prices)
        key = None if simulate else job.request.api_key()
        sink = sinks.open(job, table, key, quiet=quiet, log_file=log_file)
        if simulate:
            with serve_in_thread(SimConfig(latency_ms=20)) as sim:
                summary = _run(with_base_url(job, sim.base_url), None, sink, options, seed)
        else:
            summary = _run(job, key, sink, options, seed)
    except BatchqError as e:
        sinks.close(e)
        _fail(e)
    except KeyboardInterrupt:
        error = Interrupted("interrupted: finished rows are saved; rerun the command to resume")
        sinks.close(error)
        _fail(error)
    sinks.close()
    _print_summary(summary, table)


class _Sinks:
    """The run's sinks: a live bar or plain lines (unless quiet), and the log file."""

    def __init__(self) -> None:
        self.live: LiveProgress | None = None
        self.log: JsonLog | None = None

    def open(self, job: Job, prices: PriceTable, key: str | None, *, quiet: bool,
             log_file: Path | None) -> Sink:  # fmt: skip
        sinks: list[Sink] = []
        region = region_of(job.request.provider)
        if quiet:
            pass
        elif sys.stderr.isatty():
            from rich.console import Console

            self.live = LiveProgress(Console(stderr=True), prices=prices, region=region)
            sinks.append(self.live)
        else:
            sinks.append(PlainProgress(sys.stderr, prices=prices, region=region))
        if log_file is not None:
            self.log = JsonLog(log_file, api_key=key)
            sinks.append(self.log)
        return fan_out(*sinks)

    def close(self, error: BatchqError | None = None) -> None:
        if self.live is not None:
            self.live.close()
        if self.log is not None:
            if error is not None:
                self.log.stopped(error, error.exit_code)
            self.log.close()


def _run(
    job: Job, key: str | None, sink: Sink, options: dict[str, Any], seed: int | None
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


def _print_summary(s: RunSummary, prices: PriceTable) -> None:
    if s.already_complete:
        click.echo(f"{s.output}: complete already ({s.ok:,} ok, {s.error:,} error); nothing sent")
        return
    click.echo(
        f"done: {s.total:,} rows ({s.ok:,} ok, {s.error:,} error), {s.sent:,} sent this run, "
        f"in {s.elapsed_s:.1f} s -> {s.output}"
    )
    report = cost_report(find_results(s.output), prices)
    click.echo(f"tokens: {_tokens_text(report.lines)}; cost: {_cost_text(report)}")


def _tokens_text(lines: list[CostLine]) -> str:
    prompt = sum(x.prompt_tokens for x in lines)
    cached = sum(x.cached_tokens for x in lines)
    completion = sum(x.completion_tokens for x in lines)
    reasoning = sum(x.reasoning_tokens for x in lines)
    return (
        f"{prompt:,} prompt ({cached:,} cached) + {completion:,} completion "
        f"({reasoning:,} reasoning)"
    )


def _cost_text(report: CostReport) -> str:
    parts = [money(v, c) for c, v in sorted(report.totals.items())]
    if report.unpriced:
        parts.append(f"unpriced models: {', '.join(report.unpriced)} (give --prices)")
    return " + ".join(parts) or "nothing"


def _fail(error: BatchqError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def status(path: Path, prices: Path | None, as_json: bool) -> None:
    """How far a job got: PATH is its output file, state folder or job file."""
    try:
        s = report.status(find_results(path), PriceTable.load(prices))
    except BatchqError as e:
        _fail(e)
    if as_json:
        data = dataclasses.asdict(s) | {"remaining": s.remaining}
        click.echo(orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2).decode())
        return
    total = f"{s.total_rows:,}" if s.total_rows is not None else "?"
    click.echo(f"{s.output}: {s.done:,} of {total} rows done ({s.ok:,} ok, {s.error:,} error), "
               f"{s.remaining if s.remaining is not None else '?':,} remaining")  # fmt: skip
    costs = " + ".join(money(v, c) for c, v in sorted(s.costs.items())) or "nothing"
    if s.unpriced:
        costs += f" (unpriced: {', '.join(s.unpriced)})"
    click.echo(f"attempts {s.attempts:,}; tokens {s.prompt_tokens:,} prompt + "
               f"{s.completion_tokens:,} completion; cost so far {costs}")  # fmt: skip
    click.echo(_run_state_text(s))


def _run_state_text(s: report.Status) -> str:
    if s.finished:
        return "finished: the output is complete"
    flushed = (
        "nothing flushed yet" if s.last_flush_ago is None
        else f"last flush {s.last_flush_ago:,.0f} s ago"
    )  # fmt: skip
    resume = s.command or f"batchq run <the job> (output {s.output})"
    if s.state_of_run == "running":
        return f"running (pid {s.pid}); {flushed}"
    stale = f"; the lock names pid {s.pid}, which no longer holds it (stale)" if s.pid else ""
    return f"not running: stopped or crashed{stale}; {flushed}. Resume with: {resume}"


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option("--by", default="model", show_default=True, help="group by this column")
@click.option("--region", type=click.Choice(["intl", "cn", "any"]),
              help="price region (default: the job's provider; intl for others)")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def cost(path: Path, prices: Path | None, by: str, region: str | None, as_json: bool) -> None:
    """What a job's rows cost, from their usage columns: PATH is its output file, state
    folder or job file."""
    try:
        r = cost_report(find_results(path), PriceTable.load(prices), by=by, region=region)
    except BatchqError as e:
        _fail(e)
    if as_json:
        click.echo(orjson.dumps(dataclasses.asdict(r), option=orjson.OPT_INDENT_2).decode())
        return
    headers = [by, "rows", "ok", "error", "prompt", "cached", "completion", "reasoning", "cost"]
    rows = [
        [str(x.key), *(f"{n:,}" for n in (x.rows, x.ok, x.error, x.prompt_tokens,
         x.cached_tokens, x.completion_tokens, x.reasoning_tokens)),
         money(x.cost, x.currency) if x.currency and x.cost is not None else "unpriced"]
        for x in r.lines
    ]  # fmt: skip
    click.echo(_table(headers, rows))
    click.echo(f"total: {_cost_text(r)}")
    via = f", {r.batch_rows:,} rows at Batch API prices" if r.batch_rows else ""
    click.echo(f"prices ({r.region}{via}): {r.source}")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    return "\n".join([line(headers), *(line(r) for r in rows)])


@main.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@job_options
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
def estimate(job_file: str | None, prices: Path | None, **flags: Any) -> None:
    """Project tokens, cost and wall time of a job. Sends nothing."""
    try:
        e = report.estimate(_job(job_file, flags), PriceTable.load(prices))
    except BatchqError as err:
        _fail(err)
    click.echo(f"{e.rows:,} rows")
    for m in e.models:
        bound = (f"at most {m.completion_cap:,} completion tokens (max_tokens)" if not m.uncapped
                 else f"completion unbounded: {m.uncapped:,} rows have no max_tokens")  # fmt: skip
        click.echo(f"  {m.model}: {m.rows:,} rows, ~{m.prompt_tokens:,} prompt tokens, {bound}")
        click.echo(f"    cost: {_range(m)}")
    if e.seconds is None:
        click.echo("wall time: no rate limit set, so it depends on the server's speed")
    else:
        click.echo(f"wall time: about {_duration(e.seconds)} at the configured {e.binding} limit")
    click.echo(f"prompt tokens are estimated at one per 3 characters; prices: {e.source}")


def _range(m: report.ModelEstimate) -> str:
    if m.currency is None or m.low is None:
        return "unpriced (give --prices)"
    share = m.batch_share
    low = money(m.low, m.currency)
    if m.high is None:
        batch_low = money(m.low * share, m.currency)
        return f"at least {low} (prompt only); through the Batch API at least {batch_low}"
    high = money(m.high, m.currency)
    batch = f"{money(m.low * share, m.currency)} to {money(m.high * share, m.currency)}"
    thinking = " (thinking-mode output prices)" if m.thinking else ""
    return f"{low} to {high}{thinking}; through the Batch API ({share:.0%} price) {batch}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


@main.command("export-batch")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@job_options
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="where the files go (default: <output>.batch/ beside the output)")  # fmt: skip
@click.option("--max-lines", type=click.IntRange(1), default=batch_api.MAX_LINES,
              show_default=True, help="lines a file, at most")  # fmt: skip
@click.option("--max-mb", type=click.FloatRange(min=0.001), default=200.0, show_default=True,
              help="megabytes a file, at most")  # fmt: skip
def export_batch(job_file: str | None, out_dir: Path | None, max_lines: int, max_mb: float,
                 **flags: Any) -> None:  # fmt: skip
    """Write the job's pending requests as Batch-API JSONL files (one model a file)."""
    try:
        job = _job(job_file, flags)
        stem = job.output.name.removesuffix(".parquet")
        folder = out_dir or job.output.with_name(stem + ".batch")
        e = batch_api.export_batch(job, folder, max_lines=max_lines,
                                   max_bytes=int(max_mb * 1024**2))  # fmt: skip
    except BatchqError as err:
        _fail(err)
    done = f" ({e.already_done:,} rows have results already)" if e.already_done else ""
    click.echo(f"{e.rows:,} requests in {len(e.files)} files{done} -> {e.folder}/")
    for f in e.files:
        click.echo(f"  {f['file']}: {f['model']}, {f['lines']:,} lines, {f['bytes']:,} bytes")
    click.echo("upload them to the provider's Batch API; then: batchq import-batch "
               f"RESULTS.jsonl… --job {job_file or '<the job>'}")  # fmt: skip


@main.command("import-batch")
@click.argument("results", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
@click.option("--job", "job_file", required=True, type=click.Path(dir_okay=False),
              help="the job file the requests were exported from")  # fmt: skip
@click.option("--keep-state", is_flag=True, help="keep the state folder after the merge")
def import_batch(results: tuple[Path, ...], job_file: str, keep_state: bool) -> None:
    """Read Batch-API output and error files into the job's output Parquet."""
    command = shlex.join(["batchq", "run", job_file])
    try:
        job = load_job(job_file)
        r = batch_api.import_batch(job, list(results), keep_state=keep_state, command=command)
    except BatchqError as err:
        _fail(err)
    click.echo(f"imported {r.imported:,} rows ({r.ok:,} ok, {r.error:,} error)")
    if r.merged:
        click.echo(f"every row has a result -> {r.output}")
    else:
        shown = ", ".join(r.missing_ids) + (", …" if r.missing > len(r.missing_ids) else "")
        click.echo(f"{r.missing:,} rows have no result in these files ({shown}): they stay "
                   f"pending; `{command}` sends them live, or export-batch them again")  # fmt: skip


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
