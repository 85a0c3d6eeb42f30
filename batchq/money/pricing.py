"""Prices: the built-in, dated table of Qwen models on Model Studio, and overrides.

The table lives in ``batchq/money/data/prices.toml`` (its header gives the source page and the
date it was checked); ``--prices FILE`` in the same format overrides or extends it, e.g.
for OpenAI models or a self-hosted server at zero. A model the table does not know is
*unpriced*: reported as such, never priced at zero.

One request costs, per 1,000,000 tokens of its tier (chosen by its prompt tokens)::

    (prompt − cached − created) × input + cached × input × (cached_input, or
        cached_explicit for a request that used the explicit cache)
        + created × input × cache_creation
        + completion × (thinking_output if thinking else output)

where ``created`` is the prompt's tokens written to an explicit cache. Model Studio's
context-cache page (alibabacloud.com/help/en/model-studio/context-cache, updated
2026-03-31): explicit-cache creation 125 % of the input price, its hits 10 %, implicit-
cache hits 20 %; the two caches are exclusive, one a request.

times ``batch`` (0.5) for requests sent through a provider's Batch API, and nothing for a
row that took a repeated request's answer (``via = dedupe``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchq import arrays
from batchq.errors import UsageError

__all__ = ["Price", "PriceTable", "RowPricer", "Tier", "cost_array", "region_of", "row_costs"]

DEFAULT_CACHED_SHARE = 0.2
DEFAULT_EXPLICIT_SHARE = 0.1
DEFAULT_CREATION_SHARE = 1.25
DEFAULT_BATCH_SHARE = 0.5
REGIONS = ("intl", "cn", "any")
_SNAPSHOT = re.compile(r"-(latest|\d{4}-\d{2}-\d{2}|\d{4})$")


def region_of(provider: str) -> str:
    """The price region of a provider preset: Model Studio's two regions, else "any"."""
    return {"dashscope-intl": "intl", "dashscope": "cn"}.get(provider, "any")


@dataclass(frozen=True)
class Tier:
    """Prices per 1M tokens for requests whose prompt is at most ``max_input`` tokens."""

    max_input: int | None
    input: float
    output: float
    thinking_output: float


@dataclass(frozen=True)
class Price:
    model: str
    region: str
    currency: str
    tiers: tuple[Tier, ...]
    cached_share: float = DEFAULT_CACHED_SHARE
    batch_share: float = DEFAULT_BATCH_SHARE
    explicit_share: float = DEFAULT_EXPLICIT_SHARE
    creation_share: float = DEFAULT_CREATION_SHARE

    def tier(self, prompt_tokens: int) -> Tier:
        """The tier a request with ``prompt_tokens`` is billed at."""
        for tier in self.tiers:
            if tier.max_input is None or prompt_tokens <= tier.max_input:
                return tier
        return self.tiers[-1]

    def cost(
        self,
        prompt: int,
        completion: int,
        *,
        cached: int = 0,
        thinking: bool = False,
        batch: bool = False,
        created: int | None = None,
    ) -> float:
        """The cost of one request, in ``currency``. ``created``: tokens written to an
        explicit cache (None: the request did not use it; its hits are implicit)."""
        tier = self.tier(prompt)
        hit = self.cached_share if created is None else self.explicit_share
        written = created or 0
        paid_input = (
            (prompt - cached - written) * tier.input
            + cached * tier.input * hit
            + written * tier.input * self.creation_share
        )
        output = completion * (tier.thinking_output if thinking else tier.output)
        total = (paid_input + output) / 1_000_000
        return total * self.batch_share if batch else total


#: Entries by (model, region): a price, or why there is none (see ``_entry``).
Entries = dict[tuple[str, str], Price | str]


def cost_array(table: pa.Table, price: Price) -> pa.Array:
    """``Price.cost`` of every row of ``table`` (result columns), in Arrow compute: the
    request's tier by its prompt tokens, its cache hits, thinking-mode output for rows with
    reasoning, and the Batch API's share for rows with ``via = batch``. (Numbers go in as
    ``arrays`` scalars: see there.)"""
    f, false = arrays.float64, arrays.boolean(False)

    def column(name: str) -> pa.Array:
        return pc.fill_null(pc.cast(table.column(name), pa.float64()), f(0))

    prompt, cached, completion = (
        column(c) for c in ("prompt_tokens", "cached_tokens", "completion_tokens")
    )
    creation = (
        table.column("cache_creation_tokens")
        if "cache_creation_tokens" in table.column_names
        else pa.nulls(table.num_rows, pa.int64())
    )
    explicit = pc.is_valid(creation)  # the explicit cache was used: its hits' share
    created = pc.fill_null(pc.cast(creation, pa.float64()), f(0))
    thinking = pc.or_(
        pc.greater(column("reasoning_tokens"), f(0)), pc.is_valid(table.column("reasoning"))
    )
    via = table.column("via")
    batch = pc.fill_null(pc.equal(via, arrays.text("batch")), false)
    # another row's answer: not billed
    copied = pc.fill_null(pc.equal(via, arrays.text("dedupe")), false)
    hit = pc.if_else(explicit, f(price.explicit_share), f(price.cached_share))
    # The part the Batch API answered (its live re-asks are the rest); an output from
    # before the part was recorded: the whole row, for a row via the Batch API.
    parted = (
        pc.is_valid(table.column("batch_prompt_tokens"))
        if "batch_prompt_tokens" in table.column_names
        else pa.nulls(table.num_rows, pa.bool_()).fill_null(False)
    )
    zero = pc.multiply(prompt, f(0.0))
    part_prompt = (
        column("batch_prompt_tokens") if "batch_prompt_tokens" in table.column_names else zero
    )
    part_completion = (
        column("batch_completion_tokens")
        if "batch_completion_tokens" in table.column_names
        else zero
    )

    def priced(
        prompt: pa.Array, cached: pa.Array, created: pa.Array, completion: pa.Array, t: Tier
    ) -> pa.Array:
        plain = pc.subtract(pc.subtract(prompt, cached), created)
        paid = pc.add(
            pc.add(
                pc.multiply(plain, f(t.input)), pc.multiply(pc.multiply(cached, hit), f(t.input))
            ),
            pc.multiply(created, f(t.input * price.creation_share)),
        )
        out = pc.multiply(completion, pc.if_else(thinking, f(t.thinking_output), f(t.output)))
        return pc.divide(pc.add(paid, out), f(1_000_000.0))

    def by_tier(cost_at: Callable[[Tier], pa.Array]) -> pa.Array:
        cost = cost_at(price.tiers[-1])
        for tier in reversed(price.tiers[:-1]):
            if tier.max_input is None:
                cost = cost_at(tier)
            else:
                cost = pc.if_else(pc.less_equal(prompt, f(tier.max_input)), cost_at(tier), cost)
        return cost

    whole = by_tier(lambda t: priced(prompt, cached, created, completion, t))
    # the Batch API has no context cache: its part's prompt is all at the input price
    part = by_tier(lambda t: priced(part_prompt, zero, zero, part_completion, t))
    through_batch = pc.if_else(parted, part, pc.if_else(batch, whole, zero))
    cost = pc.subtract(whole, pc.multiply(through_batch, f(1 - price.batch_share)))
    return pc.if_else(copied, zero, cost)


def row_costs(
    table: pa.Table, prices: PriceTable, region: str, unpriced: set[str] | None = None
) -> pa.Table:
    """``cost`` and ``currency`` of each row of ``table`` (result columns) at its model's
    price in ``region``; null where the model is unpriced (its name added to
    ``unpriced``, with why). A row without usage (an error) costs 0."""
    cost = pa.nulls(table.num_rows, pa.float64())
    currency = pa.nulls(table.num_rows, pa.string())
    model = table.column("model")
    for name in pc.unique(model).to_pylist():
        price = prices.lookup(name, region)
        if price is None:
            if unpriced is not None:
                unpriced.add(prices.unpriced_name(name, region))
            continue
        rows = pc.fill_null(pc.equal(model, arrays.text(name)), arrays.boolean(False))
        cost = pc.if_else(rows, cost_array(table, price), cost)
        currency = pc.if_else(rows, arrays.text(price.currency), currency)
    return pa.table({"cost": cost, "currency": currency})


class RowPricer:
    """The ``cost`` column of a run's output: ``row_costs`` at ``prices`` in ``region``
    (a ``Costs`` for ``merge_output``); ``describe`` says with what, for its metadata."""

    def __init__(self, prices: PriceTable, region: str) -> None:
        self.prices, self.region = prices, region

    def __call__(self, results: pa.Table) -> pa.Array:
        return row_costs(results, self.prices, self.region).column("cost").combine_chunks()

    def describe(self) -> dict[str, Any]:
        return {
            "currencies": self.prices.currencies(self.region),
            "prices": self.prices.source,
            "region": self.region,
        }


class PriceTable:
    """Prices by model and region. ``lookup`` also finds a dated snapshot's base model
    (``qwen-plus-2025-07-28`` -> ``qwen-plus``) and ``-latest`` aliases."""

    def __init__(
        self,
        prices: Entries,
        *,
        source: str,
        overrides: Entries | None = None,
        text: str | None = None,
    ) -> None:
        self._builtin = prices
        self._overrides = overrides or {}
        #: the price file's text over the built-in table (None: none)
        self.text = text
        self._prices = {
            k: v for k, v in {**prices, **self._overrides}.items() if isinstance(v, Price)
        }
        self.source = source

    @classmethod
    def builtin(cls) -> PriceTable:
        text = resources.files("batchq").joinpath("money/data/prices.toml").read_text("utf-8")
        data = tomllib.loads(text)
        source = f"{data['source']['url']} (checked {data['source']['checked']})"
        return cls(_parse(data, "the built-in price table"), source=source)

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The built-in table, overridden and extended by ``override`` when given."""
        if override is None:
            return cls.builtin()
        try:
            text = override.read_text("utf-8")
        except OSError as e:
            raise UsageError(f"cannot read the price file {override}: {e.strerror}") from None
        return cls.with_text(text, str(override))

    @classmethod
    def with_text(cls, text: str, where: str) -> PriceTable:
        """The built-in table, overridden and extended by a price file's ``text`` (from
        ``where``: a path, or a run's record of it)."""
        table = cls.builtin()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"the price file {where} is not valid TOML: {e}") from None
        return cls(
            table._builtin,
            source=f"{where}, then {table.source}",
            overrides=_parse(data, where),
            text=text,
        )

    @classmethod
    def for_results(cls, override: Path | None, manifest: dict[str, Any] | None) -> PriceTable:
        """``override`` when given; else the price file a job's run was priced with (its
        ``manifest`` records its text), over the built-in table."""
        recorded = (manifest or {}).get("prices")
        if override is not None or not isinstance(recorded, str):
            return cls.load(override)
        return cls.with_text(recorded, "the price file of the run")

    def currencies(self, region: str) -> list[str]:
        """The currencies of the prices that apply in ``region``."""
        return sorted(
            {p.currency for (_, where), p in self._prices.items() if where in (region, "any")}
        )

    def lookup(self, model: str | None, region: str) -> Price | None:
        """``model``'s price in ``region``; None where it has none (``why_unpriced``)."""
        entry = self._entry(model, region)
        return entry if isinstance(entry, Price) else None

    def why_unpriced(self, model: str | None, region: str) -> str:
        """Why ``model`` has no price in ``region``: ``not sold in intl, checked DATE``,
        ``no published price, checked DATE``, or ``unpriced`` (the table does not know it)."""
        entry = self._entry(model, region)
        return entry if isinstance(entry, str) else "unpriced"

    def unpriced_name(self, model: str | None, region: str) -> str:
        """``model`` as a report lists it among the unpriced: with why, where known."""
        why = self.why_unpriced(model, region)
        return str(model) if why == "unpriced" else f"{model} ({why})"

    def _entry(self, model: str | None, region: str) -> Price | str | None:
        """The first entry for ``model`` (its own name, then its base name without a date
        or ``-latest``) in ``region`` or ``any``: a price file's before the built-in one."""
        if not model:
            return None
        for entries in (self._overrides, self._builtin):  # a price file's entry wins
            for name in (model, _SNAPSHOT.sub("", model)):
                for where in (region, "any"):
                    if (entry := entries.get((name, where))) is not None:
                        return entry
        return None


def _parse(data: dict[str, Any], where: str) -> Entries:
    prices: Entries = {}
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise UsageError(f"{where}: [models] must be a table of models")
    for model, regions in models.items():
        if isinstance(regions, dict) and {"tiers", "no_published_price"} & regions.keys():
            # no region: every region
            regions = {"any": regions}
        for region, entry in regions.items():
            if region not in REGIONS:
                raise UsageError(
                    f"{where}: models.{model}.{region}: the region must be one of "
                    f"{', '.join(REGIONS)}"
                )
            prices[model, region] = _entry(model, region, entry, f"{where}: models.{model}")
    return prices


def _entry(model: str, region: str, entry: dict[str, Any], where: str) -> Price | str:
    """A price, or why there is none: ``not_sold = DATE`` (the model is not sold in that
    region), ``no_published_price = DATE`` (no page gives its price), each with the date
    it was checked."""
    for key, reason in (
        ("not_sold", f"not sold in {region}"),
        ("no_published_price", "no published price"),
    ):
        if isinstance(entry, dict) and key in entry:
            return f"{reason}, checked {entry[key]}"
    return _price(model, region, entry, where)


def _price(model: str, region: str, entry: dict[str, Any], where: str) -> Price:
    problem = f"{where}.{region}: each entry needs tiers = [{{ input = …, output = … }}]"
    try:
        tiers = tuple(_tier(t) for t in entry["tiers"])
        price = Price(
            model,
            region,
            str(entry.get("currency", "USD")),
            tiers,
            float(entry.get("cached_input", DEFAULT_CACHED_SHARE)),
            float(entry.get("batch", DEFAULT_BATCH_SHARE)),
            float(entry.get("cached_explicit", DEFAULT_EXPLICIT_SHARE)),
            float(entry.get("cache_creation", DEFAULT_CREATION_SHARE)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{problem} (prices per 1M tokens); problem: {e!r}") from None
    if not tiers:
        raise UsageError(f"{problem}: the list of tiers is empty")
    return price


def _tier(t: dict[str, Any]) -> Tier:
    output = float(t["output"])
    return Tier(
        max_input=t.get("max_input"),
        input=float(t["input"]),
        output=output,
        thinking_output=float(t.get("thinking_output", output)),
    )
