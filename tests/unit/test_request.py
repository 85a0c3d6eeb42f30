from __future__ import annotations

import pytest

from batchq.config import RequestSettings
from batchq.send.request import RowProblem, build_body, estimate_tokens

BASE = RequestSettings(model="qwen-plus")


def test_prompt_becomes_the_user_message() -> None:
    body = build_body({"prompt": "hi"}, BASE)
    assert body == {"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]}


def test_template_fills_from_the_row_and_system_is_prepended() -> None:
    settings = RequestSettings(model="m", system="Be brief.", template="Review: {text} ({stars})")
    body = build_body({"text": "great", "stars": 5}, settings)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Review: great (5)"},
    ]


def test_messages_column_is_taken_as_it_is() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert build_body({"messages": messages}, BASE)["messages"] == messages


def test_job_settings_and_params_then_row_overrides() -> None:
    settings = RequestSettings(model="m", max_tokens=5, temperature=0.2, params={"seed": 1})
    row = {"prompt": "x", "model": "qwen-max", "seed": 9, "temperature": None}
    body = build_body(row, settings)
    assert body["model"] == "qwen-max"
    assert body["seed"] == 9
    assert body["temperature"] == 0.2  # a null column does not override
    assert body["max_tokens"] == 5


def test_batch_api_line_is_its_own_body() -> None:
    row = {
        "custom_id": "a-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "qwen-turbo", "messages": [{"role": "user", "content": "q"}]},
    }
    body = build_body(row, RequestSettings(model="ignored", max_tokens=7))
    assert body["model"] == "qwen-turbo"
    assert body["max_tokens"] == 7


@pytest.mark.parametrize(
    ("row", "settings", "column"),
    [
        ({"text": "x"}, RequestSettings(model="m", template="{missing}"), "missing"),
        ({"other": 1}, BASE, "messages"),
        ({"messages": []}, BASE, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, BASE, "messages"),
        ({"messages": [{"content": "x"}]}, BASE, "messages"),
        ({"messages": "hello"}, BASE, "messages"),
        ({"prompt": 5}, BASE, "prompt"),
        ({"prompt": "x"}, RequestSettings(), "model"),
    ],
)
def test_rows_that_cannot_be_sent_name_their_column(
    row: dict[str, object], settings: RequestSettings, column: str
) -> None:
    with pytest.raises(RowProblem) as caught:
        build_body(row, settings)
    assert caught.value.column == column


def test_token_estimate_grows_with_the_text() -> None:
    short = estimate_tokens({"messages": [{"role": "user", "content": "x" * 30}]})
    long = estimate_tokens({"messages": [{"role": "user", "content": "x" * 3000}]})
    assert long - short == 990


def test_a_template_sends_values_as_json_never_as_python() -> None:
    settings = RequestSettings(model="m", template="{ok} {tags} {meta} {n} {x}")
    row = {"ok": True, "tags": ["a", "b"], "meta": {"k": None}, "n": 3, "x": 0.5}
    body = build_body(row, settings)
    assert body["messages"][0]["content"] == 'true ["a","b"] {"k":null} 3 0.5'
    with pytest.raises(RowProblem, match="'ok' is null") as info:
        build_body({**row, "ok": None}, settings)
    assert info.value.column == "ok"
