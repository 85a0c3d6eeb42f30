"""What the simulator billed: every request it answered or refused, live or as a line of a
batch, with the usage it charged (none for a refusal). Tests hold batchq's reports to
it: a job's spend, its cost column and its counts are this ledger, priced.

A completion is billed whole: its prompt, and every choice's output (``n`` of them), as
its usage says; a request refused (4xx, 5xx, a dropped connection, a 200 that is no
completion) is billed nothing. A completion cut short on the wire (``truncate``) was
generated, so it is billed."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Ledger", "Line"]


@dataclass(frozen=True, slots=True)
class Line:
    """One request: live or batch, its model, the status answered (0: dropped), the reply
    it was for (the row's key), and what it was billed."""

    via: str
    model: str
    status: int
    reply: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass
class Ledger:
    lines: list[Line] = field(default_factory=list)

    def add(
        self,
        via: str,
        body: dict[str, Any],
        status: int,
        reply: str,
        usage: dict[str, Any] | None = None,
    ) -> None:
        usage = usage or {}
        details = usage.get("completion_tokens_details") or {}
        self.lines.append(
            Line(
                via,
                str(body.get("model")),
                status,
                reply,
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                int(details.get("reasoning_tokens") or 0),
            )
        )

    def report(self) -> dict[str, Any]:
        """Totals by (via, model) of requests, billed requests and tokens, and every line."""
        totals: dict[str, Counter[str]] = {}
        for line in self.lines:
            total = totals.setdefault(f"{line.via} {line.model}", Counter())
            total["requests"] += 1
            total["billed"] += line.prompt_tokens > 0
            total["prompt_tokens"] += line.prompt_tokens
            total["completion_tokens"] += line.completion_tokens
            total["reasoning_tokens"] += line.reasoning_tokens
        return {
            "totals": {k: dict(v) for k, v in totals.items()},
            "lines": [asdict(line) for line in self.lines],
        }
