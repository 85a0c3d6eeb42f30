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

import functools
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


_ABSENT = object()  # a field the body does not set


def apply_rules(body: dict[str, Any], notes: set[str] | None = None) -> None:
    """Check ``body``'s ranges (RangeProblem) and apply the thinking / streaming rules to
    it in place, adding what was done to ``notes``.

    The decision depends on a few fields only, and all rows of a job usually share them,
    so it is made once per combination (this runs on every row)."""
    # With each value its type: True == 1 == 1.0 as keys, but not as parameters.
    values = [body.get(name, _ABSENT) for name in ("stream", "enable_thinking", *RANGES)]
    key = (body.get("model"), *((v, type(v)) for v in values))
    try:
        problem, updates, note = _decide(key)
    except TypeError:  # an unhashable value (a list where a number belongs): decide afresh
        problem, updates, note = _decide.__wrapped__(key)
    if problem is not None:
        raise RangeProblem(*problem)
    body.update(updates)
    if note is not None and notes is not None:
        notes.add(note)


Decision = tuple[tuple[str, str] | None, dict[str, Any], str | None]


@functools.lru_cache(maxsize=1024)
def _decide(key: tuple[Any, ...]) -> Decision:
    """(range problem, fields to set, note) for a body with these rule-deciding fields."""
    model, (stream, _), (thinking, _), *typed = key
    values = [value for value, _ in typed]
    for (name, bounds), value in zip(RANGES.items(), values, strict=True):
        if value is not _ABSENT and (problem := _range_problem(name, value, *bounds)):
            return (name, problem), {}, None
    model = str(model or "")
    if stream not in (_ABSENT, None, False):
        return None, {}, None
    if _STREAM_ONLY.search(model):
        note = f"{model} answers only streamed: its requests are sent with stream and assembled"
        return None, {"stream": True}, note
    if thinking is True:
        return (
            None,
            {"stream": True},
            (
                f"{model} with enable_thinking: thinking is served only streamed, so requests "
                "are sent with stream and assembled"
            ),
        )
    if _HYBRID.match(model) and thinking is _ABSENT:
        return (
            None,
            {"enable_thinking": False},
            (
                f"{model} is a Qwen3 hybrid model called without streaming: sent with "
                "enable_thinking false (set enable_thinking = true to think)"
            ),
        )
    return None, {}, None


def _range_problem(
    name: str, value: Any, low: float, high: float, low_in: bool, high_in: bool
) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number, not {value!r}"
    too_low = value < low if low_in else value <= low
    too_high = value > high if high_in else value >= high
    if too_low or too_high:
        shown = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
        return f"{name} = {value!r} is outside {shown}, the range Model Studio accepts"
    return None
