"""Model Studio's rules on request bodies: ranges, thinking and streaming."""

from __future__ import annotations

from typing import Any

import pytest

from batchq.config import RequestSettings
from batchq.send.request import RowProblem, build_body

ROW = {"prompt": "hi"}


def body(
    model: str, provider: str = "dashscope-intl", notes: set[str] | None = None, **params: Any
) -> dict[str, Any]:
    return build_body(ROW, RequestSettings(provider=provider, model=model, params=params), notes)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 2),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.01),
        ("presence_penalty", 2.5),
        ("presence_penalty", -3),
        ("temperature", "hot"),
    ],
)
def test_values_outside_model_studios_ranges_are_refused(name: str, value: Any) -> None:
    with pytest.raises(RowProblem) as info:
        body("qwen-plus", **{name: value})
    assert info.value.column == name
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 0),
        ("temperature", 1.99),
        ("top_p", 1),
        ("top_p", 0.01),
        ("presence_penalty", -2),
        ("presence_penalty", 2),
    ],
)
def test_values_at_the_edges_pass(name: str, value: Any) -> None:
    assert body("qwen-plus", **{name: value})[name] == value


def test_other_providers_get_what_the_user_wrote() -> None:
    sent = body("qwen3-32b", "openai", temperature=2.5, top_p=0)
    assert sent["temperature"] == 2.5
    assert "enable_thinking" not in sent
    assert "stream" not in sent


def test_a_row_column_is_checked_too() -> None:
    settings = RequestSettings(model="qwen-plus")
    with pytest.raises(RowProblem) as info:
        build_body({"prompt": "x", "top_p": 3}, settings)
    assert info.value.column == "top_p"


def test_qwen3_hybrid_without_streaming_gets_enable_thinking_false_once_said() -> None:
    notes: set[str] = set()
    for model in ("qwen3-32b", "qwen3-235b-a22b", "qwen3-0.6b"):
        sent = body(model, notes=notes)
        assert sent["enable_thinking"] is False
        assert "stream" not in sent
    body("qwen3-32b", notes=notes)
    assert len(notes) == 3
    assert any("qwen3-32b is a Qwen3 hybrid model" in n for n in notes)


def test_the_job_can_ask_for_thinking_and_is_then_streamed() -> None:
    sent = body("qwen3-32b", enable_thinking=True)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    plus = body("qwen-plus", enable_thinking=True, stream_options={"foo": 1})
    assert plus["stream"] is True
    assert plus["stream_options"] == {"foo": 1, "include_usage": True}


STREAM_ONLY = ["qwq-plus", "qwq-32b", "qvq-max", "qwen3-235b-a22b-thinking-2507", "x-thinking"]


@pytest.mark.parametrize("model", STREAM_ONLY)
def test_stream_only_models_are_streamed(model: str) -> None:
    notes: set[str] = set()
    sent = body(model, notes=notes)
    assert sent["stream"] is True
    assert sent["stream_options"]["include_usage"] is True
    assert notes == {
        f"{model} answers only streamed: its requests are sent with stream and assembled"
    }


@pytest.mark.parametrize(
    "model", ["qwen-plus", "qwen3-max", "qwen3-coder-plus", "qwen3-30b-a3b-instruct-2507"]
)
def test_other_qwen_models_are_left_alone(model: str) -> None:
    sent = body(model)
    assert "stream" not in sent
    assert "enable_thinking" not in sent


def test_decisions_are_remembered_by_value_and_type() -> None:
    assert body("qwen-plus", temperature=1)["temperature"] == 1
    with pytest.raises(RowProblem, match="must be a number, not True"):
        body("qwen-plus", temperature=True)
    assert body("qwen-plus", top_p=1)["top_p"] == 1
    with pytest.raises(RowProblem, match="must be a number"):
        body("qwen-plus", top_p=[1])  # unhashable: decided afresh


@pytest.mark.parametrize(
    "url",
    [
        "https://dashscope-us.aliyuncs.com/compatible-mode/v1",
        "https://ws-abc.ap-southeast-1.maas.aliyuncs.com/compatible-mode/v1",
        "https://gateway.example.com/compatible-mode/v1",
        "http://127.0.0.1:8080/proxy/compatible-mode/v1/",
    ],
)
def test_a_custom_base_url_on_model_studio_gets_its_rules(url: str) -> None:
    settings = RequestSettings(provider="custom", base_url=url, model="qwen3-32b")
    assert build_body(ROW, settings)["enable_thinking"] is False  # refused without it
    settings = RequestSettings(provider="custom", base_url=url, model="qwq-plus")
    assert build_body(ROW, settings)["stream"] is True


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/v1", "https://llm.example.com/v1", "https://aliyuncs.com.evil.io/v1"],
)
def test_other_base_urls_get_what_the_user_wrote(url: str) -> None:
    settings = RequestSettings(provider="custom", base_url=url, model="qwen3-32b")
    assert "enable_thinking" not in build_body(ROW, settings)


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_n_above_1_with_tools_is_refused() -> None:
    with pytest.raises(RowProblem) as info:
        body("qwen-plus", n=2, tools=TOOLS)
    assert info.value.column == "n"
    assert "tools" in str(info.value)
    assert body("qwen-plus", n=1, tools=TOOLS)["n"] == 1
    assert body("qwen-plus", "openai", n=2, tools=TOOLS)["n"] == 2  # OpenAI takes it


def test_n_above_1_with_tools_from_a_row_names_the_row_column() -> None:
    settings = RequestSettings(model="qwen-plus", params={"tools": TOOLS})
    with pytest.raises(RowProblem) as info:
        build_body({"prompt": "hi", "n": 3}, settings)
    assert info.value.column == "n"


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("qwen-plus", False),
        ("qwen3-32b", False),
        ("qwen3-235b-a22b-instruct-2507", False),
        ("qwen-max", True),
        ("qwen-turbo", True),
    ],
)
def test_n_above_1_on_a_model_not_listed_for_it_is_said_once(model: str, said: bool) -> None:
    notes: set[str] = set()
    body(model, notes=notes, n=2)
    assert any("n above 1" in note for note in notes) == said
