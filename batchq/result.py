"""A row's result: the typed row every path builds (the live run's per-row work, the
Batch-API import), the columns it becomes in the output, and its form in a shard.

``Result`` has a field per output column of SPEC "Output", plus the row's place in the
input (``row``), its id as text (``id``) and ``raw``; ``shard_table`` is the one place a
list of them becomes a shard (SHARD_SCHEMA: ``_row``, ``_id``, the result columns, raw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from batchq import arrays

__all__ = [
    "ANSWER_SCHEMA",
    "BATCH_PART",
    "COST",
    "FEW_VALUES",
    "PRIOR_COLUMNS",
    "RAW",
    "RESULT_COLUMNS",
    "RESULT_SCHEMA",
    "SHARD_SCHEMA",
    "Result",
    "output_fields",
    "shard_table",
]

RESULT_SCHEMA = pa.schema(
    [
        ("status", pa.string()),
        ("response", pa.string()),
        ("reasoning", pa.string()),
        ("tool_calls", pa.string()),
        ("finish_reason", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("model", pa.string()),
        ("response_model", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cache_creation_tokens", pa.int64()),
        ("request_id", pa.string()),
        ("attempts", pa.int32()),
        ("via", pa.string()),
        ("batch_prompt_tokens", pa.int64()),
        ("batch_completion_tokens", pa.int64()),
        ("latency_ms", pa.float64()),
        ("ttft_ms", pa.float64()),
        ("http_status", pa.int32()),
        ("error_type", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)
#: The checked answer (SPEC "Answers you can use"): output columns of a job with [answer].
ANSWER_SCHEMA = pa.schema(
    [("answer", pa.string()), ("reasks", pa.int32()), ("agreement", pa.float64())]
)
#: The response as received, kept with ``--keep-raw`` (an output column only then).
RAW = pa.field("raw", pa.string())
#: The row's cost at the run's price table (null where unpriced): an output column,
#: computed from the row's usage as the output is written.
COST = pa.field("cost", pa.float64())
#: A checkpoint shard: the input position, the id as text, the result columns, the
#: answer's, ``raw``.
SHARD_SCHEMA = pa.schema(
    [("_row", pa.int64()), ("_id", pa.string()), *RESULT_SCHEMA, *ANSWER_SCHEMA, RAW]
)
#: What a row's results add up over its requests and runs: requests sent, re-asks, the
#: usage billed.
PRIOR_COLUMNS = ("attempts", "reasks", "prompt_tokens", "completion_tokens", "total_tokens",
                 "cached_tokens", "reasoning_tokens", "cache_creation_tokens")  # fmt: skip
#: What a row carries, not adds up, when it is asked again live: the part of its usage
#: the Batch API answered.
BATCH_PART = ("batch_prompt_tokens", "batch_completion_tokens")
#: The result columns every output has, and ``raw`` (an input column of such a name clashes).
RESULT_COLUMNS = frozenset([*RESULT_SCHEMA.names, RAW.name, COST.name])


def output_fields(*, answers: bool, keep_raw: bool) -> list[pa.Field]:
    """The output's result columns, in order: ``status``, then the answer's (a job with
    [answer]), then the rest, then ``raw`` (``--keep-raw``)."""
    first, *rest = RESULT_SCHEMA
    at = [f.name for f in rest].index("cache_creation_tokens") + 1  # cost beside the usage
    rest = [*rest[:at], COST, *rest[at:]]
    return [first, *(ANSWER_SCHEMA if answers else []), *rest, *([RAW] if keep_raw else [])]


#: Result columns with few distinct values, worth a dictionary in Parquet. Dictionary-
#: encoding free text (response, request_id, ...) only to fall back to plain encoding cost
#: the writer a third more memory and made a 16,384-row row group 17 % larger.
FEW_VALUES = frozenset({"status", "model", "response_model", "finish_reason", "via",
                        "http_status", "error_type", "error_code"})  # fmt: skip


@dataclass(slots=True, kw_only=True)
class Result:
    """One input row's result, as the output's result columns hold it."""

    #: the row's 0-based position in the input (the shard's ``_row``)
    row: int
    #: the row's id as text: its id column's value, or its position (the shard's ``_id``)
    id: str
    #: ``ok``, ``error`` or ``invalid`` (an answer that failed the job's [answer] check)
    status: str
    #: the model requested for this row (the job's, or the row's ``model`` column)
    model: str | None
    #: requests sent for this row, this run and earlier ones
    attempts: int
    #: how it was answered: ``live`` (a run), ``batch`` (a provider's Batch API; its live
    #: re-asks, if any, after), or ``dedupe`` (another row's answer)
    via: str
    #: HTTP status of the last attempt (None: no HTTP answer)
    http_status: int | None = None
    #: ``choices[0].message.content``
    response: str | None = None
    #: ``reasoning_content``, where the model returns one
    reasoning: str | None = None
    #: JSON of ``choices[0].message.tool_calls``
    tool_calls: str | None = None
    finish_reason: str | None = None
    #: the text of every choice when ``n > 1`` (the first is also in ``response``)
    choices: list[str | None] | None = None
    #: the model named in the response
    response_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    #: ``usage.prompt_tokens_details.cached_tokens``
    cached_tokens: int | None = None
    #: ``usage.completion_tokens_details.reasoning_tokens``
    reasoning_tokens: int | None = None
    #: tokens written to an explicit cache (0: the explicit cache was used, nothing
    #: written; None: the implicit cache, or none)
    cache_creation_tokens: int | None = None
    #: of the usage, what the Batch API answered (priced at its share; the rest, live
    #: re-asks, at the live price); None: nothing came through the Batch API
    batch_prompt_tokens: int | None = None
    batch_completion_tokens: int | None = None
    #: the response's ``id``
    request_id: str | None = None
    #: milliseconds of the successful attempt
    latency_ms: float | None = None
    #: milliseconds to the first streamed token
    ttft_ms: float | None = None
    #: for ``status = error``: the API's ``error.type``, or the transport error's kind
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    #: the checked answer: the label, the JSON re-serialised, the matched text (``ok`` rows
    #: of a job with [answer])
    answer: str | None = None
    #: how many times the row was asked again because an answer was not valid
    reasks: int = 0
    #: with ``n > 1``: the share of the choices that gave ``answer``
    agreement: float | None = None
    #: the response (or error body) as received, with ``--keep-raw``
    raw: str | None = None

    @classmethod
    def answered(
        cls,
        *,
        row: int,
        id: str,
        model: str | None,
        attempts: int,
        via: str,
        completion: dict[str, Any],
        latency_ms: float | None = None,
    ) -> Result:
        """An ``ok`` row from an answer's completion columns (``send.response``)."""
        return cls(
            row=row,
            id=id,
            status="ok",
            model=model,
            attempts=attempts,
            via=via,
            http_status=200,
            latency_ms=latency_ms,
            **completion,
        )

    @classmethod
    def failed(
        cls,
        *,
        row: int,
        id: str,
        model: str | None,
        attempts: int,
        via: str,
        http_status: int | None,
        error_type: str | None,
        error_code: str | None,
        error_message: str | None,
        raw: str | None = None,
    ) -> Result:
        """An ``error`` row: the last attempt's error."""
        return cls(
            row=row,
            id=id,
            status="error",
            model=model,
            attempts=attempts,
            via=via,
            http_status=http_status,
            error_type=error_type,
            error_code=error_code,
            error_message=error_message,
            raw=raw,
        )

    def invalid(self, reason: str) -> Result:
        """This answered row, marked ``invalid``: its answer failed the job's [answer]
        check, for ``reason``, after its re-asks."""
        self.status, self.answer, self.agreement = "invalid", None, None
        self.error_type, self.error_message = "invalid_answer", reason
        return self

    def text_length(self) -> int:
        """Characters of answer text (response, reasoning, tool calls, choices, raw):
        what makes a row large."""
        length = sum(
            len(v)
            for v in (self.response, self.reasoning, self.tool_calls, self.raw)
            if v is not None
        )
        return length + sum(len(c or "") for c in self.choices or ())


#: Each shard column and the Result field it is read from.
_SHARD_FIELDS = [("_row", "row"), ("_id", "id"),
                 *((name, name) for name in SHARD_SCHEMA.names[2:])]  # fmt: skip


def shard_table(results: list[Result]) -> pa.Table:
    """``results`` as a shard (SHARD_SCHEMA), a column at a time."""
    columns = {column: [getattr(r, name) for r in results] for column, name in _SHARD_FIELDS}
    return arrays.table(columns, SHARD_SCHEMA)
