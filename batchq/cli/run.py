"""``batchq run``: a job from its file and flags, with its sinks, to its output."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import anyio
import click

from batchq.batch.flow import BatchPlan, rules_of
from batchq.batch.rules import window_hours
from batchq.cli._common import PRICE_FILE, cost_text, fail, job_from, job_options, say
from batchq.cli.logfile import JsonLog
from batchq.cli.progress import LiveProgress, PlainProgress
from batchq.config import Job, simulated
from batchq.engine.runner import RunOptions, RunSummary, loop_options, run_job
from batchq.errors import BatchqError, Interrupted, UsageError
from batchq.events import Sink, fan_out
from batchq.money.pricing import PriceTable, region_of
from batchq.money.report import CostLine, CostTally, cost_report, find_results

__all__ = ["run"]

#: Flags of one run, not of the command that resumes (or collects) it.
_ONCE = ("--restart", "--no-wait")


@click.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@job_options
@click.option(
    "--simulate", is_flag=True, help="run against the built-in simulator: no key, no network"
)
@click.option("--restart", is_flag=True, help="throw away the saved results and start over")
@click.option("--retry-errors", is_flag=True, help="resend only the rows whose status is error")
@click.option(
    "--retry-invalid", is_flag=True, help="ask afresh only the rows whose status is invalid"
)
@click.option("--keep-state", is_flag=True, help="keep the state folder after the merge")
@click.option("--keep-raw", is_flag=True, help="add a raw column: each response as received")
@click.option("--quiet", "-q", is_flag=True, help="print only the final summary")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="append one JSON line per retry, slowdown, flush and error row to this file",
)
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option(
    "--via",
    type=click.Choice(["live", "batch"]),
    default="live",
    show_default=True,
    help="batch: the provider's Batch API (half the price, within a day)",
)
@click.option(
    "--window",
    default="24h",
    show_default=True,
    help="--via batch: the completion window (Model Studio: 24h to 336h)",
)
@click.option("--no-wait", is_flag=True, help="--via batch: submit, then return; rerun to collect")
@click.option(
    "--then",
    "then",
    type=click.Choice(["live", "batch", "none"]),
    default="live",
    show_default=True,
    help="--via batch: what to do with rows a batch did not "
    "finish: send them live, submit them again, or leave them pending",
)
@click.option(
    "--keep-remote",
    is_flag=True,
    help="--via batch: keep the uploaded and result files on the provider",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="who sends: this process (local, the default), or workers on Ray "
    "(pip install 'batchq[ray]')",
)
@click.option(
    "--ray-address",
    default=None,
    help="--engine ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); "
    "default: a local Ray for this run",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="--engine ray: sending workers (default: one per CPU, at most 8)",
)
@click.option("--verbose", is_flag=True, help="show the engine's own logs (Ray's)")
@click.option("--poll-s", type=click.FloatRange(min=0.05), default=None, hidden=True)
@click.option("--seed", type=int, default=None, hidden=True)
def run(
    job_file: str | None,
    simulate: bool,
    quiet: bool,
    log_file: Path | None,
    prices: Path | None,
    seed: int | None,
    **flags: Any,
) -> None:
    """Run (or resume) a job: JOB_FILE and/or flags."""
    command = shlex.join(["batchq", *(a for a in sys.argv[1:] if a not in _ONCE)])
    names = ("restart", "retry_errors", "retry_invalid", "keep_state", "keep_raw", "verbose")
    switches = {k: flags.pop(k) for k in names}
    plan = _batch_plan(flags, simulate)
    options = RunOptions(**switches, seed=seed, command=command, batch=plan, prices=prices)
    sinks = _Sinks()
    try:
        job = job_from(job_file, flags)
        if plan is not None:
            window_hours(plan.window, rules_of(job))  # exit 2 before anything is uploaded
            if simulate and not plan.wait:
                raise UsageError(
                    "--no-wait leaves the batches running for a later command to collect, "
                    "but the built-in simulator ends with this command: drop --no-wait (a "
                    "rehearsal's batches take seconds), or serve `batchq simulate` and "
                    "point --base-url at it"
                )
        table = PriceTable.load(prices)
        tally = CostTally(table, region_of(job.request.provider))
        key = None if simulate else job.request.api_key()
        sink = sinks.open(job, table, key, quiet=quiet, log_file=log_file)
        if simulate:
            from batchq.simulator import SimConfig, serve_in_thread  # aiohttp.web: --simulate's

            with serve_in_thread(SimConfig(latency_ms=20)) as sim:
                summary = _run(simulated(job, sim.base_url), None, sink, options, tally)
        else:
            summary = _run(job, key, sink, options, tally)
    except BatchqError as e:
        sinks.close(e)
        fail(e)
    except KeyboardInterrupt:
        error = Interrupted("interrupted: finished rows are saved; rerun the command to resume")
        sinks.close(error)
        fail(error)
    sinks.close()
    _print_summary(summary, table, tally, command)


def _batch_plan(flags: dict[str, Any], simulate: bool) -> BatchPlan | None:
    """``--via batch``'s plan out of ``flags`` (removed from them); None for a live run."""
    via, window, no_wait = flags.pop("via"), flags.pop("window"), flags.pop("no_wait")
    then, keep_remote, poll_s = flags.pop("then"), flags.pop("keep_remote"), flags.pop("poll_s")
    if via != "batch":
        return None
    poll = poll_s if poll_s is not None else (1.0 if simulate else 5.0)  # the simulator: local
    return BatchPlan(
        window=window, wait=not no_wait, then=then, keep_remote=keep_remote, poll_s=poll
    )


class _Sinks:
    """The run's sinks: a live bar or plain lines (unless quiet), and the log file."""

    def __init__(self) -> None:
        self.live: LiveProgress | None = None
        self.log: JsonLog | None = None

    def open(
        self, job: Job, prices: PriceTable, key: str | None, *, quiet: bool, log_file: Path | None
    ) -> Sink:
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
    job: Job, key: str | None, sink: Sink, options: RunOptions, tally: CostTally
) -> RunSummary:
    async def go() -> RunSummary:  # the merge feeds the closing summary's tally
        return await run_job(job, api_key=key, options=options, sink=sink, on_results=tally.add)

    return anyio.run(go, backend_options=loop_options())


def _print_summary(s: RunSummary, prices: PriceTable, tally: CostTally, command: str) -> None:
    counts = f"{s.ok:,} ok, " + (f"{s.invalid:,} invalid, " if s.invalid else "")
    counts += f"{s.error:,} error"
    if s.running_batches:
        say(
            f"submitted: {s.running_batches} batches run on the provider "
            f"({s.pending:,} rows); collect them with: {command}"
        )
        return
    if s.pending:
        say(
            f"{s.pending:,} rows stay pending ({counts} so far); the output is not "
            f"written yet: `{command}` sends them"
        )
        return
    if s.already_complete:
        say(f"{s.output}: complete already ({counts}); nothing sent")
        return
    say(f"done: {s.total:,} rows ({counts}), {_sent_text(s)}, in {s.elapsed_s:.1f} s -> {s.output}")
    # The merge fed the tally every row of the output; a run that merged nothing (an
    # empty input) reads what is there.
    report = tally.report() if tally.sums else cost_report(find_results(s.output), prices)
    say(f"tokens billed: {_tokens_text(report.lines)}; cost: {cost_text(report)}")


def _sent_text(s: RunSummary) -> str:
    """What this run sent: requests live, lines to a Batch API; rows it collected, rows
    that took a repeated request's answer."""
    parts = [f"{s.requests:,} requests sent this run"]
    if s.batch_lines:
        parts.append(f"{s.batch_lines:,} lines submitted to the Batch API")
    if s.collected:
        parts.append(f"{s.collected:,} rows answered by the Batch API")
    if s.copied:
        parts.append(f"{s.copied:,} rows copied from a repeated request (not sent)")
    return ", ".join(parts)


def _tokens_text(lines: list[CostLine]) -> str:
    prompt = sum(x.prompt_tokens for x in lines)
    cached = sum(x.cached_tokens for x in lines)
    completion = sum(x.completion_tokens for x in lines)
    reasoning = sum(x.reasoning_tokens for x in lines)
    copies, copied = sum(x.copies for x in lines), sum(x.copied_tokens for x in lines)
    apart = f" (and {copied:,} in {copies:,} copied rows, not billed)" if copies else ""
    return (
        f"{prompt:,} prompt ({cached:,} cached) + {completion:,} completion "
        f"({reasoning:,} reasoning){apart}"
    )
