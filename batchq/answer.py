"""Answers you can use (SPEC "Answers you can use"): what a valid answer is (the job's
``[answer]``: labels, a JSON Schema or a pattern), the check of each answer against it,
the re-ask that says why one was not valid, and the vote over ``n`` choices.

Labels are read as a person reads them: case, surrounding spaces, quotes, markdown
emphasis and closing punctuation do not matter, and an answer that opens with one label
and goes on to explain is that label; one that names two labels, or none, is not valid.
A label is found where it stands as a word of its own: ``positive`` is not in
``positively``, while ``正面`` is in ``正面的评价`` (ideographs have no spaces between
words). The longest label wins where labels overlap (``very positive``, ``positive``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from batchq.errors import UsageError

__all__ = ["AnswerSpec", "Checker", "Verdict", "load_answer"]

#: Keys of the ``[answer]`` table, and the flags that set them.
KEYS = {"labels": "--labels", "json_schema": "--json-schema", "pattern": "--pattern",
        "reasks": "--reasks"}  # fmt: skip
KINDS = ("labels", "json_schema", "pattern")


@dataclass(frozen=True)
class AnswerSpec:
    """What a valid answer is: exactly one of ``labels``, ``json_schema`` (the schema
    itself; ``schema_from`` says where it was read), ``pattern``; and how many times a
    row is asked again when its answer is not valid."""

    labels: tuple[str, ...] | None = None
    json_schema: dict[str, Any] | bool | None = None
    schema_from: str | None = None
    pattern: str | None = None
    reasks: int = 1

    def identity(self) -> dict[str, Any]:
        """What a job's answers were checked against (its state's manifest). Not
        ``reasks``: more of them leaves every answer checked as it was (a run still going
        gives its invalid rows the re-asks left; --retry-invalid asks them afresh)."""
        return {
            "labels": list(self.labels) if self.labels is not None else None,
            "json_schema": self.json_schema,
            "pattern": self.pattern,
        }


def load_answer(raw: dict[str, Any], *, source: str) -> AnswerSpec | None:
    """The ``[answer]`` table (and the flags, under the same keys) as an AnswerSpec, or
    None when it sets nothing. UsageError, naming the key and what to do, for two kinds
    at once, an empty label list, a schema that is missing or not a JSON Schema, a
    pattern that does not compile, or reasks that is not a whole number >= 0."""
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise UsageError(f"{source}: unknown key [answer].{unknown[0]}; known: {', '.join(KEYS)}")
    kinds = [k for k in KINDS if raw.get(k) is not None]
    if not kinds:
        if raw.get("reasks") is not None:
            raise UsageError(
                f"{source}: [answer].reasks needs one of labels, json_schema or pattern "
                "(--labels, --json-schema, --pattern) to check answers by"
            )
        return None
    if len(kinds) > 1:
        given = " and ".join(f"{k} ({KEYS[k]})" for k in kinds)
        raise UsageError(
            f"{source}: [answer] sets {given}: a job checks its answers one way; keep one of them"
        )
    reasks = raw.get("reasks", 1)
    if isinstance(reasks, bool) or not isinstance(reasks, int) or reasks < 0:
        raise UsageError(
            f"{source}: [answer].reasks (--reasks) must be a whole number, 0 or "
            f"more, not {reasks!r}"
        )
    kind = kinds[0]
    value = raw[kind]
    if kind == "labels":
        return AnswerSpec(labels=_labels(value, source), reasks=reasks)
    if kind == "pattern":
        return AnswerSpec(pattern=_pattern(value, source), reasks=reasks)
    schema, where = _schema(value, source)
    return AnswerSpec(json_schema=schema, schema_from=where, reasks=reasks)


def _labels(value: Any, source: str) -> tuple[str, ...]:
    if isinstance(value, str):  # --labels a,b,c
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(
            f"{source}: [answer].labels must be a list of text, such as "
            '["positive", "negative"], not {value!r}'
        )
    labels = [v.strip() for v in value]
    if not labels or not all(labels):
        raise UsageError(
            f"{source}: [answer].labels (--labels) is empty or holds an empty label: give "
            'the labels, such as labels = ["positive", "negative"]'
        )
    seen: dict[str, str] = {}
    for label in labels:
        key = _fold(label)
        if not key:
            raise UsageError(
                f"{source}: the label {label!r} is only punctuation or emphasis, "
                "which answers are read without: give it a word"
            )
        if key in seen:
            raise UsageError(
                f"{source}: the labels {seen[key]!r} and {label!r} read the same "
                "(case, quotes and punctuation do not count): keep one"
            )
        seen[key] = label
    return tuple(labels)


def _pattern(value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(
            f"{source}: [answer].pattern (--pattern) must be a regular expression, not {value!r}"
        )
    try:
        re.compile(value)
    except re.error as e:
        raise UsageError(
            f"{source}: [answer].pattern {value!r} does not compile as a regular "
            f"expression: {e}; fix it (in TOML, write it in 'single quotes' so "
            "that backslashes stay as they are)"
        ) from None
    return value


def _schema(value: Any, source: str) -> tuple[dict[str, Any] | bool, str]:
    """The schema (a file's, or the inline table) and where it came from, checked as a
    JSON Schema 2020-12."""
    if isinstance(value, str | Path):
        path = Path(value)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(
                f"{source}: [answer].json_schema (--json-schema): the schema file "
                f"{path} does not exist: check the path (taken from the current "
                "folder)"
            ) from None
        except OSError as e:
            raise UsageError(
                f"{source}: cannot read the schema file {path}: {e.strerror}"
            ) from None
        except ValueError as e:
            raise UsageError(f"{source}: the schema file {path} is not JSON: {e}") from None
        where = str(path)
    elif isinstance(value, dict):
        schema, where = value, "the inline [answer.json_schema] table"
    else:
        raise UsageError(
            f"{source}: [answer].json_schema must be a file's path or an inline "
            f"table, not {value!r}"
        )
    if not isinstance(schema, dict | bool):
        raise UsageError(f"{source}: {where} is not a JSON Schema (an object): fix it")
    from jsonschema import Draft202012Validator, SchemaError  # loads only for a schema

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path) or "the top"
        raise UsageError(
            f"{source}: {where} is not a valid JSON Schema (2020-12): at {at}: "
            f"{e.message}; fix the schema"
        ) from None
    return schema, where


class Verdict(NamedTuple):
    """An answer checked: its clean value (None: not valid) and, when not valid, why;
    with ``n`` choices, the share of them that gave the value."""

    value: str | None
    reason: str | None = None
    agreement: float | None = None


class Checker:
    """Checks answers against an AnswerSpec and words the re-ask for those not valid."""

    def __init__(self, spec: AnswerSpec) -> None:
        self.spec = spec
        self._labels = _LabelReader(spec.labels) if spec.labels is not None else None
        self._validator: Any = None
        if spec.json_schema is not None:
            from jsonschema import Draft202012Validator

            self._validator = Draft202012Validator(spec.json_schema)
        self._pattern = re.compile(spec.pattern) if spec.pattern is not None else None

    def check(self, text: str | None) -> Verdict:
        """One answer's verdict."""
        if text is None or not text.strip():
            return Verdict(None, "it is empty")
        if self._labels is not None:
            return self._labels.read(text)
        if self._pattern is not None:
            stripped = text.strip()
            if self._pattern.fullmatch(stripped):
                return Verdict(stripped)
            return Verdict(None, f"it does not match the pattern {self.spec.pattern} as a whole")
        return self._json(text)

    def vote(self, texts: Sequence[str | None]) -> Verdict:
        """The verdict over ``n`` choices: the value most valid choices give (a tie: the
        label listed first, else the choice first given), and the share of all choices
        that gave it; not valid when none is (the first choice's reason)."""
        verdicts = [self.check(t) for t in texts]
        values = Counter(v.value for v in verdicts if v.value is not None)
        if not values:
            return Verdict(None, verdicts[0].reason if verdicts else "it has no choices")
        order = {label: i for i, label in enumerate(self.spec.labels or ())}
        first = {v.value: i for i, v in reversed(list(enumerate(verdicts)))}
        best = max(values, key=lambda v: (values[v], -order.get(v, 0), -first[v]))
        return Verdict(best, None, values[best] / len(texts))

    def verdict(self, completion: dict[str, Any]) -> Verdict:
        """An answer's verdict (``send.response``'s completion columns): over its choices
        when it has ``n > 1`` of them, else over its text."""
        choices = completion.get("choices")
        if choices:
            return self.vote(choices)
        return self.check(completion.get("response"))

    def reask_body(
        self, body: dict[str, Any], completion: dict[str, Any], reason: str
    ) -> dict[str, Any]:
        """The request that asks again: the same conversation, the answer (the first
        choice's text) as the assistant's, and one user message saying why it was not
        valid and what a valid one is. Every other field stays (stream, n, tools, the
        model's rules)."""
        said = {"role": "assistant", "content": completion.get("response") or ""}
        again = {"role": "user", "content": self.reask(reason)}
        return {**body, "messages": [*body["messages"], said, again]}

    def reask(self, reason: str) -> str:
        """The user message that asks again: why the answer was not valid, and what a
        valid one is."""
        if self.spec.labels is not None:
            want = (
                "Answer with exactly one of these labels and nothing else: "
                + ", ".join(self.spec.labels)
                + "."
            )
        elif self.spec.pattern is not None:
            want = (
                "Answer with text that matches this regular expression as a whole, and "
                f"nothing else: {self.spec.pattern}"
            )
        else:
            schema = json.dumps(self.spec.json_schema, ensure_ascii=False, separators=(",", ":"))
            want = f"Answer with JSON only, valid under this JSON Schema: {schema}"
        return f"That answer is not valid: {reason}. {want}"

    def _json(self, text: str) -> Verdict:
        value, problem = _parse_json(text)
        if problem is not None:
            return Verdict(None, problem)
        error = _best_error(self._validator, value)
        if error is not None:
            return Verdict(None, error)
        return Verdict(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)


def _parse_json(text: str) -> tuple[Any, str | None]:
    """The answer's JSON: the whole answer, or the one fenced block in it."""
    stripped = text.strip()
    try:
        return _loads(stripped), None
    except ValueError as e:
        whole = e
    blocks = _FENCE.findall(stripped)
    if len(blocks) > 1:
        return None, f"it holds {len(blocks)} fenced JSON blocks, not one"
    if not blocks:
        return None, f"it is not JSON ({_json_error(whole)})"
    try:
        return _loads(blocks[0]), None
    except ValueError as e:
        return None, f"its fenced block is not JSON ({_json_error(e)})"


def _loads(text: str) -> Any:
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=constant)


def _json_error(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno}, column {e.colno}"
    return str(e)


def _best_error(validator: Any, value: Any) -> str | None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    at = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"it does not match the schema: at {'$' + at}: {error.message}"


# --- labels ---------------------------------------------------------------------------

#: Quotes, brackets and emphasis around an answer or a label (not inside a word). Not
#: "-": a label may be "-1"; a bullet ("- ", "• ") is taken off as such (_BULLET).
_WRAP = "\"'`*_~“”‘’«»「」『』()[]<>#•· \t\r\n"
_BULLET = re.compile(r"^\s*[-•·]\s+")
_CLOSE = ".,;:!?。，；：！？…"


def _fold(text: str) -> str:
    """A label or an answer as it is compared: case folded, NFKC, markdown emphasis and
    wrapping quotes and closing punctuation left out."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _BULLET.sub("", re.sub(r"[*`~]+|(?<!\w)_+|_+(?!\w)", "", text))
    return text.strip(_WRAP + _CLOSE)


def _joins(char: str) -> bool:
    """Whether a character next to a label makes it part of a longer word (letters and
    digits do, ideographs and kana do not: those scripts put no spaces between words)."""
    if not char.isalnum():
        return False
    name = unicodedata.name(char, "")
    return not name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA"))


class _LabelReader:
    def __init__(self, labels: tuple[str, ...]) -> None:
        self._labels = labels
        self._by_fold = {_fold(label): label for label in labels}
        alternatives = sorted(self._by_fold, key=len, reverse=True)  # longest first
        self._find = re.compile("|".join(re.escape(a) for a in alternatives))

    def read(self, text: str) -> Verdict:
        folded = _fold(text)
        if (label := self._by_fold.get(folded)) is not None:
            return Verdict(label)
        # An opening that is one label alone, closed by a line break, a sentence's end or a
        # dash, is the answer, whatever the explanation after it names ("Neutral\nThe
        # review is neither positive nor negative."): that is how a person reads it.
        lead = _lead(folded)
        if (end := _OPENING_END.search(folded, lead)) is not None:
            opening = self._by_fold.get(_fold(folded[lead : end.start()]))
            if opening is not None:
                return Verdict(opening)
        found = [(m.start(), self._by_fold[m.group()]) for m in self._words(folded)]
        named = list(dict.fromkeys(label for _, label in found))
        if not named:
            return Verdict(None, "it is none of the labels")
        if len(named) > 1:
            return Verdict(None, f"it names more than one label ({', '.join(named)})")
        if found[0][0] not in (0, _lead(folded)):
            return Verdict(
                None, f"it does not open with the label ({named[0]}) but with other words"
            )
        return Verdict(named[0])

    def _words(self, text: str) -> list[re.Match[str]]:
        """Each label standing as a word of its own in ``text``."""
        matches = []
        at = 0
        while (m := self._find.search(text, at)) is not None:
            start, end = m.span()
            before = text[start - 1] if start else ""
            after = text[end] if end < len(text) else ""
            label = m.group()
            if (before and _joins(before) and _joins(label[0])) or (
                after and _joins(after) and _joins(label[-1])
            ):
                at = start + 1  # inside a longer word: look on from the next character
                continue
            matches.append(m)
            at = end
        return matches


_LEAD = re.compile(r"(?:[^\W\d_][\w-]*[ \t]*){1,3}:[ \t]*")
#: Where an answer's opening ends: a line break, a sentence's end, a dash.
_OPENING_END = re.compile(r"\n|[.!?](?=\s)|[。！？]|\s[—–-]\s|—")


def _lead(folded: str) -> int:
    """Where the answer proper opens: after a short lead-in such as ``answer:`` or
    ``sentiment:`` (up to three words and a colon), else at the start."""
    m = _LEAD.match(folded)
    if m is None:
        return 0
    rest = folded[m.end() :]
    return m.end() + len(rest) - len(rest.lstrip(_WRAP))
