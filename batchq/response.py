"""Pure: a chat/completions response body -> the result columns of one output row.

Only OpenAI's fields are read; anything a server adds (llama.cpp's ``timings``) is ignored.
A body that is not a valid completion raises :class:`InvalidCompletion`, which the client
treats as a retryable fault (a proxy truncated it, a server returned an HTML page ...).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["InvalidCompletion", "parse_completion", "parse_error_body"]


class InvalidCompletion(ValueError):
    """A 200 whose body is not JSON, or has no ``choices[0].message``."""


def parse_completion(raw: bytes) -> dict[str, Any]:
    """Result columns from a completion body (``status`` and timing are the caller's)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidCompletion(f"the body is not JSON ({len(raw)} bytes)") from None
    if not isinstance(data, dict):
        raise InvalidCompletion("the body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidCompletion("the body has no choices")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise InvalidCompletion("choices[0] has no message")
    usage = _dict(data.get("usage"))
    tool_calls = message.get("tool_calls")
    result: dict[str, Any] = {
        "response": _str_or_none(message.get("content")),
        "reasoning": _str_or_none(message.get("reasoning_content")),
        "tool_calls": orjson.dumps(tool_calls).decode() if tool_calls else None,
        "finish_reason": _str_or_none(first.get("finish_reason")),
        "response_model": _str_or_none(data.get("model")),
        "prompt_tokens": _int(usage.get("prompt_tokens")),
        "completion_tokens": _int(usage.get("completion_tokens")),
        "total_tokens": _int(usage.get("total_tokens")),
        "cached_tokens": _int(_get(usage, "prompt_tokens_details", "cached_tokens")),
        "reasoning_tokens": _int(_get(usage, "completion_tokens_details", "reasoning_tokens")),
        "request_id": _str_or_none(data.get("id")),
    }
    if len(choices) > 1:
        result["choices"] = [_choice_text(c) for c in choices]
    return result


def parse_error_body(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """``(type, code, message)`` from an error body: OpenAI's ``{"error": {...}}`` or
    DashScope's native ``{"code", "message"}``; ``(None, None, text)`` when it is neither."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:300].decode("utf-8", "replace").strip()
        return None, None, text or None
    if isinstance(data, dict):
        err = _dict(data.get("error")) or data
        return (
            _str_or_none(err.get("type")),
            _str_or_none(err.get("code")),
            _str_or_none(err.get("message")),
        )
    return None, None, None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _choice_text(choice: Any) -> str | None:
    message = choice.get("message") if isinstance(choice, dict) else None
    return _str_or_none(message.get("content")) if isinstance(message, dict) else None


def _get(mapping: dict[str, Any], *keys: str) -> Any:
    value: Any = mapping
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _str_or_none(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
