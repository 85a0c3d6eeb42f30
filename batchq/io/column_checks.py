"""The preflight's fast path's checks of whole columns (``fastcheck.py`` reads the input
and hands each batch here): the request rules (``send.request.RULES``) as Arrow compute
over a batch's columns, with the token estimate's terms taken from ``send.request``.
Anything they cannot decide for sure raises ``Unsure``: the exact pass decides.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from batchq import arrays
from batchq.config import Job
from batchq.io.keys import RepeatFinder, TextKeys
from batchq.qwen import RANGES
from batchq.send.request import (
    CHARS_PER_TOKEN,
    FRAMING_CHARS,
    REQUEST_FIELDS,
    ROLES,
    RULES,
    RowProblem,
    build_body,
)

__all__ = ["APPLIED", "Checks", "LineChecks", "Unsure", "fixed_chars", "unknown_rules"]

#: How the fast path applies each of the request rules (``send.request.RULES``): whole
#: columns checked, or the input handed to the exact pass. A rule not here hands every
#: input over (``unknown_rules``); tests/component/test_rules_once.py breaks each rule and
#: holds both passes to it.
APPLIED: dict[str, str] = {
    "model": "the job's fields through job_body; a model column: the exact pass; each "
    "Batch-API body's model once through build_body",
    "messages": "a template, a messages column or a prompt column, or the exact pass",
    "template": "its fields are plain columns with no null (_template_fields, batch)",
    "prompt": "a text column (a null: the exact pass)",
    "message_shape": "a list of {role, content} text structs, not empty, known roles, "
    "content null only for an assistant (_text_messages, _message_chars)",
    "model_studio": "the job's fields through job_body; a row's numbers against RANGES; "
    "any other per-row field: the exact pass",
}


def unknown_rules(rules: Iterable[str] = RULES) -> set[str]:
    """The request rules the fast path does not know how to apply."""
    return set(rules) - APPLIED.keys()


_ID_TYPES = (pa.int64(), pa.string(), pa.large_string())


def _is_text(type_: pa.DataType) -> bool:
    """Arrow's three kinds of text: polars writes large_string, and string_view."""
    return bool(
        pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_string_view(type_)
    )


_PLAIN = (pa.types.is_integer, pa.types.is_floating, _is_text, pa.types.is_boolean)
#: Request fields a row may set that whole-column checks decide: numbers, ranged or not.
ROW_NUMBERS = frozenset(
    {"temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "max_tokens"}
)


class Unsure(Exception):
    """The fast path cannot pass the input: the exact pass decides."""


def fixed_chars(job: Job) -> int:
    """Characters of the prompt that do not come from the row: system, template text,
    and the framing estimate_tokens counts."""
    r = job.request
    chars = FRAMING_CHARS + (len(r.system) + FRAMING_CHARS if r.system is not None else 0)
    if r.template is not None:
        chars += sum(len(literal) for literal, *_ in string.Formatter().parse(r.template))
    return chars


class Checks:
    """The exact pass's row checks, a column at a time."""

    def __init__(
        self,
        job: Job,
        schema: pa.Schema,
        id_column: str | None,
        *,
        fixed_chars: int,
        cap: int,
        lines: bool = False,
    ) -> None:
        names = set(schema.names)
        if {"custom_id", "body"} <= names and not lines:
            raise Unsure("Batch-API lines: LineChecks")
        self._fields = sorted(names & REQUEST_FIELDS - ({"model"} if lines else set()))
        for name in self._fields:
            type_ = schema.field(name).type
            if name not in ROW_NUMBERS or not (
                pa.types.is_integer(type_)
                or (pa.types.is_floating(type_) and name != "max_tokens")
                or pa.types.is_null(type_)
            ):
                raise Unsure(f"a per-row {name} the exact pass checks")
        self._ranges = job.request.model_studio
        self._job = job
        self._id_column = id_column
        self._fixed_chars = fixed_chars
        self._cap = cap
        self._keys = RepeatFinder()  # one key a row: the int id, or its text's key
        self._text_keys = TextKeys()
        r = job.request
        self._messages = (r.template is None or lines) and "messages" in names
        if lines and not self._messages:
            raise Unsure("a Batch-API body without messages")
        if r.template is not None and not lines:
            self._sources = _template_fields(r.template)
        elif self._messages:
            self._sources = []
            _text_messages(schema.field("messages").type)
            # each message's framing is counted per message, not the one user message's
            self._fixed_chars -= FRAMING_CHARS
        elif "prompt" in names:
            self._sources = ["prompt"]
        else:
            raise Unsure("no template, no messages and no prompt column")
        for name in self._sources:
            if name not in names or not any(ok(schema.field(name).type) for ok in _PLAIN):
                raise Unsure(f"template field {name!r} is missing or not a plain column")
        if self._sources == ["prompt"] and not _is_text(schema.field("prompt").type):
            raise Unsure("prompt is not text")
        if id_column is not None:
            _check_id_column(schema, id_column)

    def batch(self, batch: pa.RecordBatch) -> None:
        chars = arrays.int64(self._fixed_chars)
        if self._messages:
            chars = pc.add(chars, _message_chars(batch.column("messages")))
        for name in self._sources:
            column = batch.column(name)
            if column.null_count:
                raise Unsure(f"a null in {name!r}")
            if self._job.limits.tpm:
                text = column if _is_text(column.type) else pc.cast(column, pa.string())
                chars = pc.add(chars, pc.utf8_length(text))
        cap = self._row_fields(batch)
        if self._job.limits.tpm and batch.num_rows:
            per_token, one = arrays.int64(CHARS_PER_TOKEN), arrays.int64(1)
            most = pc.max(pc.add(pc.add(pc.divide(chars, per_token), one), cap)).as_py()
            if most * 1.1 + 10 > self._job.limits.tpm:
                raise Unsure("a request near the TPM limit: the exact pass estimates it")
        if self._id_column is not None:
            self._add_ids(batch.column(self._id_column))

    def _add_ids(self, ids: pa.Array) -> None:
        if ids.null_count:
            raise Unsure("a null id")
        if pa.types.is_integer(ids.type):
            self._keys.add_array(ids)  # an int64 id is its own exact key
        else:
            self._keys.add_array(self._text_keys.keys(ids))

    def _row_fields(self, batch: pa.RecordBatch) -> pa.Array | pa.Scalar:
        """Check the rows' own numeric request fields as Model Studio's rules would (a
        value out of range: the exact pass says where); each row's completion cap."""
        cap: pa.Array | pa.Scalar = arrays.int64(self._cap)
        for name in self._fields:
            column = batch.column(name)
            if pa.types.is_null(column.type):
                continue
            if name == "max_tokens":
                if pc.any(pc.less_equal(column, arrays.int64(0))).as_py():
                    raise Unsure("a max_tokens of 0 or less")
                cap = pc.fill_null(pc.cast(column, pa.int64()), arrays.int64(self._cap))
            elif self._ranges and name in RANGES and column.null_count < len(column):
                low, high, low_in, high_in = RANGES[name]
                low, high = arrays.float64(low), arrays.float64(high)
                under = pc.less(column, low) if low_in else pc.less_equal(column, low)
                over = pc.greater(column, high) if high_in else pc.greater_equal(column, high)
                if pc.any(pc.or_(under, over)).as_py():
                    raise Unsure(f"a {name} outside Model Studio's range")
        return cap

    def ids_unique(self) -> None:
        """A repeated key sends the ids to the exact pass, which says which and where."""
        if self._keys.repeated():
            raise Unsure("an id hash seen twice: the exact pass checks the ids themselves")


class LineChecks(Checks):
    """Batch-API lines (``custom_id``, ``body``: SPEC "Input"): the exact pass sends each
    body as it is, with the job's fields as defaults, and ignores template and system. The
    body's columns get a row's checks (``Checks``); a per-row ``model`` too, each model
    once through the exact pass's own ``build_body``, which also gives the notes."""

    def __init__(self, job: Job, schema: pa.Schema, id_column: str | None, *, cap: int) -> None:
        body = schema.field("body").type
        if not pa.types.is_struct(body):
            raise Unsure("a body that is not an object")
        inner = pa.schema([body.field(i) for i in range(body.num_fields)])
        others = set(inner.names) - {"messages", "model"} - ROW_NUMBERS
        if others:
            raise Unsure(f"a Batch-API body with {sorted(others)[0]!r}: the exact pass")
        if "model" in inner.names and not _is_text(inner.field("model").type):
            raise Unsure("a Batch-API body's model that is not text")
        # fixed_chars: each message's framing only (no system, no template)
        super().__init__(job, inner, None, fixed_chars=FRAMING_CHARS, cap=cap, lines=True)
        if id_column is None:
            raise Unsure("no id column")
        _check_id_column(schema, id_column)
        self._lines_id = id_column
        self.notes: set[str] = set()
        self._models: set[str | None] = set()

    def batch(self, batch: pa.RecordBatch) -> None:
        body, custom = batch.column("body"), batch.column("custom_id")
        if body.null_count or custom.null_count:
            raise Unsure("a line without a body or a custom_id: not a Batch-API line")
        inner = pa.RecordBatch.from_struct_array(body)
        for name in self._fields:  # missing and null are one in Arrow, not in the body
            if inner.column(name).null_count:
                raise Unsure(f"a null or missing {name} in a body")
        models = inner.column("model") if "model" in inner.schema.names else None
        if models is not None and models.null_count:
            raise Unsure("a null or missing model in a body")
        for model in [None] if models is None else pc.unique(models).to_pylist():
            if model not in self._models:
                self._models.add(model)
                self._body_rules(model)
        super().batch(inner)
        self._add_ids(batch.column(self._lines_id))

    def _body_rules(self, model: str | None) -> None:
        """The exact pass on a body of this model (the job's fields as defaults): a
        problem there, the exact pass decides; else the note it makes."""
        body: dict[str, object] = {"messages": [{"role": "user", "content": ""}]}
        if model is not None:
            body["model"] = model
        try:
            build_body({"custom_id": "", "body": body}, self._job.request, self.notes)
        except RowProblem:
            raise Unsure("a body the rules refuse: the exact pass says where") from None


def _check_id_column(schema: pa.Schema, id_column: str) -> None:
    if id_column not in schema.names or schema.field(id_column).type not in _ID_TYPES:
        raise Unsure("the id column is missing or not int64 / text")


def _text_messages(type_: pa.DataType) -> None:
    """A ``messages`` column the fast path decides: a list of ``{role, content}`` structs
    of text (multimodal parts, tool calls, names: the exact pass)."""
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_)):
        raise Unsure("messages is not a list")
    item = type_.value_type
    if not pa.types.is_struct(item) or {item.field(i).name for i in range(item.num_fields)} != {
        "role",
        "content",
    }:
        raise Unsure("messages are not {role, content} objects")
    for name in ("role", "content"):
        if not _is_text(item.field(name).type):
            raise Unsure(f"a message's {name} is not text")


def _message_chars(column: pa.Array) -> pa.Array:
    """The exact pass's message checks, and each row's characters as estimate_tokens
    counts them (content, and 12 for each message's framing)."""
    if column.null_count or pc.min(pc.list_value_length(column)).as_py() < 1:
        raise Unsure("a null or empty messages list")
    messages = column.flatten()
    if messages.null_count:
        raise Unsure("a null message")
    role, content = messages.field("role"), messages.field("content")
    if role.null_count or not pc.all(pc.is_in(role, value_set=_ROLES)).as_py():
        raise Unsure("a message without a known role")
    if (
        content.null_count
        and pc.any(pc.and_(pc.is_null(content), pc.not_equal(role, _ASSISTANT))).as_py()
    ):
        raise Unsure("a message without content")
    lengths = pc.add(
        pc.fill_null(pc.cast(pc.utf8_length(content), pa.int64()), arrays.int64(0)),
        arrays.int64(FRAMING_CHARS),
    )
    totals = pa.concat_arrays([arrays.int64s([0]), pc.cumulative_sum(lengths)])
    offsets = pc.subtract(column.offsets, column.offsets[0])
    ends = pc.take(totals, offsets.slice(1))
    return pc.subtract(ends, pc.take(totals, offsets.slice(0, len(column))))


_ROLES = arrays.array(sorted(ROLES), pa.string())
_ASSISTANT = arrays.text("assistant")


def _template_fields(template: str) -> list[str]:
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise Unsure(f"template field {name!r} is not a plain column name")
        fields.append(name)
    return fields
