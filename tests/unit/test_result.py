"""The typed result row and its shard form."""

from __future__ import annotations

from dataclasses import fields

from batchq.result import RESULT_SCHEMA, SHARD_SCHEMA, Result, shard_table


def test_a_result_has_a_field_for_every_shard_column_and_becomes_one_row() -> None:
    names = {f.name for f in fields(Result)}
    assert names == {"row", "id", *SHARD_SCHEMA.names[2:]}
    assert set(RESULT_SCHEMA.names) < names
    ok = Result.answered(
        row=3,
        id="r3",
        model="qwen-plus",
        attempts=2,
        via="live",
        completion={"response": "yes", "prompt_tokens": 5, "choices": ["yes", "no"]},
        latency_ms=1.5,
    )
    failed = Result.failed(
        row=0,
        id="r0",
        model="m",
        attempts=8,
        via="batch",
        http_status=None,
        error_type="transport",
        error_code="Disconnected",
        error_message="dropped",
    )
    table = shard_table([ok, failed])
    assert table.schema == SHARD_SCHEMA
    first, second = table.to_pylist()
    assert first["_row"] == 3
    assert first["_id"] == "r3"
    assert (first["status"], first["http_status"], first["response"]) == ("ok", 200, "yes")
    assert (first["choices"], first["latency_ms"], first["error_type"]) == (
        ["yes", "no"],
        1.5,
        None,
    )
    assert (second["status"], second["via"], second["error_code"], second["response"]) == (
        "error",
        "batch",
        "Disconnected",
        None,
    )
    assert ok.text_length() == len("yes") + len("yes") + len("no")
