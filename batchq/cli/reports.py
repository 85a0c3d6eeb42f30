"""``status``, ``cost`` and ``estimate``: what a job holds, costs, or would cost."""

from __future__ import annotations

import dataclasses
import math
import shlex
import tempfile
from pathlib import Path
from typing import Any

import anyio
import click
import orjson

from batchq.batch.journal import Journal as BatchJournal
from batchq.batch.journal import describe
from batchq.cli._common import JOB_KEYS, PRICE_FILE, cost_text, fail, job_from, job_options, say
from batchq.cli.progress import money
from batchq.cli.run import run
from batchq.config import Job, simulated
from batchq.engine.runner import RunOptions, loop_options, run_job
from batchq.errors import BatchqError, UsageError
from batchq.money import report
from batchq.money.estimate import (
    Estimate,
    ModelEstimate,
    Projected,
    project,
    prompt_estimates,
    spread,
)
from batchq.money.estimate import estimate as estimate_job
from batchq.money.pricing import PriceTable, region_of
from batchq.money.report import CostLine, cost_report, find_results, sampled_results
from batchq.state import StateDir

__all__ = ["cost", "estimate", "status"]


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def status(path: Path, prices: Path | None, as_json: bool) -> None:
    """How far a job got: PATH is its output file, state folder or job file."""
    try:
        results = find_results(path)
        table = PriceTable.for_results(prices, results.manifest)
        s = report.status(results, table)
        resume = None if s.finished else resume_command(s, table)
    except BatchqError as e:
        fail(e)
    journal = BatchJournal.load(StateDir.of(Path(s.output)))
    batches = [b for b in journal.open_entries() if b.batch_id] if journal else []
    if as_json:
        data = dataclasses.asdict(s) | {
            "remaining": s.remaining,
            "resume": resume and resume[0],
            "batches": [describe(b) for b in batches],
        }
        click.echo(orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2).decode())
        return
    total = f"{s.total_rows:,}" if s.total_rows is not None else "?"
    counts = f"{s.ok:,} ok, " + (f"{s.invalid:,} invalid, " if s.invalid else "")
    click.echo(
        f"{s.output}: {s.done:,} of {total} rows done ({counts}{s.error:,} error), "
        f"{s.remaining if s.remaining is not None else '?':,} remaining"
    )
    costs = " + ".join(money(v, c) for c, v in sorted(s.costs.items())) or "nothing"
    if s.unpriced:
        costs += f" (unpriced: {', '.join(s.unpriced)})"
    click.echo(
        f"attempts {s.attempts:,}; tokens {s.prompt_tokens:,} prompt + "
        f"{s.completion_tokens:,} completion; cost so far {costs}"
    )
    click.echo(_run_state_text(s, resume))
    if batches:
        click.echo(
            f"{len(batches)} batches on the provider, not collected yet (as last "
            "seen; `batchq batch status JOB` asks the provider):"
        )
        for entry in batches:
            whole = entry.counts.get("total") or entry.lines
            click.echo(
                f"  {entry.batch_id} {entry.model}: {entry.status}, "
                f"{entry.counts.get('completed', 0):,}/{whole:,} done"
            )


def _run_state_text(s: report.Status, resume_with: tuple[str, str | None] | None) -> str:
    if s.finished:
        return "finished: the output is complete"
    flushed = (
        "nothing flushed yet"
        if s.last_flush_ago is None
        else f"last flush {s.last_flush_ago:,.0f} s ago"
    )
    if s.state_of_run == "running":
        return f"running (pid {s.pid}); {flushed}"
    resume, why = resume_with or (s.command or "", None)
    resume += f"\n  ({why})" if why else ""
    if s.pid:
        crashed = f": it crashed or was killed (pid {s.pid} died holding the lock)"
        return f"not running{crashed}; {flushed}. Resume with: {resume}"
    return f"not running; {flushed}. Resume with: {resume}"


#: What the rest of a job is taken to cost beyond its rows' mean so far, when ``status``
#: suggests a --max-cost that lets it finish (longer answers later, retries, re-asks).
RESUME_MARGIN = 1.25


def resume_command(s: report.Status, prices: PriceTable) -> tuple[str, str | None]:
    """The command that resumes the job ``s`` describes, and why it differs from the one
    recorded (None when it does not).

    A run stopped by its --max-cost (which counts what earlier runs spent) would stop
    again at once under the same cap. The cap suggested covers what was spent, the
    remaining rows at the mean cost of a row so far (RESUME_MARGIN over), and the last
    requests in flight at their worst case (as the budget reserves them: a request's
    cost at its max_tokens), rounded up to two significant digits."""
    command = s.command or f"batchq run <the job> (output {s.output})"
    job = _job_of(s.command)
    if job is None or job.limits.max_cost is None or not s.done or not s.remaining:
        return command, None
    if len(s.costs) != 1:
        return command, None
    cap = job.limits.max_cost
    ((currency, spent),) = s.costs.items()
    rest = spent / s.done * s.remaining
    try:  # the budget's reserve for a request in flight: its cost at max_tokens
        models = estimate_job(job, prices).models
    except BatchqError:  # the input moved since: the mean alone
        models = []
    worst = max((m.high / m.rows for m in models if m.high is not None and m.rows), default=0.0)
    need = spent + rest * RESUME_MARGIN + min(s.remaining, job.limits.concurrency) * worst
    if need <= cap:
        return command, None
    suggested = _round_up(need)
    words = shlex.split(command)
    if "--max-cost" in words:
        words[words.index("--max-cost") + 1] = f"{suggested:g}"
    else:
        words += ["--max-cost", f"{suggested:g}"]
    why = (
        f"--max-cost {cap:g} counts the {money(spent, currency)} spent; the "
        f"{s.remaining:,} rows left cost about {money(rest, currency)} more at the mean "
        "so far: the same cap would stop again at once"
    )
    return shlex.join(words), why


def _job_of(command: str | None) -> Job | None:
    """The job a recorded ``batchq run …`` command runs, read as ``run`` reads it."""
    if not command:
        return None
    try:
        words = shlex.split(command)
        with run.make_context("run", words[2:]) as ctx:  # run's own parser
            params = dict(ctx.params)
        flags = {k: v for k, v in params.items() if k in JOB_KEYS}
        return job_from(params.get("job_file"), flags)
    except (ValueError, click.ClickException, BatchqError):
        return None


def _round_up(amount: float) -> float:
    """Up to two significant digits: 0.0123 -> 0.013, 7.31 -> 7.4."""
    if amount <= 0:
        return amount
    step = 10.0 ** (math.floor(math.log10(amount)) - 1)
    return round(math.ceil(amount / step - 1e-9) * step, 12)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option("--by", default="model", show_default=True, help="group by this column")
@click.option(
    "--region",
    type=click.Choice(["intl", "cn", "any"]),
    help="price region (default: the job's provider; intl for others)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def cost(path: Path, prices: Path | None, by: str, region: str | None, as_json: bool) -> None:
    """What a job's rows cost, from their usage columns: PATH is its output file, state
    folder or job file."""
    try:
        results = find_results(path)
        table = PriceTable.for_results(prices, results.manifest)
        r = cost_report(results, table, by=by, region=region)
    except BatchqError as e:
        fail(e)
    if as_json:
        click.echo(orjson.dumps(dataclasses.asdict(r), option=orjson.OPT_INDENT_2).decode())
        return
    counts = (
        COUNTS if any(x.invalid for x in r.lines) else tuple(c for c in COUNTS if c != "invalid")
    )
    headers = [by, *(c.removesuffix("_tokens") for c in counts), "cost"]
    rows = [_cost_row(key, lines, counts) for key, lines in _by_key(r.lines)]
    click.echo(_table(headers, rows))
    click.echo(f"total: {cost_text(r)}")
    via = f", {r.batch_rows:,} rows at Batch API prices" if r.batch_rows else ""
    click.echo(f"prices ({r.region}{via}): {r.source}")


def _by_key(lines: list[CostLine]) -> list[tuple[str | None, list[CostLine]]]:
    """The report's lines (one per value and currency) gathered per value, in order."""
    groups: dict[str | None, list[CostLine]] = {}
    for line in lines:
        groups.setdefault(line.key, []).append(line)
    return list(groups.items())


def _cost_row(key: str | None, lines: list[CostLine], names: tuple[str, ...]) -> list[str]:
    """One table row for a value: its counts summed, its cost in each currency, and how
    many of its rows are of unpriced models."""
    counts = (sum(getattr(x, name) for x in lines) for name in names)
    costs = [money(x.cost, x.currency) for x in lines if x.currency and x.cost is not None]
    unpriced = sum(x.rows for x in lines if x.currency is None)
    if unpriced:
        costs.append("unpriced" if not costs else f"{unpriced:,} rows unpriced")
    return [str(key), *(f"{n:,}" for n in counts), " + ".join(costs)]


COUNTS = ("rows", "ok", "invalid", "error", "prompt_tokens", "cached_tokens",
          "completion_tokens", "reasoning_tokens")  # fmt: skip


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    return "\n".join([line(headers), *(line(r) for r in rows)])


@click.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@job_options
@click.option("--prices", type=PRICE_FILE, help="a price table (TOML) over the built-in one")
@click.option(
    "--sample",
    type=click.IntRange(1),
    default=None,
    help="send N rows spread over the input; project from their real usage",
)
@click.option("--yes", is_flag=True, help="--sample: send it even when it is the whole input")
@click.option(
    "--simulate",
    is_flag=True,
    help="--sample: rehearse it on the built-in simulator (no key, no network, nothing kept)",
)
def estimate(
    job_file: str | None,
    prices: Path | None,
    sample: int | None,
    yes: bool,
    simulate: bool,
    **flags: Any,
) -> None:
    """Project tokens, cost and wall time of a job. Sends nothing, unless --sample."""
    try:
        job = job_from(job_file, flags)
        if (yes or simulate) and sample is None:
            raise UsageError(
                "--yes and --simulate go with --sample N (without it, estimate sends nothing)"
            )
        table = PriceTable.load(prices)
        e = estimate_job(job, table)
        if sample is not None and sample >= e.rows and not (yes or simulate):
            raise UsageError(
                f"--sample {sample:,} is the whole input ({e.rows:,} rows): it would send every "
                "row for real, as `batchq run` does (the answers are kept, so the run would "
                f"send nothing more); give --yes to do that, or a --sample below {e.rows:,}"
            )
        projected = None
        if sample is not None and simulate:
            projected = _rehearsed(job, job_file, e, table, sample, prices)
        elif sample is not None:
            key = job.request.api_key()
            projected = _sampled(job, job_file, e, table, sample, prices, key)
    except BatchqError as err:
        fail(err)
    if projected is not None:
        _print_projection(projected, e, rehearsed=simulate)
        return
    click.echo(f"{e.rows:,} rows")
    for m in e.models:
        bound = (
            f"at most {m.completion_cap:,} completion tokens (max_tokens)"
            if not m.uncapped
            else f"completion unbounded: {m.uncapped:,} rows have no max_tokens"
        )
        click.echo(f"  {m.model}: {m.rows:,} rows, ~{m.prompt_tokens:,} prompt tokens, {bound}")
        click.echo(f"    cost: {_range(m)}")
    if e.seconds is None:
        click.echo("wall time: no rate limit set, so it depends on the server's speed")
    else:
        click.echo(f"wall time: about {_duration(e.seconds)} at the configured {e.binding} limit")
    click.echo(f"prompt tokens are estimated at one per 3 characters; prices: {e.source}")


def _sampled(
    job: Job,
    job_file: str | None,
    e: Estimate,
    table: PriceTable,
    n: int,
    prices: Path | None,
    key: str | None,
) -> list[Projected]:
    """Send ``n`` rows spread over the input (into the job's state folder, so that the
    run does not pay for them again); the projection from their results."""
    rows = spread(e.rows, n)
    command = shlex.join(["batchq", "run", job_file]) if job_file else None
    options = RunOptions(sample=frozenset(rows), command=command, prices=prices)
    whole = " (the whole input)" if len(rows) == e.rows else ""
    say(f"sending {len(rows):,} sample rows of {e.rows:,}{whole}…", err=True)
    anyio.run(lambda: run_job(job, api_key=key, options=options), backend_options=loop_options())
    prompts = prompt_estimates(job, job.input, rows)
    return project(e, sampled_results(job, rows), prompts, table, region_of(job.request.provider))


def _rehearsed(
    job: Job, job_file: str | None, e: Estimate, table: PriceTable, n: int, prices: Path | None
) -> list[Projected]:
    """``_sampled`` on the built-in simulator, into a folder of its own that is removed
    after: the job's state never holds a rehearsal's answers."""
    from batchq.simulator import SimConfig, serve_in_thread  # aiohttp.web: --simulate's

    with (
        tempfile.TemporaryDirectory(prefix="batchq-estimate-") as folder,
        serve_in_thread(SimConfig(latency_ms=20)) as sim,
    ):
        apart = dataclasses.replace(
            simulated(job, sim.base_url), output=Path(folder) / job.output.name
        )
        return _sampled(apart, job_file, e, table, n, prices, None)


def _print_projection(projected: list[Projected], e: Estimate, *, rehearsed: bool) -> None:
    sampled = sum(p.sampled for p in projected)
    spent = [
        money(p.sample_cost, p.currency)
        for p in projected
        if p.sample_cost is not None and p.currency
    ]
    if rehearsed:
        click.echo(
            f"{e.rows:,} rows; {sampled:,} sampled on the built-in simulator (nothing "
            "sent, nothing kept): its answers are echoes of the prompts, so the "
            "completion side below is the simulator's, not the model's"
        )
    else:
        click.echo(
            f"{e.rows:,} rows; {sampled:,} sampled, sent for real (cost "
            f"{' + '.join(spent) or 'unpriced'}), kept in the state folder: the run "
            "sends only the others"
        )
    for p in projected:
        click.echo(
            f"  {p.model}: {p.rows:,} rows, projected ~{p.prompt_tokens:,} prompt + "
            f"~{p.completion_tokens:,} completion tokens"
        )
        model = next(m for m in e.models if m.model == p.model)
        if p.cost is None or p.currency is None:
            click.echo(f"    cost: {model.unpriced} (give --prices)")
            continue
        share = model.batch_share
        click.echo(
            f"    cost: about {money(p.cost, p.currency)} (95 %: "
            f"{money(p.low or 0.0, p.currency)} to {money(p.high or 0.0, p.currency)}); "
            f"through the Batch API about {money(p.cost * share, p.currency)}"
        )
    if e.seconds is not None:
        click.echo(f"wall time: about {_duration(e.seconds)} at the configured {e.binding} limit")


def _range(m: ModelEstimate) -> str:
    if m.currency is None or m.low is None:
        return f"{m.unpriced} (give --prices)"
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
