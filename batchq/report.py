"""``status`` and ``cost`` as data: what a job's output or state folder holds.

A path names a job's results in any of three ways: the output Parquet file, its state
folder (``<output>.batchq/``), or the job file. While a run is unfinished (running or
crashed) the results are the state folder's shards, the latest answer of each row; once
it is finished they are the output file. Nothing here prints: the CLI formats.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from batchq.config import Job, load_job
from batchq.errors import UsageError
from batchq.io.preflight import completion_cap, preflight
from batchq.io.writer import read_output_manifest
from batchq.limiter import RAMP_S
from batchq.pricing import DEFAULT_BATCH_SHARE, Price, PriceTable, region_of
from batchq.request import estimate_tokens

__all__ = [
    "CostLine",
    "CostReport",
    "Estimate",
    "ModelEstimate",
    "Results",
    "Status",
    "cost_report",
    "estimate",
    "find_results",
    "status",
]

USAGE_COLUMNS = ["prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens"]
_NEEDED = ["status", "model", "attempts", "reasoning", "via", *USAGE_COLUMNS]


@dataclass(frozen=True)
class Results:
    """Where a job's results are, and the job's manifest (None for a foreign file)."""

    output: Path
    state: Path
    manifest: dict[str, Any] | None
    #: True when the results are the finished output file, False for the state folder.
    finished: bool

    def frame(self, extra: list[str] | None = None) -> pl.DataFrame:
        """One row per answered input row, with the usage columns (and ``extra``)."""
        columns = list(dict.fromkeys([*_NEEDED, *(extra or [])]))
        if self.finished:
            return _read_output(self.output, columns)
        return _read_shards(self.state / "shards", columns)


def find_results(path: Path) -> Results:
    """The results ``path`` names. UsageError when there are none (yet)."""
    if path.suffix == ".toml":
        output = load_job(path).output
    elif path.name.endswith(".batchq"):
        output = path.with_name(path.name.removesuffix(".batchq"))
    else:
        output = path
    state = output.with_name(output.name + ".batchq")
    if (state / "manifest.json").exists():
        manifest = orjson.loads((state / "manifest.json").read_bytes())
        return Results(output, state, manifest, finished=False)
    if output.exists():
        try:
            manifest = read_output_manifest(output)
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid, a ValueError
            raise UsageError(f"{output} is not a Parquet file batchq can read: {e}") from None
        return Results(output, state, manifest, finished=True)
    raise UsageError(
        f"no results at {path}: neither {output} nor its state folder {state} exists. "
        "Give the output file, the state folder or the job file of a job that has run"
    )


def _read_output(output: Path, columns: list[str]) -> pl.DataFrame:
    names = pl.read_parquet_schema(output)
    missing = [c for c in columns if c not in names and c not in _NEEDED]
    if missing:
        raise UsageError(f"{output} has no column {missing[0]!r}: choose one it has")
    if "status" not in names:
        raise UsageError(f"{output} has no status column: it was not written by batchq")
    present = [c for c in columns if c in names]
    frame = pl.read_parquet(output, columns=present)
    # A file from an older batchq, or written by hand, may lack a usage column: nulls.
    return frame.with_columns(
        pl.lit(None, pl.Int64 if c.endswith("_tokens") or c == "attempts" else pl.Utf8).alias(c)
        for c in columns
        if c not in names
    )


def _read_shards(shards: Path, columns: list[str]) -> pl.DataFrame:
    paths = sorted(shards.glob("[0-9]*.parquet"))
    schema = pl.read_parquet_schema(paths[0]) if paths else {}
    extra = [c for c in columns if c not in _NEEDED and c not in schema]
    if paths and extra:
        raise UsageError(
            f"the state folder holds result columns only, not {extra[0]!r}: run `cost` "
            "by an input column once the run is finished (or --by a result column now)"
        )
    if not paths:
        return pl.DataFrame(schema=dict.fromkeys(columns, pl.Utf8))
    frames = [
        pl.scan_parquet(p).select(["_row", *columns]).with_columns(_seq=pl.lit(int(p.stem)))
        for p in paths
    ]
    # A row answered twice (--retry-errors) counts once: its latest answer.
    latest = pl.concat(frames).sort("_row", "_seq").unique("_row", keep="last")
    return latest.drop("_row", "_seq").collect()


# --- cost ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostLine:
    """One group of rows (a model, or a value of ``--by``) and what it cost."""

    key: str | None
    currency: str | None  # None: unpriced
    rows: int
    ok: int
    error: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: float | None


@dataclass(frozen=True)
class CostReport:
    by: str
    lines: list[CostLine]
    totals: dict[str, float]  # currency -> cost
    unpriced: list[str]  # models without a price
    source: str
    region: str
    #: Rows answered through a provider's Batch API (``import-batch``), priced at its share.
    batch_rows: int
    rows: int = field(default=0)


def cost_report(
    results: Results, prices: PriceTable, *, by: str = "model", region: str | None = None
) -> CostReport:
    """Per-request costs, summed by ``by``. Region and Batch-API pricing come from the
    job's manifest unless ``region`` is given."""
    manifest = results.manifest or {}
    region = region or manifest.get("region") or "intl"
    frame = results.frame([by])
    priced, unpriced = priced_frame(frame, prices, region)
    batch_rows = int((frame.get_column("via") == "batch").sum()) if frame.height else 0
    lines = _group(priced, by)
    totals: dict[str, float] = {}
    for line in lines:
        if line.currency is not None and line.cost is not None:
            totals[line.currency] = totals.get(line.currency, 0.0) + line.cost
    return CostReport(
        by, lines, totals, unpriced, prices.source, region, batch_rows, rows=frame.height
    )


def priced_frame(
    frame: pl.DataFrame, prices: PriceTable, region: str
) -> tuple[pl.DataFrame, list[str]]:
    """``frame`` with ``cost`` and ``currency`` columns (null where unpriced), and the
    unpriced models."""
    cost: pl.Expr = pl.lit(None, pl.Float64)
    currency: pl.Expr = pl.lit(None, pl.Utf8)
    unpriced = []
    models = frame.get_column("model").unique().to_list() if frame.height else []
    for model in sorted(models, key=str):
        price = prices.lookup(model, region)
        if price is None:
            unpriced.append(str(model))
            continue
        is_model = pl.col("model") == model
        cost = pl.when(is_model).then(_cost_expr(price)).otherwise(cost)
        currency = pl.when(is_model).then(pl.lit(price.currency)).otherwise(currency)
    return frame.with_columns(cost=cost, currency=currency), unpriced


def _cost_expr(price: Price) -> pl.Expr:
    """Polars' form of Price.cost, one request per row."""
    prompt, cached, completion = (pl.col(c).fill_null(0) for c in USAGE_COLUMNS[:3])
    thinking = (pl.col("reasoning_tokens").fill_null(0) > 0) | pl.col("reasoning").is_not_null()
    share = pl.when(pl.col("via") == "batch").then(price.batch_share).otherwise(1.0)

    def tier_cost(i: int) -> pl.Expr:
        t = price.tiers[i]
        paid = (prompt - cached) * t.input + cached * t.input * price.cached_share
        out = completion * pl.when(thinking).then(t.thinking_output).otherwise(t.output)
        return (paid + out) * (share / 1_000_000)

    expr = tier_cost(len(price.tiers) - 1)
    for i in reversed(range(len(price.tiers) - 1)):
        bound = price.tiers[i].max_input
        expr = (
            tier_cost(i)
            if bound is None
            else (pl.when(prompt <= bound).then(tier_cost(i)).otherwise(expr))
        )
    return expr


def _group(priced: pl.DataFrame, by: str) -> list[CostLine]:
    if by not in priced.columns:
        raise UsageError(f"there is no column {by!r} to group by")
    table = (
        priced.with_columns(pl.col(by).cast(pl.Utf8).alias("_key"))
        .group_by("_key", "currency")
        .agg(
            rows=pl.len(),
            ok=(pl.col("status") == "ok").sum(),
            error=(pl.col("status") == "error").sum(),
            **{c: pl.col(c).fill_null(0).sum() for c in USAGE_COLUMNS},
            cost=pl.col("cost").sum(),
        )
        .sort("_key", "currency", nulls_last=True)
    )
    return [_line(r) for r in table.iter_rows(named=True)]


def _line(r: dict[str, Any]) -> CostLine:
    cost = None if r["currency"] is None else float(r["cost"])
    prompt, cached, completion, reasoning = (int(r[c]) for c in USAGE_COLUMNS)
    return CostLine(
        r["_key"], r["currency"], r["rows"], r["ok"], r["error"],
        prompt, cached, completion, reasoning, cost,
    )  # fmt: skip


# --- status ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    output: Path
    state: Path
    finished: bool
    total_rows: int | None
    done: int
    ok: int
    error: int
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    costs: dict[str, float]
    unpriced: list[str]
    #: Seconds since the last flush of a shard (None: none yet, or finished).
    last_flush_ago: float | None
    #: "running", "stopped" (no run holds the lock), or "finished".
    state_of_run: str
    pid: int | None
    command: str | None

    @property
    def remaining(self) -> int | None:
        return None if self.total_rows is None else self.total_rows - self.done


def status(results: Results, prices: PriceTable) -> Status:
    manifest = results.manifest or {}
    frame = results.frame()
    region = manifest.get("region") or "intl"
    priced, unpriced = priced_frame(frame, prices, region)
    costs = {
        r["currency"]: float(r["cost"])
        for r in priced.group_by("currency").agg(cost=pl.col("cost").sum()).iter_rows(named=True)
        if r["currency"] is not None
    }
    statuses = frame.get_column("status")

    def total(name: str) -> int:
        return int(frame.get_column(name).fill_null(0).sum()) if frame.height else 0

    running, pid = (False, None) if results.finished else lock_holder(results.state)
    total_rows = manifest.get("input_rows", frame.height if results.finished else None)
    return Status(
        results.output, results.state, results.finished, total_rows, frame.height,
        int((statuses == "ok").sum()), int((statuses == "error").sum()), total("attempts"),
        total("prompt_tokens"), total("completion_tokens"), costs, unpriced,
        None if results.finished else _last_flush_ago(results.state),
        "finished" if results.finished else ("running" if running else "stopped"),
        pid, manifest.get("command"),
    )  # fmt: skip


def lock_holder(state: Path) -> tuple[bool, int | None]:
    """Whether a live process holds the state folder's lock, and the pid written in it.

    The kernel drops a flock when its process dies, even by ``kill -9``, so a lock file
    nobody holds is stale whatever pid it names.
    """
    lock = state / "lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            held = False
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return held, int(text) if text.isdigit() else None


def _last_flush_ago(state: Path) -> float | None:
    shards = sorted((state / "shards").glob("[0-9]*.parquet"))
    if not shards:
        return None
    return max(0.0, time.time() - shards[-1].stat().st_mtime)


# --- estimate --------------------------------------------------------------------------


@dataclass
class ModelEstimate:
    """What a job's rows for one model may use and cost (nothing sent)."""

    model: str
    rows: int = 0
    prompt_tokens: int = 0
    #: Sum of the rows' max_tokens; rows without one are counted in ``uncapped``.
    completion_cap: int = 0
    uncapped: int = 0
    thinking: bool = False
    currency: str | None = None
    #: Cost with no completion at all, and with every completion at its cap (None: no
    #: price, or no cap to bound it by).
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Estimate:
    rows: int
    models: list[ModelEstimate]
    #: Seconds at the configured limits (None: no rate limit set), and the limit that binds.
    seconds: float | None
    binding: str
    batch_share: float
    source: str


def estimate(job: Job, prices: PriceTable) -> Estimate:
    """Project tokens, cost and wall time for ``job`` from one pass over its input."""
    by_model: dict[str, ModelEstimate] = {}

    def observe(body: dict[str, Any]) -> None:
        model = str(body.get("model"))
        m = by_model.get(model) or by_model.setdefault(model, ModelEstimate(model))
        m.rows += 1
        m.prompt_tokens += estimate_tokens(body)
        cap = completion_cap(body)
        m.completion_cap += cap or 0
        m.uncapped += cap is None
        m.thinking |= body.get("enable_thinking") is True

    info = preflight(job, observe=observe)
    region = region_of(job.request.provider)
    batch_share = DEFAULT_BATCH_SHARE
    for m in by_model.values():
        price = prices.lookup(m.model, region)
        if price is None:
            continue
        m.currency, batch_share = price.currency, price.batch_share
        per_row = m.prompt_tokens // max(m.rows, 1)
        m.low = price.cost(per_row, 0) * m.rows
        if not m.uncapped:
            cap = m.completion_cap // m.rows
            m.high = price.cost(per_row, cap, thinking=m.thinking) * m.rows
    seconds, binding = _wall_time(job, info.total_rows, by_model.values())
    models = sorted(by_model.values(), key=lambda m: m.model)
    return Estimate(info.total_rows, models, seconds, binding, batch_share, prices.source)


def _wall_time(job: Job, rows: int, models: Any) -> tuple[float | None, str]:
    limits = job.limits
    rates = {}
    if limits.qps:
        rates["qps"] = limits.qps
    if limits.qpm:
        rates["qpm"] = limits.qpm / 60
    if limits.tpm:
        tokens = sum(m.prompt_tokens + m.completion_cap for m in models)
        if tokens:
            rates["tpm"] = limits.tpm / 60 / (tokens / rows)
    if not rates:
        return None, "no rate limit set"
    binding = min(rates, key=lambda k: rates[k])
    return rows / rates[binding] + RAMP_S / 2, binding
