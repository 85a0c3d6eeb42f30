"""``export-batch`` and ``import-batch``: the providers' Batch API by hand; ``batch status``,
``batch cancel`` and ``batch forget``: the batches of ``run --via batch``."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import anyio
import click
import orjson

from batchq.batch import api as batch_api
from batchq.batch import control, flow
from batchq.batch.journal import Journal, describe
from batchq.cli._common import PRICE_FILE, fail, job_from, job_options, say
from batchq.cli.progress import money
from batchq.config import Job, load_job, simulated
from batchq.engine.runner import RunOptions, RunSummary, run_job
from batchq.errors import BatchqError, UsageError
from batchq.money import report
from batchq.money.pricing import PriceTable
from batchq.money.report import find_results
from batchq.state import StateDir

__all__ = ["batch", "export_batch", "import_batch"]


@click.command("export-batch")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@job_options
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="where the files go (default: <output>.batch/ beside the output)",
)
@click.option(
    "--max-lines",
    type=click.IntRange(1),
    default=batch_api.MAX_LINES,
    show_default=True,
    help="lines a file, at most",
)
@click.option(
    "--max-mb",
    type=click.FloatRange(min=0.001),
    default=200.0,
    show_default=True,
    help="megabytes a file, at most",
)
def export_batch(
    job_file: str | None, out_dir: Path | None, max_lines: int, max_mb: float, **flags: Any
) -> None:
    """Write the job's pending requests as Batch-API JSONL files (one model a file)."""
    try:
        job = job_from(job_file, flags)
        stem = job.output.name.removesuffix(".parquet")
        folder = out_dir or job.output.with_name(stem + ".batch")
        command = shlex.join(["batchq", "run", job_file]) if job_file else None
        e = batch_api.export_batch(
            job, folder, max_lines=max_lines, max_bytes=int(max_mb * 1024**2), command=command
        )
    except BatchqError as err:
        fail(err)
    done = f" ({e.already_done:,} rows have results already)" if e.already_done else ""
    click.echo(f"{e.rows:,} requests in {len(e.files)} files{done} -> {e.folder}/")
    for f in e.files:
        click.echo(f"  {f['file']}: {f['model']}, {f['lines']:,} lines, {f['bytes']:,} bytes")
    job_ref = job_file or shlex.quote(str(e.manifest))
    click.echo(
        "upload them to the provider's Batch API; then: batchq import-batch "
        f"RESULTS.jsonl… --job {job_ref}"
    )


@click.command("import-batch")
@click.argument(
    "results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--job",
    "job_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="the job file the requests were exported from, or the export's manifest.json",
)
@click.option("--keep-state", is_flag=True, help="keep the state folder after the merge")
def import_batch(results: tuple[Path, ...], job_file: str, keep_state: bool) -> None:
    """Read Batch-API output and error files into the job's output Parquet."""
    command = shlex.join(["batchq", "run", job_file])
    try:
        job = load_job(job_file)
        r = batch_api.import_batch(job, list(results), keep_state=keep_state, command=command)
    except BatchqError as err:
        fail(err)
    for path in r.twice:
        click.echo(f"note: {path} was given more than once; read once")
    if r.repeated:
        click.echo(
            f"note: {r.repeated:,} custom_ids came more than once with the same answer, "
            "or an error and an answer: kept one each (the answer)"
        )
    invalid = f"{r.invalid:,} invalid, " if r.invalid else ""
    click.echo(f"imported {r.imported:,} rows ({r.ok:,} ok, {invalid}{r.error:,} error)")
    if r.retryable:
        click.echo(
            f"{r.retryable:,} rows failed in the batch as a live run would retry "
            "(expired, cancelled, 5xx or 429): not imported, they stay pending"
        )
    if r.merged:
        click.echo(f"every row has a result -> {r.output}")
    else:
        shown = ", ".join(r.missing_ids) + (", …" if r.missing > len(r.missing_ids) else "")
        what = "have no result in these files" + (" or an answer to ask again" if r.invalid else "")
        click.echo(
            f"{r.missing:,} rows {what} ({shown}): they stay pending; `{command}` "
            "sends them live, or export-batch them again"
        )


@click.group("batch")
def batch() -> None:
    """The Batch-API runs of a job (``batchq run JOB --via batch``): status, cancel,
    forget. Each takes the run's job file and flags, ``--simulate`` too."""


def _run_flags(f: Any) -> Any:
    """The run's job flags and ``--simulate``, so that its command line can be reused."""
    f = click.option(
        "--simulate", is_flag=True, help="the run was a rehearsal: ask no provider, need no key"
    )(f)
    return job_options(f)


def _rehearsal(job: Job, simulate: bool) -> bool:
    """Whether the job's batches are a rehearsal's (the built-in simulator's): said by the
    journal, whatever the flag; ``--simulate`` for batches on a real endpoint is refused,
    as it could not reach them."""
    journal = Journal.load(StateDir.of(job.output))
    if journal is None or journal.simulated:
        return simulate or journal is not None
    if simulate and journal.open_entries():
        where = journal.endpoint or "the provider"
        raise UsageError(
            f"the batches of {job.output} are on {where}, not the simulator's: "
            "drop --simulate to reach them"
        )
    return simulate


@batch.command("status")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@_run_flags
@click.option(
    "--prices", type=PRICE_FILE, help="the run's price table (TOML), to price what was collected"
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object a batch")
def batch_status(
    job_file: str | None, simulate: bool, prices: Path | None, as_json: bool, **flags: Any
) -> None:
    """Each batch the job submitted: id, model, status, counts, created, expires; then
    what was collected and its cost."""
    try:
        job = job_from(job_file, flags)
        ask = not _rehearsal(job, simulate)
        entries = anyio.run(lambda: control.refreshed(job, job.request.api_key, ask=ask))
        collected = _collected(job, prices)
    except BatchqError as err:
        fail(err)
    if as_json:
        for entry in entries:
            say(orjson.dumps(describe(entry)).decode())
        return
    if not entries:
        say(f"{job.output}: no batches submitted (batchq run JOB --via batch submits)")
        return
    for entry in entries:
        d = describe(entry)
        counts = entry.counts
        total = counts.get("total") or entry.lines
        say(
            f"{d['batch_id'] or '-'}  {entry.model}  {d['status']}  "
            f"{counts.get('completed', 0):,}/{total:,} done, "
            f"{counts.get('failed', 0):,} failed  created {_when(entry.created_at)}  "
            f"expires {_when(entry.expires_at)}" + ("  (collected)" if entry.collected else "")
        )
    if collected:
        say(collected)


def _collected(job: Job, prices: Path | None) -> str | None:
    """What the job's state folder holds so far and its cost, priced as the run was."""
    if not StateDir.of(job.output).path.is_dir():
        return None
    results = find_results(StateDir.of(job.output).path)
    s = report.status(results, PriceTable.for_results(prices, results.manifest))
    costs = " + ".join(money(v, c) for c, v in sorted(s.costs.items())) or "nothing"
    return f"collected so far: {s.done:,} rows ({s.ok:,} ok, {s.error:,} error); cost {costs}"


@batch.command("cancel")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@_run_flags
@click.option("--prices", type=PRICE_FILE, help="the run's price table (TOML)")
def batch_cancel(job_file: str | None, simulate: bool, prices: Path | None, **flags: Any) -> None:
    """Cancel the job's batches still running, then collect what they finished."""
    command = shlex.join(["batchq", "run", *([job_file] if job_file else []), "--via", "batch"])
    try:
        job = job_from(job_file, flags)
        rehearsal = _rehearsal(job, simulate)
        outcome = anyio.run(control.cancel, job, job.request.api_key)
        if rehearsal:
            say(
                f"forgot {len(outcome.done)} batches: the rehearsal's went with its "
                "simulator; their rows are pending"
            )
        else:
            say(
                f"cancelled {len(outcome.done)} batches: "
                f"{', '.join(outcome.done) or 'none running'}"
            )
        for note in outcome.notes[0 if not rehearsal else 1 :]:
            say(f"note: {note}")
        if StateDir.of(job.output).holder()[0]:
            say("the run waiting on them collects what they finished")
            return
        options = RunOptions(
            batch=flow.BatchPlan(then="none", poll_s=1.0, submit=False),
            command=command,
            prices=prices,
        )
        summary = _collect(job, options, rehearsal)
    except BatchqError as err:
        fail(err)
    if summary.pending:
        say(
            f"collected: {summary.ok:,} ok, {summary.error:,} error; "
            f"{summary.pending:,} rows stay pending: `{command}` submits them again, "
            f"or `batchq run {job_file or 'JOB'}` sends them live"
        )
    else:
        say(f"collected: every row has a result -> {summary.output}")


def _collect(job: Job, options: RunOptions, rehearsal: bool) -> RunSummary:
    """Collect what the job's batches finished (nothing is submitted); a rehearsal's
    state is its simulator's, so it is read as one."""
    if not rehearsal:
        key = job.request.api_key()
        return anyio.run(lambda: run_job(job, api_key=key, options=options))
    from batchq.simulator import SimConfig, serve_in_thread  # aiohttp.web: --simulate's

    with serve_in_thread(SimConfig()) as sim:
        rehearsed = simulated(job, sim.base_url)
        return anyio.run(lambda: run_job(rehearsed, api_key=None, options=options))


@batch.command("forget")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@_run_flags
def batch_forget(job_file: str | None, simulate: bool, **flags: Any) -> None:
    """Forget the job's batches the provider no longer knows (or a rehearsal's, gone with
    its simulator): their rows are pending again, and the next run sends them. A batch
    the provider still knows is kept."""
    try:
        job = job_from(job_file, flags)
        _rehearsal(job, simulate)
        outcome = anyio.run(control.forget, job, job.request.api_key)
    except BatchqError as err:
        fail(err)
    for note in outcome.notes:
        say(f"note: {note}")
    run = shlex.join(["batchq", "run", *([job_file] if job_file else [])])
    if outcome.done:
        say(
            f"forgot {len(outcome.done)} batches ({', '.join(outcome.done)}): their "
            f"{outcome.rows:,} rows are pending; `{run}` sends them"
        )
    else:
        say("forgot no batch")


def _when(stamp: int | None) -> str:
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))
