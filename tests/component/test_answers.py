"""Answers checked and asked again, one row at a time over httpx.MockTransport: the
conversation of a re-ask, retries and faults during it, the bill adding up, ``invalid``
after the last re-ask, and the vote over ``n`` choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import polars as pl
import pytest

from batchq.answer import AnswerSpec, Checker
from batchq.config import load_job
from batchq.engine.runner import run_job
from batchq.events import Reasking
from tests.component.test_work import err, run

pytestmark = pytest.mark.anyio

LABELS = Checker(AnswerSpec(labels=("positive", "negative", "neutral"), reasks=2))
BODY = {"model": "qwen-plus", "stream": False, "temperature": 0.2,
        "messages": [{"role": "system", "content": "Label it."},
                     {"role": "user", "content": "Review: it broke"}]}  # fmt: skip


def said(
    *texts: str | None, prompt: int = 10, completion: int = 2, cached: int | None = None
) -> httpx.Response:
    """A 200 whose choices say ``texts``, with its usage."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
        for i, t in enumerate(texts)
    ]
    return httpx.Response(
        200, json={"id": "c", "model": "qwen-plus", "choices": choices, "usage": usage}
    )


async def test_an_answer_that_is_not_a_label_is_asked_again_with_the_reason() -> None:
    sent: list[dict[str, Any]] = []
    row, _, events, _ = await run(
        [said("positive or negative", prompt=10), said("**Negative.**", prompt=30)],
        checker=LABELS,
        body=BODY,
        sent=sent,
    )
    assert (row.status, row.answer, row.response, row.reasks) == (
        "ok",
        "negative",
        "**Negative.**",
        1,
    )
    # The same conversation, the answer, and one message saying why and what is valid.
    again = sent[1]
    assert again["messages"][:2] == BODY["messages"]
    assert again["messages"][2] == {"role": "assistant", "content": "positive or negative"}
    assert again["messages"][3] == {
        "role": "user",
        "content": (
            "That answer is not valid: it names more than one label (positive, negative). "
            "Answer with exactly one of these labels and nothing else: positive, negative, neutral."
        ),
    }
    assert len(again["messages"]) == 4
    assert {k: v for k, v in again.items() if k != "messages"} == {
        k: v for k, v in BODY.items() if k != "messages"
    }
    # Both answers were billed: the row's usage adds them up.
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (40, 4, 44)
    assert row.attempts == 2
    assert [e for e in events if isinstance(e, Reasking)] == [
        Reasking("r7", 1, "it names more than one label (positive, negative)")
    ]


async def test_faults_during_a_reask_are_retried_and_billed_only_when_answered() -> None:
    row, sleeps, _, pacer = await run(
        [
            err(503),
            said("maybe", cached=4),
            err(429, "limit_requests"),
            err(500),
            said("Neutral — nothing to say", cached=None),
        ],
        checker=LABELS,
        body=BODY,
    )
    assert (row.status, row.answer, row.reasks, row.attempts) == ("ok", "neutral", 1, 5)
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (20, 4, 4)
    assert len(sleeps) == 3
    assert pacer.acquired == 5  # the re-ask waits on the pacer like any request


async def test_still_not_valid_after_the_last_reask_is_invalid() -> None:
    row, _, _, _ = await run(
        [said("I cannot tell"), said("maybe"), said("")], checker=LABELS, body=BODY
    )
    assert row.status == "invalid"
    assert row.answer is None
    assert row.response == ""  # the last text
    assert (row.error_type, row.error_message) == ("invalid_answer", "it is empty")
    assert (row.reasks, row.attempts, row.prompt_tokens) == (2, 3, 30)
    assert row.http_status == 200


async def test_with_no_reasks_an_invalid_answer_is_invalid_at_once() -> None:
    none = Checker(AnswerSpec(labels=("yes", "no"), reasks=0))
    row, _, _, _ = await run([said("yes and no")], checker=none, body=BODY)
    assert (row.status, row.reasks, row.attempts) == ("invalid", 0, 1)
    assert row.error_message == "it names more than one label (yes, no)"


async def test_a_row_that_fails_during_its_reask_keeps_what_it_was_billed() -> None:
    row, _, _, _ = await run(
        [said("hmm", prompt=12), err(400, "data_inspection_failed")], checker=LABELS, body=BODY
    )
    assert (row.status, row.error_code, row.reasks, row.attempts) == (
        "error",
        "data_inspection_failed",
        1,
        2,
    )
    assert row.prompt_tokens == 12


async def test_n_choices_vote_and_agreement_is_the_share_of_all_choices() -> None:
    body = {**BODY, "n": 4}
    row, _, _, _ = await run(
        [said("Positive.", "negative", "positive!", "no idea")], checker=LABELS, body=body
    )
    assert (row.status, row.answer, row.agreement, row.reasks) == ("ok", "positive", 0.5, 0)
    # A tie goes to the label listed first.
    row, _, _, _ = await run(
        [said("neutral", "negative", "Negative", "neutral.")], checker=LABELS, body=body
    )
    assert (row.answer, row.agreement) == ("negative", 0.5)


async def test_n_choices_none_valid_is_asked_again_with_the_first() -> None:
    sent: list[dict[str, Any]] = []
    body = {**BODY, "n": 2}
    row, _, _, _ = await run(
        [said("hmm", "maybe"), said("neutral", "Neutral")], checker=LABELS, body=body, sent=sent
    )
    assert (row.status, row.answer, row.agreement, row.reasks) == ("ok", "neutral", 1.0, 1)
    assert sent[1]["n"] == 2
    assert sent[1]["messages"][2] == {"role": "assistant", "content": "hmm"}


async def test_earlier_runs_add_to_the_bill() -> None:
    # --retry-invalid asks afresh: what the row was sent and billed before is kept.
    prior = {
        "attempts": 3,
        "reasks": 2,
        "prompt_tokens": 30,
        "completion_tokens": 6,
        "total_tokens": 36,
        "cached_tokens": None,
        "reasoning_tokens": None,
    }
    row, _, _, _ = await run([said("negative")], checker=LABELS, body=BODY, prior=prior)
    assert (row.status, row.answer, row.attempts, row.reasks) == ("ok", "negative", 4, 2)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (40, 8, 48)
    assert row.cached_tokens is None


async def test_json_answers_are_validated_and_reserialised() -> None:
    schema = {
        "type": "object",
        "required": ["label", "score"],
        "properties": {
            "label": {"enum": ["good", "bad"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
        },
    }
    checker = Checker(AnswerSpec(json_schema=schema, reasks=1))
    sent: list[dict[str, Any]] = []
    row, _, _, _ = await run(
        [
            said('{"label": "good", "score": 9}'),
            said('Sure:\n```json\n{ "label": "good",\n  "score": 4 }\n```'),
        ],
        checker=checker,
        body=BODY,
        sent=sent,
    )
    assert (row.status, row.answer, row.reasks) == ("ok", '{"label":"good","score":4}', 1)
    reask = sent[1]["messages"][3]["content"]
    assert reask.startswith(
        "That answer is not valid: it does not match the schema: at $.score: "
        "9 is greater than the maximum of 5. Answer with JSON only"
    )


async def test_a_run_stopped_during_reasks_keeps_the_answers_it_paid_for(tmp_path: Path) -> None:
    # The first answers are billed; while their re-asks wait out a dead connection the
    # run is stopped. The next run asks again from those answers: none is paid twice.
    n = 20
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "text": f"review {i}"}) + "\n" for i in range(n))
    )
    job = load_job(
        None,
        overrides={
            "input": str(source),
            "output": str(tmp_path / "out.parquet"),
            "model": "qwen-plus",
            "base_url": "http://sim/v1",
            "template": "{text}",
            "max_attempts": 50,
            "labels": "positive,negative",
            "reasks": 2,
        },
    )
    first: list[int] = []

    def stuck(request: httpx.Request) -> httpx.Response:
        messages = json.loads(request.content)["messages"]
        if len(messages) == 1:
            first.append(1)
            return said("maybe", prompt=10)
        raise httpx.ConnectError("the connection died")

    with anyio.move_on_after(1.5):
        await run_job(job, api_key=None, transport=httpx.MockTransport(stuck))
    assert len(first) == n
    asked: list[list[dict[str, Any]]] = []

    def complies(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content)["messages"])
        return said("Negative.", prompt=30)

    summary = await run_job(job, api_key=None, transport=httpx.MockTransport(complies))
    assert summary.ok == n
    assert len(asked) == n  # the re-asks only
    assert all(m[1] == {"role": "assistant", "content": "maybe"} for m in asked)
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert set(df["answer"]) == {"negative"}
    assert set(df["reasks"]) == {1}
    assert set(df["prompt_tokens"]) == {40}  # both answers, each once
    # The answers' requests; the dead connections of the stopped run are not counted, as
    # for any request of a row in progress when a run stops.
    assert set(df["attempts"]) == {2}
