"""``--max-cost``: no request starts that could take the run's spend past the cap.

    spent (earlier runs + this one, as billed) + the worst case of each request in flight
        + this request's worst case  <=  cap

A request's worst case is its prompt estimate plus its ``max_tokens`` (without one, the
model's maximum output, MAX_OUTPUT) at its tier's dearer output price; once it settles,
its real cost (from the usage it reports) replaces that. A request that does not fit
waits for those in flight to settle; when none is in flight and it still does not fit,
the run stops (RunStopped, exit 3) saying what was spent, of what cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from batchq.errors import RunStopped, UsageError
from batchq.money.pricing import Price, PriceTable

__all__ = ["MAX_OUTPUT", "Budget", "Hold"]

#: Output tokens a request without ``max_tokens`` is counted at: the largest maximum
#: output of the Qwen models on Model Studio's model list (qwen3-max, qwen-plus in
#: thinking mode: 32,768 to 81,920 by snapshot), rounded to a round figure of the
#: commercial models' non-thinking limit. Set ``max_tokens`` for a tighter budget.
MAX_OUTPUT = 32_768


@dataclass
class Hold:
    """One request's place in the budget: its worst case, and its price (to settle)."""

    worst: float
    price: Price


class Budget:
    """The run's spend against ``cap``; shared by every worker of one event loop."""

    def __init__(self, cap: float, spent: float, currency: str) -> None:
        self.cap, self.spent, self.currency = cap, spent, currency
        self.in_flight = 0.0
        self._holds = 0
        self._settled = anyio.Event()

    @classmethod
    def check(
        cls, models: set[str], prices: PriceTable, region: str
    ) -> tuple[str, dict[str, Price]]:
        """The currency of ``models``' prices and each one's price; UsageError (before
        anything is sent) for a model without a price, or prices in two currencies."""
        found: dict[str, Price] = {}
        for model in sorted(models):
            price = prices.lookup(model, region)
            if price is None:
                raise UsageError(f"--max-cost needs a price for every model, and {model!r} "
                                 f"has none in the price table ({region}: "
                                 f"{prices.why_unpriced(model, region)}): give its prices "
                                 "with --prices FILE")  # fmt: skip
            found[model] = price
        currencies = sorted({p.currency for p in found.values()})
        if len(currencies) > 1:
            raise UsageError(f"--max-cost is one amount, and these models are priced in "
                             f"{' and '.join(currencies)}: run them as separate jobs")  # fmt: skip
        return (currencies[0] if currencies else "USD"), found

    async def reserve(self, price: Price, prompt_tokens: int, max_completion: int | None) -> Hold:
        """Wait until a request of this worst case fits; its hold. RunStopped when none is
        in flight and it still does not fit."""
        output = max_completion if max_completion is not None else MAX_OUTPUT
        worst = max(price.cost(prompt_tokens, output),
                    price.cost(prompt_tokens, output, thinking=True))  # fmt: skip
        while self.spent + self.in_flight + worst > self.cap:
            if self._holds == 0:
                raise RunStopped(
                    f"the run stopped at its budget: {_money(self.spent, self.currency)} spent "
                    f"of --max-cost {_money(self.cap, self.currency)}, and the next request "
                    f"could cost up to {_money(worst, self.currency)}; finished rows are "
                    "saved: rerun with a higher --max-cost to go on"
                )
            await self._settled.wait()
        self.in_flight += worst
        self._holds += 1
        return Hold(worst, price)

    def settle(self, hold: Hold, usage: dict[str, Any] | None) -> None:
        """``hold``'s request is over: its real cost (from ``usage``, the answer's result
        columns; none: nothing billed) replaces its worst case. A request cancelled in
        flight (``usage`` is None and it may have been billed) counts at its worst."""
        self.in_flight -= hold.worst
        self._holds -= 1
        self.spent += hold.worst if usage is None else _cost(hold.price, usage)
        self._settled.set()
        self._settled = anyio.Event()

    def text(self) -> str:
        """Spend against the cap, for the progress display."""
        return f"{_money(self.spent, self.currency)} of {_money(self.cap, self.currency)}"


def _cost(price: Price, usage: dict[str, Any]) -> float:
    thinking = bool(usage.get("reasoning_tokens")) or usage.get("reasoning") is not None
    prompt, completion = (int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens"))
    cached = int(usage.get("cached_tokens") or 0)
    created = usage.get("cache_creation_tokens")
    return price.cost(prompt, completion, cached=cached, thinking=thinking,
                      created=None if created is None else int(created))  # fmt: skip


def _money(amount: float, currency: str) -> str:
    symbol = {"USD": "$", "CNY": "¥"}.get(currency)
    figure = f"{amount:,.4f}" if amount >= 0.01 or amount == 0 else f"{amount:.3g}"
    return f"{symbol}{figure}" if symbol else f"{figure} {currency}"
