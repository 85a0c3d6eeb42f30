"""Pure: what the simulator answers to a request body, whole or as stream chunks.

The answer is a deterministic function of the body, so tests can check every row got
*its* answer and every parameter arrived:

- the reply is ``"echo: "`` + the last user message; with ``n > 1`` choice *i* adds
  ``" (i+1)"``; asked again for a label (batchq's re-ask of an [answer] job), a label;
  ``max_tokens`` cuts it at that many words (``finish_reason: "length"``);
- with ``tools`` (and ``tool_choice`` not ``"none"``) the answer is a call of the first
  tool, its arguments ``{"text": <last user message>}``, ``finish_reason: "tool_calls"``;
- thinking (``enable_thinking: true``, an open-source Qwen3 hybrid model without
  ``enable_thinking: false``, or a stream-only model) adds ``reasoning_content``
  ``"thinking about: …"``, counted in ``completion_tokens_details.reasoning_tokens``;
- Model Studio's rules: thinking is served only streamed, so a non-streamed request
  that would think is refused with 400, as the service does;
- usage counts words: a token a word, three more a message (or, with ``per_char``, a
  number of tokens a character, as a CJK tokenizer counts; ``max_tokens`` cuts by those).
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["MODERATION_MARKER", "chunks", "completion", "refusal", "reply_for"]

#: A user message containing this is refused like Model Studio's content moderation.
MODERATION_MARKER = "FLAGGED-CONTENT"

_HYBRID = re.compile(r"^qwen3-\d+(\.\d+)?b(-a\d+(\.\d+)?b)?$")
_STREAM_ONLY = re.compile(r"^(qwq|qvq)-|-thinking(-\d{4}(-\d{2}-\d{2})?)?$")


#: How batchq asks again for a label (batchq.answer): the simulator then complies.
_LABEL_REASK = re.compile(r"Answer with exactly one of these labels and nothing else: (.+)\.$")
#: How batchq asks again for JSON under a schema: the simulator answers with an instance.
_SCHEMA_REASK = re.compile(r"Answer with JSON only, valid under this JSON Schema: (\{.*\})")


def reply_for(messages: list[dict[str, Any]]) -> str:
    """The simulator's deterministic answer to a conversation: an echo; asked again for
    one of some labels, as a model that complies would, one of them (which one is a
    function of the conversation's first user message)."""
    last = _last_user(messages)
    if (m := _LABEL_REASK.search(last)) is not None:
        labels = m.group(1).split(", ")
        first = next((m for m in messages if m.get("role") == "user"), {})
        return labels[zlib.crc32(str(first.get("content")).encode()) % len(labels)]
    if (m := _SCHEMA_REASK.search(last)) is not None:
        try:
            return orjson.dumps(_instance(orjson.loads(m.group(1)))).decode()
        except orjson.JSONDecodeError:
            pass
    return f"echo: {last}"


def _instance(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """A plain instance of a simple JSON Schema (objects, arrays, enums, scalars; local
    ``$ref``s such as pydantic writes): what a complying model might answer."""
    if not isinstance(schema, dict):
        return None
    defs = {**(defs or {}), **schema.get("$defs", {})}
    if isinstance(ref := schema.get("$ref"), str):
        return _instance(defs.get(ref.rsplit("/", 1)[-1]), defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if options := schema.get("anyOf") or schema.get("oneOf"):
        return _instance(options[0], defs)
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: _instance(sub, defs) for name, sub in properties.items()}
    if kind == "array":
        return [_instance(schema.get("items", {}), defs)] * schema.get("minItems", 1)
    scalars = {
        "string": "text",
        "integer": schema.get("minimum", 1),
        "boolean": True,
        "number": schema.get("minimum", 0.5),
        "null": None,
    }
    return scalars.get(str(kind), "text")


def _last_user(messages: list[dict[str, Any]]) -> str:
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = last.get("content") if last else ""
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def _thinks(body: dict[str, Any]) -> bool:
    model = str(body.get("model", ""))
    if _STREAM_ONLY.search(model):
        return True
    if _HYBRID.match(model):
        return body.get("enable_thinking") is not False
    return body.get("enable_thinking") is True


def refusal(body: dict[str, Any]) -> str | None:
    """The 400 message Model Studio gives a request it refuses for its parameters: ``n``
    above 1 with ``tools``, or a non-streamed request that would think."""
    n, tools = body.get("n"), body.get("tools")
    if isinstance(n, int) and n > 1 and tools:
        return "The value of n must be 1 when the tools parameter is passed."
    if body.get("stream") or not _thinks(body):
        return None
    if _STREAM_ONLY.search(str(body.get("model", ""))):
        return "This model only support stream mode, please enable the stream parameter."
    return "parameter.enable_thinking must be set to false for non-streaming calls"


def tokens(text: str, per_char: float | None = None) -> int:
    """A text's tokens: a word each, or ``per_char`` a character (a CJK-like tokenizer)."""
    if per_char is None:
        return len(text.split(" "))
    return math.ceil(len(text) * per_char)


def completion(
    body: dict[str, Any], request_id: str, *, per_char: float | None = None
) -> dict[str, Any]:
    """The whole completion object for ``body`` (its tokens counted as ``tokens`` says)."""
    messages = body["messages"]
    model = str(body["model"])
    n: int = body["n"] if isinstance(body.get("n"), int) and body["n"] > 1 else 1
    cap = body.get("max_tokens") or body.get("max_completion_tokens")
    thinking = _thinks(body)
    choices, words_out, reasoning_words = [], 0, 0
    for i in range(n):
        message: dict[str, Any] = {"role": "assistant"}
        if thinking:
            reasoning = f"thinking about: {_last_user(messages)}"
            message["reasoning_content"] = reasoning
            reasoning_words += len(reasoning.split(" "))
        tools = body.get("tools")
        if isinstance(tools, list) and tools and body.get("tool_choice") != "none":
            name = tools[0].get("function", {}).get("name", "tool")
            arguments = orjson.dumps({"text": _last_user(messages)}).decode()
            message["content"] = None
            function = {"name": name, "arguments": arguments}
            call = {"id": f"call_{request_id}_{i}", "type": "function", "function": function}
            message["tool_calls"] = [call]
            words_out += 1 + len(arguments.split(" "))
            choices.append({"index": i, "message": message, "finish_reason": "tool_calls"})
            continue
        words = reply_for(messages).split(" ") + ([f"({i + 1})"] if i else [])
        finish = "stop"
        if isinstance(cap, int) and len(words) > cap:
            words, finish = words[:cap], "length"
        text = " ".join(words)
        if per_char is not None and isinstance(cap, int) and tokens(text, per_char) > cap:
            text, finish = text[: int(cap / per_char)], "length"
        message["content"] = text
        words_out += tokens(text, per_char)
        choices.append({"index": i, "message": message, "finish_reason": finish})
    if per_char is None:
        prompt_tokens = sum(3 + len(str(m.get("content", "")).split()) for m in messages)
    else:
        prompt_tokens = sum(3 + tokens(str(m.get("content", "")), per_char) for m in messages)
    completion_tokens = words_out + reasoning_words
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if thinking:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_words}
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunks(whole: dict[str, Any], *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """``whole`` as the chunks of a stream, word by word: reasoning, then content, tool
    calls in two pieces (name, then the arguments split in half), a finish chunk per
    choice, and the usage chunk last when asked for."""
    head = {
        "id": whole["id"],
        "object": "chat.completion.chunk",
        "created": whole["created"],
        "model": whole["model"],
    }

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return {**head, "choices": [choice]}

    for choice in whole["choices"]:
        i, message = choice["index"], choice["message"]
        yield chunk(i, {"role": "assistant", "content": ""})
        for key in ("reasoning_content", "content"):
            text = message.get(key)
            for j, word in enumerate(text.split(" ") if text else ()):
                yield chunk(i, {key: word if j == 0 else f" {word}"})
        for k, call in enumerate(message.get("tool_calls") or ()):
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            yield chunk(
                i,
                {
                    "tool_calls": [
                        {
                            "index": k,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                },
            )
            for piece in (arguments[:half], arguments[half:]):
                yield chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
        yield chunk(i, {}, choice["finish_reason"])
    if include_usage:
        yield {**head, "choices": [], "usage": whole["usage"]}
