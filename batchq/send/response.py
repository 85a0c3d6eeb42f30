"""Pure: a chat/completions response -> the result columns of one output row.

A response is a JSON body, or with ``stream: true`` a series of server-sent events whose
chunks are assembled into the same completion: content and ``reasoning_content`` are
concatenated per choice, tool-call deltas are merged by their index into whole calls,
and the usage comes from the final chunk (``stream_options.include_usage``).

Only OpenAI's fields are read; anything a server adds (llama.cpp's ``timings``) is ignored.
A response that is not a valid completion raises :class:`InvalidCompletion`, which the
client treats as a retryable fault (a proxy truncated it, a stream was cut off mid-way, a
server returned an HTML page ...).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "InvalidCompletion",
    "Stream",
    "assemble_stream",
    "completion_columns",
    "parse_completion",
    "parse_error_body",
]


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
    return completion_columns(data)


def completion_columns(data: dict[str, Any]) -> dict[str, Any]:
    """Result columns from a completion object (``status`` and timing are the caller's)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidCompletion("the body has no choices")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise InvalidCompletion("choices[0] has no message")
    usage = _dict(data.get("usage"))
    tool_calls = message.get("tool_calls")
    content = _str_or_none(message.get("content"))
    result: dict[str, Any] = {
        # A call with no text beside it (llama.cpp sends "", others null): null, as the
        # same answer streamed assembles.
        "response": None if tool_calls and not content else content,
        "reasoning": _str_or_none(message.get("reasoning_content")),
        "tool_calls": orjson.dumps(tool_calls).decode() if tool_calls else None,
        "finish_reason": _str_or_none(first.get("finish_reason")),
        "response_model": _str_or_none(data.get("model")),
        "prompt_tokens": _int(usage.get("prompt_tokens")),
        "completion_tokens": _int(usage.get("completion_tokens")),
        "total_tokens": _int(usage.get("total_tokens")),
        "cached_tokens": _int(_get(usage, "prompt_tokens_details", "cached_tokens")),
        "cache_creation_tokens": _cache_creation(_dict(usage.get("prompt_tokens_details"))),
        "reasoning_tokens": _int(_get(usage, "completion_tokens_details", "reasoning_tokens")),
        "request_id": _str_or_none(data.get("id")),
    }
    if len(choices) > 1:
        result["choices"] = [_choice_text(c) for c in choices]
    return result


def _cache_creation(details: dict[str, Any]) -> int | None:
    """Tokens written to an explicit cache (Model Studio: ``cache_creation_input_tokens``,
    or ``cache_creation.ephemeral_5m_input_tokens``); 0 for a request that used the
    explicit cache without writing to it (``cache_type: "ephemeral"``); None for the
    implicit cache, or none: its cached tokens are then implicit-cache hits."""
    created = _int(details.get("cache_creation_input_tokens"))
    if created is None:
        created = _int(_get(details, "cache_creation", "ephemeral_5m_input_tokens"))
    if created is None and details.get("cache_type") == "ephemeral":
        return 0
    return created


def assemble_stream(raw: bytes) -> dict[str, Any]:
    """The completion object the SSE chunks in ``raw`` add up to (see :class:`Stream`)."""
    stream = Stream()
    for line in raw.splitlines():
        stream.feed(line)
    return stream.completion()


class Stream:
    """Assembles a streamed completion line by line, as the lines arrive."""

    def __init__(self) -> None:
        self._choices: dict[int, dict[str, Any]] = {}
        self._head: dict[str, Any] = {}
        self._done = False
        self._error: str | None = None
        self.tokens_seen = False

    def feed(self, line: bytes) -> bool:
        """Take one line; True when it carried the first token (content, reasoning or a
        tool call) of the stream."""
        if not line.startswith(b"data:") or self._error is not None:
            return False  # comments, event names, keep-alives
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self._done = True
            return False
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._error = "a stream chunk is not JSON (cut off mid-way?)"
            return False
        if not isinstance(chunk, dict) or "error" in chunk:
            self._error = f"the stream sent an error: {_error_text(chunk)}"
            return False
        for key in ("id", "model", "usage"):
            if chunk.get(key) is not None:
                self._head[key] = chunk[key]
        first = False
        for delta in chunk.get("choices") or ():
            choice = self._choices.setdefault(delta.get("index", 0), _empty_choice())
            if _merge_delta(choice, delta) and not self.tokens_seen:
                self.tokens_seen = first = True
        return first

    def completion(self) -> dict[str, Any]:
        """The whole completion. Raises InvalidCompletion for a stream cut off before its
        end (no ``[DONE]`` and a choice without finish_reason) or an error sent mid-stream."""
        if self._error is not None:
            raise InvalidCompletion(self._error)
        if not self._choices:
            raise InvalidCompletion("the stream ended without a choice")
        finished = all(c["finish_reason"] is not None for c in self._choices.values())
        if not (self._done or finished):
            raise InvalidCompletion("the stream was cut off before its end")
        choices = [_whole_choice(self._choices[i]) for i in sorted(self._choices)]
        return {**self._head, "choices": choices}


def _empty_choice() -> dict[str, Any]:
    return {"content": [], "reasoning": [], "tool_calls": {}, "finish_reason": None}


def _merge_delta(choice: dict[str, Any], delta: dict[str, Any]) -> bool:
    """Add one choice delta; True when it carried a token."""
    message = _dict(delta.get("delta"))
    token = False
    for key, parts in (("content", choice["content"]), ("reasoning_content", choice["reasoning"])):
        if isinstance(message.get(key), str) and message[key]:
            parts.append(message[key])
            token = True
    for call in message.get("tool_calls") or ():
        token = True
        whole = choice["tool_calls"].setdefault(
            call.get("index", 0), {"id": None, "type": "function", "function": {}}
        )
        for key in ("id", "type"):
            if call.get(key):
                whole[key] = call[key]
        function = _dict(call.get("function"))
        if function.get("name"):
            whole["function"]["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            whole["function"]["arguments"] = (
                whole["function"].get("arguments", "") + function["arguments"]
            )
    if delta.get("finish_reason"):
        choice["finish_reason"] = delta["finish_reason"]
    return token


def _whole_choice(choice: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(choice["content"])}
    if choice["reasoning"]:
        message["reasoning_content"] = "".join(choice["reasoning"])
    if choice["tool_calls"]:
        message["tool_calls"] = [choice["tool_calls"][i] for i in sorted(choice["tool_calls"])]
        if not message["content"]:
            message["content"] = None
    return {"message": message, "finish_reason": choice["finish_reason"]}


def _error_text(chunk: Any) -> str:
    error = _dict(chunk).get("error")
    return str(_dict(error).get("message") or error or chunk)[:300]


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
