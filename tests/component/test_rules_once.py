"""Every request rule is declared once (``send.request.RULES``): each is broken here by
one input that is otherwise ordinary, and the two passes of the preflight are held to
it: the exact pass names the rule's problem, and the fast path does not pass the input
(it hands it over). A rule added to the declaration that the fast path does not list
hands every input over until it does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchq.config import load_job
from batchq.errors import InputError
from batchq.io.column_checks import APPLIED, unknown_rules
from batchq.io.fastcheck import check_columns
from batchq.io.preflight import exact_preflight
from batchq.send.request import RULES, RowProblem, build_body, estimate_tokens


def rows(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review {i}", **extra} for i in range(n)]


def broken(rows: list[dict[str, Any]], at: int, **fields: Any) -> list[dict[str, Any]]:
    return [{**r, **fields} if i == at else r for i, r in enumerate(rows)]


TEMPLATE = {"template": "Review: {text}", "model": "qwen-plus"}
# rule: (rows, job keys, what the exact pass says)
BROKEN: dict[str, tuple[list[dict[str, Any]], dict[str, Any], str]] = {
    "model": (rows(40), {"template": "Review: {text}"}, "no model"),
    "messages": (rows(40), {"model": "qwen-plus"}, "the row has no messages"),
    "template": (broken(rows(40), 17, text=None), TEMPLATE, "column 'text' is null"),
    "prompt": (
        [{"id": f"r{i}", "prompt": i if i == 9 else f"p{i}"} for i in range(40)],
        {"model": "qwen-plus"},
        "prompt must be a string",
    ),
    "message_shape": (
        [
            {"id": f"r{i}", "messages": [{"role": "robot" if i == 5 else "user", "content": "x"}]}
            for i in range(40)
        ],
        {"model": "qwen-plus"},
        "unknown role 'robot'",
    ),
    "model_studio": (broken(rows(40), 30, temperature=2.5), TEMPLATE, "temperature"),
}


def test_every_declared_rule_is_broken_here_and_known_to_the_fast_path() -> None:
    assert set(BROKEN) == set(RULES)
    assert set(APPLIED) == set(RULES)
    assert unknown_rules() == set()


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_both_passes_hold_each_rule(rule: str, tmp_path: Path) -> None:
    data, keys, said = BROKEN[rule]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    job = load_job(None, overrides={"input": str(path), **keys})
    assert check_columns(job) is None, "the fast path passed an input that breaks a rule"
    with pytest.raises(InputError, match=said) as raised:
        exact_preflight(job)
    assert raised.value.line is not None
    problems = []
    for row in data:
        try:
            build_body(row, job.request)
        except RowProblem as e:
            problems.append(e.rule)
    assert problems
    assert set(problems) == {rule}


def test_a_rule_the_fast_path_does_not_know_hands_every_input_over() -> None:
    assert unknown_rules([*RULES, "a rule added later"]) == {"a rule added later"}


def test_the_estimate_is_one_for_both_passes(tmp_path: Path) -> None:
    """Rows whose estimate is just under a TPM limit pass the fast path; just over, it
    hands them over and the exact pass refuses the row that could never be sent."""
    text = "x" * 300
    body = build_body(
        {"prompt": text},
        load_job(
            None, overrides={"input": "x.jsonl", "model": "qwen-plus", "max_tokens": 10}
        ).request,
    )
    need = estimate_tokens(body) + 10
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": text}) + "\n" for i in range(20)))
    fits = {"input": str(path), "model": "qwen-plus", "max_tokens": 10, "tpm": need * 1.2 + 10}
    assert check_columns(load_job(None, overrides=fits)) is not None
    over = {**fits, "tpm": need - 1}
    assert check_columns(load_job(None, overrides=over)) is None
    with pytest.raises(InputError, match="more than the whole TPM limit"):
        exact_preflight(load_job(None, overrides=over))
