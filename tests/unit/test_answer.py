"""What a valid answer is: labels read leniently, JSON under a schema, patterns; the
[answer] table's mistakes; the vote over choices and the re-ask's words."""

from __future__ import annotations

import re
from typing import Any

import pytest

from batchq.answer import AnswerSpec, Checker, load_answer
from batchq.errors import UsageError

SENTIMENT = Checker(AnswerSpec(labels=("positive", "negative", "neutral")))

#: answer -> the label it reads as (None: not valid)
READS = {
    "positive": "positive",
    "**Positive.**": "positive",
    "  'Neutral'  ": "neutral",
    "`negative`": "negative",
    "_Negative_!": "negative",
    "NEGATIVE": "negative",
    "“Positive”": "positive",
    "Negative — the battery died": "negative",
    "positive\n\nBecause it works as it says.": "positive",
    "Sentiment: **negative**": "negative",
    "Answer: neutral.": "neutral",
    "- positive": "positive",
    "positive or negative": None,
    "Negative, or maybe positive": None,
    "maybe": None,
    "": None,
    "   \n": None,
    "positively great": None,  # a label is a word of its own
    "The review is positive": None,  # it does not open with the label
    "non-positive": None,
    # Real models' label-then-explanation answers (Qwen2.5-1.5B on llama.cpp): an opening
    # that is one label alone is the answer, whatever its explanation names.
    "Neutral\nThe review is neutral because it does not express strong positive or "
    "negative sentiment.": "neutral",
    "Label: neutral.\nIt is neither positive nor negative.": "neutral",
    "**Neutral** — neither praise nor a complaint, so not positive or negative": "neutral",
    "Neutral.\n\nThe review is not negative.": "neutral",
    "NEUTRAL.\nnot positive": "neutral",
    "neutral.\n": "neutral",
    "Negative. It is not positive at all.": "negative",
    "Positive - though not without a negative or two": "positive",
    # ...and what stays not valid: two labels in the opening, a hedge, a long lead-in.
    "Negative, or maybe positive.\nHard to say.": None,
    "Positive or neutral": None,
    "Positive or neutral.\nIt is mostly good.": None,
    "The review, all things considered, reads as: neutral": None,
    "Overall the tone here is neutral.\nNot positive.": None,
}


@pytest.mark.parametrize(("text", "label"), READS.items(), ids=[repr(t) for t in READS])
def test_labels_are_read_as_a_person_reads_them(text: str, label: str | None) -> None:
    verdict = SENTIMENT.check(text)
    assert verdict.value == label
    assert (verdict.reason is None) == (label is not None)


def test_labels_with_spaces_and_other_scripts() -> None:
    checker = Checker(AnswerSpec(labels=("Very Positive", "positive", "正面", "负面")))
    assert checker.check("very positive!").value == "Very Positive"  # as written in labels
    assert checker.check("Positive").value == "positive"  # the longest wins where they overlap
    assert checker.check("正面的评价").value == "正面"  # no spaces between words there
    assert checker.check("答案：负面。").value == "负面"
    assert checker.check("very positive, not just positive").value is None


def test_numbers_as_labels() -> None:
    checker = Checker(AnswerSpec(labels=("-1", "0", "1")))
    assert [checker.check(t).value for t in ["-1", "**1**.", "0 (neutral)", "-1 or 1"]] == [
        "-1",
        "1",
        "0",
        None,
    ]


def test_reasons_say_why() -> None:
    assert SENTIMENT.check("positive or negative").reason == (
        "it names more than one label (positive, negative)"
    )
    assert SENTIMENT.check("maybe").reason == "it is none of the labels"
    assert SENTIMENT.check(None).reason == "it is empty"


def test_json_answers() -> None:
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    checker = Checker(AnswerSpec(json_schema=schema))
    assert checker.check(' {"a": 1,  "b": "é"} ').value == '{"a":1,"b":"é"}'
    assert checker.check('Here it is:\n```json\n{"a": 2}\n```').value == '{"a":2}'
    assert checker.check('```\n{"a": 3}\n```').value == '{"a":3}'
    assert checker.check('```json\n{"a": 1}\n```\n```json\n{"a": 2}\n```').reason == (
        "it holds 2 fenced JSON blocks, not one"
    )
    assert checker.check('{"a": NaN}').value is None
    assert checker.check('{"a": "x"}').reason == (
        "it does not match the schema: at $.a: 'x' is not of type 'integer'"
    )
    assert checker.check("{'a': 1}").reason.startswith("it is not JSON (")  # type: ignore[union-attr]


def test_patterns_match_the_whole_stripped_answer() -> None:
    checker = Checker(AnswerSpec(pattern=r"\d{1,3}"))
    assert checker.check(" 42\n").value == "42"
    assert checker.check("4242").value is None
    assert checker.check("42 apples").value is None


def test_the_vote_over_choices() -> None:
    vote = SENTIMENT.vote
    assert vote(["positive", "Negative.", "positive!", "hmm"]) == ("positive", None, 0.5)
    assert vote(["neutral", "negative"]).value == "negative"  # a tie: the label listed first
    # each choice read the same way: an opening label line is that label
    explained = vote(["Neutral\nNot positive, not negative.", "neutral", "Positive or neutral"])
    assert (explained.value, explained.agreement) == ("neutral", pytest.approx(2 / 3))
    assert vote(["hmm", "maybe"]) == (None, "it is none of the labels", None)


def test_the_reask_says_why_and_what_is_valid() -> None:
    assert SENTIMENT.reask("it is empty") == (
        "That answer is not valid: it is empty. Answer with exactly one of these labels and "
        "nothing else: positive, negative, neutral."
    )
    body = {"model": "m", "n": 2, "messages": [{"role": "user", "content": "q"}]}
    again = SENTIMENT.reask_body(body, {"response": None}, "it is empty")
    assert again["n"] == 2
    assert again["messages"][1:] == [
        {"role": "assistant", "content": ""},
        {"role": "user", "content": SENTIMENT.reask("it is empty")},
    ]
    assert body["messages"] == [{"role": "user", "content": "q"}]  # not changed


MISTAKES: dict[str, tuple[dict[str, Any], str]] = {
    "two kinds": ({"labels": ["a"], "json_schema": {}}, "sets labels (--labels) and json_schema"),
    "empty labels": ({"labels": []}, "is empty or holds an empty label"),
    "a blank label": ({"labels": ["a", " "]}, "is empty or holds an empty label"),
    "not a list": ({"labels": 3}, "must be a list of text"),
    "labels that read the same": ({"labels": ["Yes", "yes."]}, "read the same"),
    "only punctuation": ({"labels": ["a", "**"]}, "only punctuation"),
    "bad pattern": ({"pattern": "a("}, "does not compile"),
    "not a schema": ({"json_schema": {"type": "objekt"}}, "is not a valid JSON Schema"),
    "schema file missing": ({"json_schema": "missing.json"}, "does not exist"),
    "reasks alone": ({"reasks": 1}, "needs one of labels"),
    "reasks not a number": ({"labels": ["a"], "reasks": "2"}, "must be a whole number"),
    "unknown key": ({"label": ["a"]}, "unknown key [answer].label"),
}


@pytest.mark.parametrize(("raw", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_answer_table_mistakes_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match="job.toml: .*" + re.escape(message)):
        load_answer(raw, source="job.toml")


def test_labels_from_the_flag_and_reasks() -> None:
    spec = load_answer({"labels": "positive, negative ,neutral", "reasks": 0}, source="flags")
    assert spec == AnswerSpec(labels=("positive", "negative", "neutral"), reasks=0)
    assert load_answer({}, source="flags") is None
