"""The Batch API's limits, per provider (SPEC "The Batch API, end to end").

Both providers take one model a file and at most 50,000 lines. OpenAI: 200 MB a file and
a ``completion_window`` of ``24h`` only (platform.openai.com/docs/api-reference/batch/create,
as quoted by its SDKs' docs, read 2026-12-03). Model Studio: 500 MB a file, a window of
``24h`` to ``336h`` (or ``1d`` to ``14d``), the same wire API under ``compatible-mode/v1``
at half the live price (alibabacloud.com/help/en/model-studio/
batch-interfaces-compatible-with-openai, updated 2026-01-30). Model Studio's rules apply
wherever the Qwen rules do (``batchq.qwen.serves_model_studio``); every other endpoint
gets OpenAI's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchq.errors import UsageError

__all__ = ["MODEL_STUDIO", "OPENAI", "BatchRules", "window_hours"]


@dataclass(frozen=True)
class BatchRules:
    name: str
    max_bytes: int
    max_hours: int
    max_lines: int = 50_000
    min_hours: int = 24


OPENAI = BatchRules("OpenAI", max_bytes=200 * 1024**2, max_hours=24)
MODEL_STUDIO = BatchRules("Model Studio", max_bytes=500 * 1024**2, max_hours=336)

_WINDOW = re.compile(r"^(\d+)([hd])$")


def window_hours(window: str, rules: BatchRules) -> int:
    """The hours of a ``completion_window`` such as ``24h`` or ``3d``; UsageError (exit 2)
    for one the provider does not take."""
    found = _WINDOW.match(window.strip())
    hours = int(found.group(1)) * (24 if found.group(2) == "d" else 1) if found else -1
    if not rules.min_hours <= hours <= rules.max_hours:
        days = rules.max_hours // 24
        allowed = "24h" if days == 1 else f"24h to {rules.max_hours}h (or 1d to {days}d)"
        raise UsageError(
            f"--window {window!r} is not a completion window {rules.name} takes: give {allowed}"
        )
    return hours
