"""Assembling a streamed completion from its server-sent events."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchq.send.response import InvalidCompletion, Stream, assemble_stream, completion_columns


def sse(*chunks: Any, done: bool = True) -> bytes:
    lines = [b": keep-alive", b"event: message"]  # comments and event names are skipped
    lines += [b"data: " + orjson.dumps(c) for c in chunks]
    if done:
        lines.append(b"data: [DONE]")
    return b"\n\n".join(lines) + b"\n\n"


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": "c9",
        "model": "qwq-plus",
        "choices": [{"index": index, "delta": fields, "finish_reason": finish}],
    }


USAGE = {"id": "c9", "choices": [], "usage": {
    "prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17,
    "completion_tokens_details": {"reasoning_tokens": 4}}}  # fmt: skip


def test_content_reasoning_and_usage_are_put_together() -> None:
    raw = sse(
        delta(role="assistant", content=""),
        delta(reasoning_content="Let me"),
        delta(reasoning_content=" think."),
        delta(content="posi"),
        delta(content="tive"),
        delta(finish="stop"),
        USAGE,
    )
    columns = completion_columns(assemble_stream(raw))
    assert columns["response"] == "positive"
    assert columns["reasoning"] == "Let me think."
    assert columns["finish_reason"] == "stop"
    assert columns["request_id"] == "c9"
    assert columns["response_model"] == "qwq-plus"
    assert (columns["prompt_tokens"], columns["completion_tokens"]) == (10, 7)
    assert columns["reasoning_tokens"] == 4


def test_tool_call_deltas_merge_into_whole_calls() -> None:
    raw = sse(
        delta(role="assistant", content=None),
        delta(
            tool_calls=[
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        ),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        delta(tool_calls=[{"index": 1, "id": "call_b", "function": {"name": "get_time"}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '"Hangzhou"}'}}]),
        delta(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}]),
        delta(finish="tool_calls"),
    )
    columns = completion_columns(assemble_stream(raw))
    assert columns["finish_reason"] == "tool_calls"
    assert columns["response"] is None
    assert orjson.loads(columns["tool_calls"]) == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Hangzhou"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]


def test_n_choices_are_kept_apart() -> None:
    raw = sse(
        delta(0, content="a"),
        delta(1, content="b"),
        delta(1, content="b"),
        delta(0, "stop"),
        delta(1, "length"),
    )
    columns = completion_columns(assemble_stream(raw))
    assert columns["response"] == "a"
    assert columns["choices"] == ["a", "bb"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (sse(delta(content="half"), done=False), "cut off before its end"),
        (sse(delta(content="x"), done=False)[:-9] + b'{"id": "c9", "cho', "not JSON"),
        (sse({"error": {"message": "Internal error", "code": "500"}}), "sent an error"),
        (b'{"object": "error"}', "without a choice"),
    ],
)
def test_a_broken_stream_is_an_invalid_completion(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidCompletion, match=message):
        assemble_stream(raw)


def test_the_first_token_is_the_first_line_that_carries_one() -> None:
    stream = Stream()
    assert not stream.feed(b"data: " + orjson.dumps(delta(role="assistant", content="")))
    assert stream.feed(b"data: " + orjson.dumps(delta(reasoning_content="hm")))
    assert not stream.feed(b"data: " + orjson.dumps(delta(content="x")))


@pytest.mark.parametrize("content", ["", None], ids=["llama.cpp's empty text", "null"])
def test_a_tool_call_records_the_same_response_streamed_or_not(content: str | None) -> None:
    # llama.cpp answers a tool call with content "" whole and no content deltas streamed:
    # the row read "" one way and null the other, for the same answer.
    call = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": content, "tool_calls": [call]}
    choice = {"index": 0, "finish_reason": "tool_calls", "message": message}
    whole = {"id": "c9", "model": "m", "choices": [choice]}
    streamed = sse(
        delta(role="assistant", content=content),
        delta(tool_calls=[{"index": 0, **call}]),
        delta(finish="tool_calls"),
    )
    plain, assembled = completion_columns(whole), completion_columns(assemble_stream(streamed))
    assert plain["response"] is None
    assert assembled["response"] is None
    assert plain["tool_calls"] == assembled["tool_calls"]
