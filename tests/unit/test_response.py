from __future__ import annotations

import orjson
import pytest

from batchq.send.response import InvalidCompletion, parse_completion, parse_error_body


def completion(**extra: object) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "model": "qwen-plus-2025-01-25",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "positive",
                    "reasoning_content": "thinking...",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 3,
            "total_tokens": 23,
            "prompt_tokens_details": {"cached_tokens": 16},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
        "timings": {"predicted_ms": 1.0},  # llama.cpp's extra field, ignored
    }
    body.update(extra)
    return orjson.dumps(body)


def test_every_column_is_read() -> None:
    result = parse_completion(completion())
    assert result == {
        "response": "positive",
        "reasoning": "thinking...",
        "tool_calls": None,
        "finish_reason": "stop",
        "response_model": "qwen-plus-2025-01-25",
        "prompt_tokens": 20,
        "completion_tokens": 3,
        "total_tokens": 23,
        "cached_tokens": 16,
        "reasoning_tokens": 2,
        "cache_creation_tokens": None,  # the implicit cache
        "request_id": "chatcmpl-1",
    }


def test_an_explicit_caches_creation_and_hits_are_read() -> None:
    """Model Studio's explicit cache: the tokens written, or 0 for a hit that wrote none
    (``cache_type: ephemeral``): its hits are then priced at the explicit share."""
    for details, created in (
        (
            {
                "cached_tokens": 0,
                "cache_creation_input_tokens": 1200,
                "cache_type": "ephemeral",
                "cache_creation": {"ephemeral_5m_input_tokens": 1200},
            },
            1200,
        ),
        ({"cached_tokens": 0, "cache_creation": {"ephemeral_5m_input_tokens": 900}}, 900),
        ({"cached_tokens": 1200, "cache_type": "ephemeral"}, 0),
        ({"cached_tokens": 1200}, None),
    ):
        raw = orjson.loads(completion())
        raw["usage"]["prompt_tokens_details"] = details
        assert parse_completion(orjson.dumps(raw))["cache_creation_tokens"] == created


def test_tool_calls_are_kept_as_json() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    raw = completion(
        choices=[
            {
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ]
    )
    result = parse_completion(raw)
    assert orjson.loads(result["tool_calls"]) == calls
    assert result["response"] is None


def test_all_choices_are_kept_when_n_is_above_one() -> None:
    choices = [{"message": {"role": "assistant", "content": t}} for t in ("a", "b")]
    assert parse_completion(completion(choices=choices))["choices"] == ["a", "b"]


def test_missing_usage_details_are_null() -> None:
    result = parse_completion(completion(usage={"prompt_tokens": 1}))
    assert result["cached_tokens"] is None
    assert result["completion_tokens"] is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"choices": [{"message": {"con',
        b"<html>502</html>",
        b"[]",
        b'{"choices": []}',
        b'{"id": "x"}',
        b'{"choices": [{"text": "legacy"}]}',
    ],
)
def test_a_body_that_is_not_a_completion_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidCompletion):
        parse_completion(raw)


def test_error_bodies_openai_and_dashscope() -> None:
    openai = b'{"error": {"message": "slow down", "type": "limit_requests", '
    openai += b'"code": "limit_requests"}}'
    assert parse_error_body(openai) == ("limit_requests", "limit_requests", "slow down")
    native = b'{"code": "Throttling", "message": "Requests throttled", "request_id": "x"}'
    assert parse_error_body(native) == (None, "Throttling", "Requests throttled")
    assert parse_error_body(b"Bad Gateway") == (None, None, "Bad Gateway")
