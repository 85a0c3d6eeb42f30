"""``estimate`` as data: what a job would use, cost and take, from one pass over its
input. Nothing is sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchq.config import Job
from batchq.io.preflight import completion_cap, preflight
from batchq.money.pricing import DEFAULT_BATCH_SHARE, PriceTable, region_of
from batchq.send.limiter import RAMP_S
from batchq.send.request import estimate_tokens
from batchq.state import check_output

__all__ = ["Estimate", "ModelEstimate", "estimate"]


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
