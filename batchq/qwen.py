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
  (QwQ, QVQ, ``*-thinking``) are sent with ``stream: true`` and assembled;
- ``n``: "the value must be 1 when the tools parameter is passed", so ``n`` above 1
  with ``tools`` is refused here; the reference lists ``n`` above 1 for qwen-plus and
  Qwen3 in non-thinking mode only, so on another model it is said once (the service
  may refuse it).

The rules apply wherever the endpoint is Model Studio (``serves_model_studio``): the
``dashscope*`` presets, a base URL on an ``aliyuncs.com`` host, or one whose path holds
``/compatible-mode/`` (workspace URLs, gateways). Each rule that changes a body, or
warns about it, is said once at the start of the run (``notes``).
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MODEL_STUDIO", "RangeProblem", "apply_rules", "serves_model_studio"]

MODEL_STUDIO = frozenset({"dashscope", "dashscope-intl"})


def serves_model_studio(provider: str, base_url: str | None) -> bool:
    """Whether requests go to Model Studio: a ``dashscope*`` preset, or a base URL on an
    ``aliyuncs.com`` host or with ``/compatible-mode/`` in its path.

    >>> serves_model_studio("custom", "https://ws-1.ap-southeast-1.maas.aliyuncs.com/v1")
    True
    """
    if provider in MODEL_STUDIO:
        return True
    if not base_url:
        return False
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    return (
        host == "aliyuncs.com"
        or host.endswith(".aliyuncs.com")
        or ("/compatible-mode/" in parts.path + "/")
    )


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
    values = [body.get(name, _ABSENT) for name in ("stream", "enable_thinking", "n", *RANGES)]
    key = (body.get("model"), bool(body.get("tools")), *((v, type(v)) for v in values))
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
    model, tools, (stream, _), (thinking, _), (n, _), *typed = key
    values = [value for value, _ in typed]
    for (name, bounds), value in zip(RANGES.items(), values, strict=True):
        if value is not _ABSENT and (problem := _range_problem(name, value, *bounds)):
            return (name, problem), {}, None
    model = str(model or "")
    many = isinstance(n, int) and not isinstance(n, bool) and n > 1
    if many and tools:
        return (
            (
                "n",
                f"n = {n} with tools: Model Studio takes n = 1 only when tools are "
                "given; drop n, or the tools",
            ),
            {},
            None,
        )
    refused, updates, note = _thinking(model, stream, thinking)
    if many and not _takes_n(model, updates.get("enable_thinking", thinking)):
        warning = (
            f"{model} with n = {n}: Model Studio lists n above 1 for qwen-plus and "
            "Qwen3 in non-thinking mode only; the service may refuse it"
        )
        note = f"{note}; {warning}" if note else warning
    return refused, updates, note


def _takes_n(model: str, thinking: Any) -> bool:
    """Whether Model Studio's reference lists ``n`` above 1 for this model."""
    if model.startswith("qwen-plus"):
        return True
    return model.startswith("qwen3") and (thinking is False or "instruct" in model)


def _thinking(model: str, stream: Any, thinking: Any) -> Decision:
    """The streaming and thinking rules."""
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
