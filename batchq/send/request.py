"""Pure: one input row plus the job's request settings -> one chat/completions request body.

A row gives its messages in one of three ways: the job's ``template`` over the row's
columns, a ``messages`` column, or a ``prompt`` column. ``system`` is prepended when set.
A column named after a request field (``model``, ``temperature``, ``seed`` ...) overrides
the job's value for that row. A Batch-API line (``custom_id`` + ``body``) is its own body.

Problems are raised as :class:`RowProblem` with the column at fault; the caller adds the
file and line.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from batchq.config import RequestSettings
from batchq.qwen import RangeProblem, apply_rules

__all__ = [
    "CHARS_PER_TOKEN",
    "FRAMING_CHARS",
    "REQUEST_FIELDS",
    "RULES",
    "RowProblem",
    "Rule",
    "build_body",
    "choices",
    "completion_cap",
    "estimate_tokens",
    "job_body",
    "prompt_bytes",
]

#: Body fields a row's column of the same name overrides, and that ``--param`` may set.
REQUEST_FIELDS = frozenset(
    {
        "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "seed", "stop", "n", "stream", "stream_options", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "logprobs", "top_logprobs", "logit_bias", "user",
        "enable_thinking", "thinking_budget", "enable_search", "search_options",
        "modalities", "audio", "translation_options", "vl_high_resolution_images",
    }
)  # fmt: skip
ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})

#: The rules a row's request is held to. ``build_body`` raises a RowProblem naming the
#: one a row breaks; the preflight's fast path (``io/column_checks.py``) says how it applies
#: each, and hands every input to the exact pass while a rule here is not one it knows.
Rule = Literal["model", "messages", "template", "prompt", "message_shape", "model_studio"]
RULES: dict[Rule, str] = {
    "model": "a request names a model: the job's, a model column's or a Batch-API body's",
    "messages": "a row gives its messages: a template, a messages column or a prompt column",
    "template": "the template is filled from the row's columns, each there and not null",
    "prompt": "a prompt column holds text",
    "message_shape": "messages are a non-empty list of {role, content} objects with a known "
    "role, and text or parts for content (an assistant's may be null)",
    "model_studio": "on Model Studio, its parameter ranges and rules (batchq.qwen)",
}
#: The prompt-token estimate (``estimate_tokens``): characters a message's role and
#: framing count for, and characters a token.
FRAMING_CHARS, CHARS_PER_TOKEN = 12, 3


class RowProblem(ValueError):
    """A row cannot be turned into a request: the ``rule`` it breaks, and the culprit
    ``column`` when known."""

    def __init__(self, message: str, *, rule: Rule, column: str | None = None) -> None:
        super().__init__(message)
        self.rule, self.column = rule, column


def build_body(
    row: dict[str, Any], settings: RequestSettings, notes: set[str] | None = None
) -> dict[str, Any]:
    """The request body for one row. Pure; raises RowProblem for a row that cannot be sent.

    Wherever the endpoint is Model Studio its rules apply (``batchq.qwen``), adding what
    they changed to ``notes``. A streamed request always asks for the usage in its last chunk."""
    if isinstance(row.get("body"), dict) and "custom_id" in row:
        return _finish(_batch_api_body(row, settings), settings, notes)
    messages = _messages(row, settings)
    overrides = {n: row[n] for n in REQUEST_FIELDS.intersection(row) if row[n] is not None}
    if not overrides:  # most rows: the job's fields, decided once, and the row's messages
        base, note = job_body(settings)
        if note is not None and notes is not None:
            notes.add(note)
        return {**base, "messages": messages}
    body = {**_job_fields(settings), **overrides, "messages": messages}
    return _finish(body, settings, notes)


def _job_fields(settings: RequestSettings) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if settings.model is not None:
        body["model"] = settings.model
    if settings.max_tokens is not None:
        body["max_tokens"] = settings.max_tokens
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    body.update(settings.params)
    return body


def _finish(
    body: dict[str, Any], settings: RequestSettings, notes: set[str] | None
) -> dict[str, Any]:
    """Check the model, apply the provider's rules, ask a stream for its usage."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise RowProblem(
            "no model: set model in [request] or --model, or give a model column",
            rule="model",
            column="model",
        )
    if settings.model_studio:
        try:
            apply_rules(body, notes)
        except RangeProblem as e:
            raise RowProblem(str(e), rule="model_studio", column=e.name) from None
    if body.get("stream"):
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return body


#: id(settings) -> (settings, its finished fields, the rules' note, or the RowProblem)
_JOB_BODIES: dict[int, tuple[RequestSettings, dict[str, Any], str | None, RowProblem | None]] = {}


def job_body(settings: RequestSettings) -> tuple[dict[str, Any], str | None]:
    """The job's own fields with the rules applied, computed once per settings object
    (RequestSettings holds a dict, so it cannot be an lru_cache key)."""
    hit = _JOB_BODIES.get(id(settings))
    if hit is None or hit[0] is not settings:
        notes: set[str] = set()
        try:
            base, problem = _finish(_job_fields(settings), settings, notes), None
        except RowProblem as e:
            base, problem = {}, e
        if len(_JOB_BODIES) >= 64:
            _JOB_BODIES.clear()
        hit = _JOB_BODIES[id(settings)] = (settings, base, next(iter(notes), None), problem)
    _, base, note, problem = hit
    if problem is not None:
        raise RowProblem(str(problem), rule=problem.rule, column=problem.column)
    return base, note


def _batch_api_body(row: dict[str, Any], settings: RequestSettings) -> dict[str, Any]:
    body = dict(row["body"])
    defaults: dict[str, Any] = {"model": settings.model, "max_tokens": settings.max_tokens}
    defaults |= {"temperature": settings.temperature, **settings.params}
    for name, value in defaults.items():
        if value is not None:
            body.setdefault(name, value)
    _check_messages(body.get("messages"), column="body.messages")
    if not isinstance(body.get("model"), str):
        raise RowProblem(
            "the Batch-API body has no model: set model in [request]", rule="model", column="body"
        )
    return body


def _messages(row: dict[str, Any], settings: RequestSettings) -> list[dict[str, Any]]:
    if settings.template is not None:
        try:
            text = settings.template.format_map(_Columns(row))
        except RowProblem:
            raise
        except (IndexError, AttributeError, TypeError, ValueError) as e:
            raise RowProblem(
                f"the template cannot be filled from this row: {e}", rule="template"
            ) from None
        messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
    elif "messages" in row and row["messages"] is not None:
        messages = _check_messages(row["messages"], column="messages")
    elif "prompt" in row and row["prompt"] is not None:
        if not isinstance(row["prompt"], str):
            raise RowProblem("prompt must be a string", rule="prompt", column="prompt")
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise RowProblem(
            "the row has no messages: give a messages or prompt column, or set a template",
            rule="messages",
            column="messages",
        )
    if settings.system is not None:
        messages = [{"role": "system", "content": settings.system}, *messages]
    return messages


class _Columns(dict[str, Any]):
    """A row as the template sees it: text as it is, a number as written, anything else
    (true / false, a list or an object) as JSON; never a Python repr. A null is a
    problem: the word None would be sent."""

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if value is None:
            raise RowProblem(
                f"column {key!r} is null in this row, so the template cannot be filled: "
                "give the row a value (or drop the row)",
                rule="template",
                column=key,
            )
        if isinstance(value, str) or (
            isinstance(value, int | float) and not isinstance(value, bool)
        ):
            return value
        return orjson.dumps(value, default=str).decode()

    def __missing__(self, key: str) -> Any:
        raise RowProblem(
            f"the template names column {key!r}, which this row lacks", rule="template", column=key
        )


def _check_messages(value: Any, *, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowProblem(
            "messages must be a non-empty list of {role, content}",
            rule="message_shape",
            column=column,
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message:
            raise RowProblem(
                f"message {i} must be an object with a role", rule="message_shape", column=column
            )
        if message["role"] not in ROLES:
            raise RowProblem(
                f"message {i} has unknown role {message['role']!r}; "
                f"use one of {', '.join(sorted(ROLES))}",
                rule="message_shape",
                column=column,
            )
        content = message.get("content")
        if not isinstance(content, str | list) and not (
            content is None and message["role"] == "assistant"
        ):
            raise RowProblem(
                f"message {i} content must be a string or a list",
                rule="message_shape",
                column=column,
            )
    return value


def completion_cap(body: dict[str, Any]) -> int | None:
    """The body's cap on completion tokens, or None."""
    cap = body.get("max_tokens") or body.get("max_completion_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) else None


def prompt_bytes(body: dict[str, Any]) -> int:
    """The prompt's text in UTF-8 bytes, and 12 a message: no tokenizer that works on
    bytes (every one in use) makes more tokens of it, whatever the script."""
    total = 0
    for message in body.get("messages", ()):
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            total += sum(
                len(str(part.get("text", "")).encode())
                for part in content
                if isinstance(part, dict)
            )
        total += FRAMING_CHARS
    return total


def choices(body: dict[str, Any]) -> int:
    """How many answers the request asks for (``n``), each one billed."""
    n = body.get("n")
    return n if isinstance(n, int) and n > 1 else 1


def estimate_tokens(body: dict[str, Any]) -> int:
    """A deliberately generous estimate of the prompt's tokens: a token per 3 characters.

    English runs about 4 characters a token and Chinese about 1.5 characters, so this
    overestimates English and underestimates dense CJK a little; the limiter corrects
    its reservation with the usage each answer reports.
    """
    chars = 0
    for message in body.get("messages", ()):
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(str(part.get("text", ""))) for part in content if isinstance(part, dict)
            )
        chars += FRAMING_CHARS  # role and framing tokens
    return chars // CHARS_PER_TOKEN + 1
