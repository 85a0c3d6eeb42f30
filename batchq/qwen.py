"""Pure: Model Studio's rules for a request body, applied before anything is sent.

From Model Studio's "OpenAI compatible - Chat" reference and its deep-thinking guide
(alibabacloud.com/help/en/model-studio/compatibility-of-openai-with-dashscope and
.../deep-thinking, checked 2026-11-27):

- ranges: ``temperature`` in [0, 2), ``top_p`` in (0, 1], ``presence_penalty`` in
  [-2, 2]; a value outside is refused by the service, so it is refused here, per row;
- the open-source Qwen3 hybrid models (``qwen3-32b``, ``qwen3-235b-a22b`` ...) think by
  default, and the service refuses thinking without streaming: such a request without
  ``stream`` gets ``enable_thinking: false`` unless the job sets it;
- a request that asks for thinking (``enable_thinking: true``) and stream-only models
  (QwQ, QVQ, ``*-thinking``) are sent with ``stream: true`` and assembled.

Each rule that changes a body is said once at the start of the run (``notes``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MODEL_STUDIO", "RangeProblem", "apply_rules"]

MODEL_STUDIO = frozenset({"dashscope", "dashscope-intl"})

#: name: (low, high, low included, high included)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "temperature": (0.0, 2.0, True, False),
    "top_p": (0.0, 1.0, False, True),
    "presence_penalty": (-2.0, 2.0, True, True),
}
_HYBRID = re.compile(r"^qwen3-\d+(\.\d+)?b(-a\d+(\.\d+)?b)?$")
_STREAM_ONLY = re.compile(r"^(qwq|qvq)-|-thinking(-\d{4}(-\d{2}-\d{2})?)?$")


class RangeProblem(ValueError):
    """A parameter outside the range Model Studio accepts. ``name`` is the parameter."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def apply_rules(body: dict[str, Any], notes: set[str] | None = None) -> None:
    """Check ``body``'s ranges (RangeProblem) and apply the thinking / streaming rules to
    it in place, adding what was done to ``notes``."""
    for name, bounds in RANGES.items():
        if name in body:
            _check_range(name, body[name], *bounds)
    model = str(body.get("model", ""))
    if body.get("stream"):
        return
    if _STREAM_ONLY.search(model):
        body["stream"] = True
        _note(notes, f"{model} answers only streamed: its requests are sent with stream "
                     "and assembled")  # fmt: skip
    elif body.get("enable_thinking") is True:
        body["stream"] = True
        _note(notes, f"{model} with enable_thinking: thinking is served only streamed, so "
                     "requests are sent with stream and assembled")  # fmt: skip
    elif _HYBRID.match(model) and "enable_thinking" not in body:
        body["enable_thinking"] = False
        _note(notes, f"{model} is a Qwen3 hybrid model called without streaming: sent with "
                     "enable_thinking false (set enable_thinking = true to think)")  # fmt: skip


def _check_range(
    name: str, value: Any, low: float, high: float, low_in: bool, high_in: bool
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RangeProblem(name, f"{name} must be a number, not {value!r}")
    too_low = value < low if low_in else value <= low
    too_high = value > high if high_in else value >= high
    if too_low or too_high:
        shown = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
        raise RangeProblem(
            name, f"{name} = {value!r} is outside {shown}, the range Model Studio accepts"
        )


def _note(notes: set[str] | None, text: str) -> None:
    if notes is not None:
        notes.add(text)
