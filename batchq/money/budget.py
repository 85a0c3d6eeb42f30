"""``--max-cost``: no request starts that could take the run's spend past the cap.

    spent (earlier runs + this one, as billed) + the worst case of each request in flight
        + this request's worst case  <=  cap

A request's worst case is its prompt bound plus its ``max_tokens`` for each of its ``n``
choices (without ``max_tokens``, the model's maximum output, MAX_OUTPUT) at its tier's
dearer output price. The prompt bound holds for any script: a token per UTF-8 byte of
its text (a CJK tokenizer makes about a token a character, three bytes; English about
four characters a token), until ``LEARN_N`` answers have shown how many tokens a byte
the job's prompts make: then MARGIN times the most any answer showed. Once a request
settles, its real cost (from the usage it reports) replaces its worst case; one whose
answer never came (a dropped connection, a cancel) stays at its worst, counted apart as
*lost*. A request that does not fit waits for those in flight to settle; when none is in
flight and it still does not fit, the run stops (RunStopped, exit 3) saying what was
billed, at most how much more the lost answers cost, and of what cap; from then on no
request starts, however cheap (other workers may not have stopped yet).

``fits`` is the same test for a batch's line before it is uploaded (at the Batch API's
share of the price).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from batchq.errors import RunStopped, UsageError
from batchq.money.pricing import Price, PriceTable

__all__ = ["MAX_OUTPUT", "Budget", "Hold", "Spend"]

#: Output tokens a request without ``max_tokens`` is counted at: the largest maximum
#: output of the Qwen models on Model Studio's model list (qwen3-max, qwen-plus in
#: thinking mode: 32,768 to 81,920 by snapshot), rounded to a round figure of the
#: commercial models' non-thinking limit. Set ``max_tokens`` for a tighter budget.
MAX_OUTPUT = 32_768
#: Answers seen before the prompt bound is learned from them, and the margin over the
#: most tokens a byte any of them showed.
LEARN_N, MARGIN = 8, 1.5


@dataclass
class Hold:
    """One request's place in the budget: its worst case, its price (to settle), and its
    prompt's bytes (to learn the job's tokens a byte)."""

    worst: float
    price: Price
    prompt_bytes: int = 0


class Spend(Protocol):
    """What a sender asks of the run's budget: a :class:`Budget`, or one held elsewhere
    for many processes (the Ray engine's pacing actor)."""

    async def reserve(
        self,
        price: Price,
        prompt_tokens: int,
        max_completion: int | None,
        *,
        choices: int = 1,
        prompt_bytes: int = 0,
    ) -> Hold:
        """Wait until a request of this worst case fits; its hold (RunStopped: never)."""

    def settle(self, hold: Hold, usage: dict[str, Any] | None) -> None:
        """``hold``'s request is over (``usage``: what it was billed; None: not known)."""


class Budget:
    """The run's spend against ``cap``; shared by every worker of one event loop."""

    def __init__(self, cap: float, spent: float, currency: str) -> None:
        self.cap, self.currency = cap, currency
        self.billed = spent  # as the answers' usage says (earlier runs: as their rows say)
        self.lost = 0.0  # worst cases of requests whose answers never came
        self.lost_requests = 0
        self.in_flight = 0.0
        self._holds = 0
        self._settled = anyio.Event()
        self._per_byte: list[float] = []  # tokens a byte, as answers showed (LEARN_N kept)
        self._most_per_byte = 0.0
        self._stop: str | None = None  # the stop message, once the budget stopped the run

    @property
    def spent(self) -> float:
        """Billed, and at most what the lost answers cost."""
        return self.billed + self.lost

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
                raise UsageError(
                    f"--max-cost needs a price for every model, and {model!r} "
                    f"has none in the price table ({region}: "
                    f"{prices.why_unpriced(model, region)}): give its prices "
                    "with --prices FILE"
                )
            found[model] = price
        currencies = sorted({p.currency for p in found.values()})
        if len(currencies) > 1:
            raise UsageError(
                f"--max-cost is one amount, and these models are priced in "
                f"{' and '.join(currencies)}: run them as separate jobs"
            )
        return (currencies[0] if currencies else "USD"), found

    def worst(
        self,
        price: Price,
        prompt_tokens: int,
        max_completion: int | None,
        *,
        choices: int = 1,
        prompt_bytes: int = 0,
        batch: bool = False,
    ) -> float:
        """The most a request can cost (see the module doc)."""
        per_byte = min(1.0, MARGIN * self._most_per_byte) if self._learned else 1.0
        prompt = max(prompt_tokens, math.ceil(prompt_bytes * per_byte))
        output = (max_completion if max_completion is not None else MAX_OUTPUT) * choices
        return max(
            price.cost(prompt, output, batch=batch),
            price.cost(prompt, output, thinking=True, batch=batch),
        )

    @property
    def _learned(self) -> bool:
        return len(self._per_byte) >= LEARN_N

    def fits(self, worst: float) -> bool:
        """Whether a request of ``worst`` case fits now, beside what is in flight."""
        return self.spent + self.in_flight + worst <= self.cap

    async def reserve(
        self,
        price: Price,
        prompt_tokens: int,
        max_completion: int | None,
        *,
        choices: int = 1,
        prompt_bytes: int = 0,
    ) -> Hold:
        """Wait until a request of this worst case fits; its hold. RunStopped when none is
        in flight and it still does not fit."""
        while True:
            if self._stop is not None:  # stopped already: no request more, however cheap
                raise RunStopped(self._stop)
            worst = self.worst(
                price, prompt_tokens, max_completion, choices=choices, prompt_bytes=prompt_bytes
            )
            if self.fits(worst):
                break
            if self._holds == 0:
                self._stop = self.stopped(worst)
                raise RunStopped(self._stop)
            await self._settled.wait()
        self.in_flight += worst
        self._holds += 1
        return Hold(worst, price, prompt_bytes)

    def stopped(self, worst: float) -> str:
        """The stop message: billed, at most what lost answers cost, the cap, the next."""
        lost = (
            f" (and at most {_money(self.lost, self.currency)} more for "
            f"{self.lost_requests:,} requests whose answers were lost)"
            if self.lost_requests
            else ""
        )
        return (
            f"the run stopped at its budget: {_money(self.billed, self.currency)} billed "
            f"so far{lost}, of --max-cost {_money(self.cap, self.currency)}, and the next "
            f"request could cost up to {_money(worst, self.currency)}; finished rows are "
            "saved: rerun with a higher --max-cost to go on"
        )

    def settle(self, hold: Hold, usage: dict[str, Any] | None) -> None:
        """``hold``'s request is over: its real cost (from ``usage``, the answer's result
        columns; none: nothing billed) replaces its worst case. A request whose answer
        never came (``usage`` is None: it may have been billed) counts at its worst."""
        self.in_flight -= hold.worst
        self._holds -= 1
        if usage is None:
            self.lost += hold.worst
            self.lost_requests += 1
        else:
            self.billed += _cost(hold.price, usage)
            self._learn(hold.prompt_bytes, usage.get("prompt_tokens"))
        self._settled.set()
        self._settled = anyio.Event()

    def _learn(self, prompt_bytes: int, prompt_tokens: Any) -> None:
        if prompt_bytes and isinstance(prompt_tokens, int) and prompt_tokens > 0:
            ratio = prompt_tokens / prompt_bytes
            self._most_per_byte = max(self._most_per_byte, ratio)
            if not self._learned:
                self._per_byte.append(ratio)

    def text(self) -> str:
        """Spend against the cap, for the progress display."""
        return f"{_money(self.spent, self.currency)} of {_money(self.cap, self.currency)}"


def _cost(price: Price, usage: dict[str, Any]) -> float:
    thinking = bool(usage.get("reasoning_tokens")) or usage.get("reasoning") is not None
    prompt, completion = (int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens"))
    cached = int(usage.get("cached_tokens") or 0)
    created = usage.get("cache_creation_tokens")
    return price.cost(
        prompt,
        completion,
        cached=cached,
        thinking=thinking,
        created=None if created is None else int(created),
    )


def _money(amount: float, currency: str) -> str:
    symbol = {"USD": "$", "CNY": "¥"}.get(currency)
    figure = f"{amount:,.4f}" if amount >= 0.01 or amount == 0 else f"{amount:.3g}"
    return f"{symbol}{figure}" if symbol else f"{figure} {currency}"
