"""``estimate`` as data: what a job would use, cost and take, from one pass over its
input (nothing sent); with ``--sample N``, projected from N rows sent for real."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchq import arrays
from batchq.config import Job
from batchq.io.preflight import completion_cap, preflight
from batchq.io.reader import read_batches
from batchq.money.pricing import DEFAULT_BATCH_SHARE, PriceTable, region_of, row_costs
from batchq.send.limiter import RAMP_S
from batchq.send.request import build_body, estimate_tokens
from batchq.state import check_output

__all__ = [
    "Estimate",
    "ModelEstimate",
    "Projected",
    "estimate",
    "project",
    "prompt_estimates",
    "spread",
]


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
    #: why it has no price (``PriceTable.why_unpriced``)
    unpriced: str = "unpriced"
    #: The Batch API's price as a share of the live price.
    batch_share: float = DEFAULT_BATCH_SHARE


@dataclass(frozen=True)
class Estimate:
    rows: int
    models: list[ModelEstimate]
    #: Seconds at the configured limits (None: no rate limit set), and the limit that binds.
    seconds: float | None
    binding: str
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

    check_output(job)
    info = preflight(job, observe=observe)
    region = region_of(job.request.provider)
    for m in by_model.values():
        price = prices.lookup(m.model, region)
        if price is None:
            m.unpriced = prices.why_unpriced(m.model, region)
            continue
        m.currency, m.batch_share = price.currency, price.batch_share
        per_row = m.prompt_tokens // max(m.rows, 1)
        m.low = price.cost(per_row, 0) * m.rows
        if not m.uncapped:
            cap = m.completion_cap // m.rows
            m.high = price.cost(per_row, cap, thinking=m.thinking) * m.rows
    seconds, binding = _wall_time(job, info.total_rows, by_model.values())
    models = sorted(by_model.values(), key=lambda m: m.model)
    return Estimate(info.total_rows, models, seconds, binding, prices.source)


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


# --- a sampled estimate ------------------------------------------------------------------


def spread(rows: int, n: int) -> list[int]:
    """``n`` row positions spread evenly over ``rows`` (all of them when n >= rows)."""
    if n >= rows:
        return list(range(rows))
    return sorted({(2 * i + 1) * rows // (2 * n) for i in range(n)})


@dataclass(frozen=True)
class Projected:
    """A model's whole-job figures projected from its sampled rows' real usage."""

    model: str
    rows: int
    sampled: int
    prompt_tokens: int
    completion_tokens: int
    currency: str | None
    #: what the sample itself cost, and the projection for every row with a 95 % interval
    sample_cost: float | None
    cost: float | None
    low: float | None
    high: float | None


def project(
    estimate: Estimate,
    sample: pa.Table,
    prompts: dict[int, int],
    prices: PriceTable,
    region: str,
) -> list[Projected]:
    """Each model's tokens and cost for the whole job, from ``sample`` (the sampled
    rows' results, with ``_row``) and ``prompts`` (their prompt estimates, as the whole
    job's are summed in ``estimate``).

    A regression estimator: a row's figure is fitted as ``a + b × its prompt estimate``
    over the sample, then summed over every row's estimate (known exactly), so that
    answers that grow with the prompt (an echo, a translation) and answers that do not
    (a label) are both projected from what the sample shows, not from its mean alone,
    which a few long rows throw off. The interval is 95 % from the fit's residuals."""
    costs = row_costs(sample, prices, region).column("cost")
    table = sample.append_column("_cost", costs)
    projected = []
    for m in estimate.models:
        rows = table.filter(pc.equal(table.column("model"), arrays.text(m.model)))
        n = rows.num_rows
        if n == 0:
            continue
        xs = [float(prompts.get(r, 0)) for r in rows.column("_row").to_pylist()]
        fit = _Fit(xs, m.rows, float(m.prompt_tokens))
        price = prices.lookup(m.model, region)
        cost = low = high = sample_cost = None
        if price is not None:
            each = _values(rows, "_cost", float)
            sample_cost = sum(each)
            cost, half = fit.total(each)
            low, high = max(cost - half, 0.0), cost + half
        projected.append(
            Projected(
                m.model,
                m.rows,
                n,
                round(fit.total(_values(rows, "prompt_tokens", float))[0]),
                round(fit.total(_values(rows, "completion_tokens", float))[0]),
                price.currency if price is not None else None,
                sample_cost,
                cost,
                low,
                high,
            )
        )
    return projected


@dataclass(frozen=True)
class _Fit:
    """The sample's prompt estimates ``xs``, of ``rows`` rows whose estimates sum to
    ``x_total``."""

    xs: list[float]
    rows: int
    x_total: float

    def total(self, ys: list[float]) -> tuple[float, float]:
        """The projected sum of ``ys`` over every row, and its interval's half-width."""
        n, xs = len(ys), self.xs
        x_mean, y_mean = sum(xs) / n, sum(ys) / n
        sxx = sum((x - x_mean) ** 2 for x in xs)
        pairs = list(zip(xs, ys, strict=True))
        sxy = sum((x - x_mean) * (y - y_mean) for x, y in pairs)
        slope = sxy / sxx if sxx else 0.0
        level = y_mean - slope * x_mean
        total = level * self.rows + slope * self.x_total
        if n < 3:
            return total, abs(total)
        residual = sum((y - level - slope * x) ** 2 for x, y in pairs) / (n - 2)
        correction = max(0.0, (self.rows - n) / max(self.rows - 1, 1))
        return total, 1.96 * self.rows * math.sqrt(residual / n * correction)


def prompt_estimates(job: Job, path: Path, rows: list[int]) -> dict[int, int]:
    """The prompt estimate (as ``estimate`` counts it) of each of the positions ``rows``."""
    wanted, found = set(rows), {}
    for batch in read_batches(path):
        for i, row in enumerate(batch.rows):
            if batch.start + i in wanted:
                found[batch.start + i] = estimate_tokens(build_body(row, job.request))
    return found


def _values(table: pa.Table, name: str, kind: type = int) -> list[Any]:
    return [kind(v or 0) for v in table.column(name).to_pylist()]
