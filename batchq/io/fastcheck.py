"""The preflight's fast path: check an ordinary input in Arrow's C++, whole columns at
a time, so a million-row job starts sending in well under a second.

It answers the question the exact pass (``preflight.py``, a Python loop over every row)
answers, for the inputs where whole-column checks decide it: rows that take their text
from a template over plain columns, from a string ``prompt`` column, or from a
``messages`` column of ``{role, content}`` text messages; with per-row request fields
only where they are numbers (``temperature``, ``top_p``, ``max_tokens``, ``seed`` ...);
and Batch-API lines whose body holds text ``messages``, a ``model`` and such numbers
(their body's columns are checked as a row's would be). It never reports a problem:
whenever it sees one, or anything it cannot decide for sure (a null, a mixed column, a
NaN, bytes that are not UTF-8, a line holding two objects, a request near the TPM
limit, an id hash seen twice ...), it returns None and the exact pass runs, which says
what and where. When it returns an InputInfo, it is the one the exact pass would return
(tests/component/test_fastcheck.py holds both to that on a catalogue of inputs).
"""

from __future__ import annotations

import queue
import string
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from batchq import arrays
from batchq.config import Job
from batchq.errors import InputError
from batchq.io.keys import RepeatFinder, TextKeys
from batchq.io.reader import input_format
from batchq.io.rules import Digest, check_clash, default_id_column, digest_and_lines
from batchq.qwen import RANGES
from batchq.send.request import (
    CHARS_PER_TOKEN,
    FRAMING_CHARS,
    REQUEST_FIELDS,
    ROLES,
    RULES,
    RowProblem,
    build_body,
    completion_cap,
    job_body,
)

__all__ = ["APPLIED", "ColumnsChecked", "check_columns", "unknown_rules"]

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


CHUNK_BYTES = 4 * 1024**2  # read and parsed at a time (2.5x as fast as 1 MB chunks)
BLOCK_BYTES = 1024**2  # Arrow's block: each is parsed by one thread
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


class _Unsure(Exception):
    """The fast path cannot pass the input: the exact pass decides."""


class ColumnsChecked(NamedTuple):
    """What the exact pass would have found."""

    rows: int
    columns: tuple[tuple[str, pa.DataType | None], ...]
    id_column: str | None
    digest: str
    notes: tuple[str, ...]


def check_columns(
    job: Job, *, progress: Callable[[int], None] | None = None
) -> ColumnsChecked | None:
    """What the exact pass would find for ``job``'s input, or None when it must decide.
    ``progress`` is called with the rows read so far, after each batch."""
    try:
        return _check_columns(job, progress)
    except (_Unsure, pa.ArrowException, OSError, ValueError):
        return None


def _check_columns(job: Job, progress: Callable[[int], None] | None) -> ColumnsChecked:
    if unknown := unknown_rules():
        raise _Unsure(f"request rules the fast path does not apply: {sorted(unknown)}")
    path = job.input
    fmt = input_format(path)
    if fmt == "jsonl" and path.name.lower().endswith(".gz"):
        raise _Unsure("gzip")
    read = Digest()
    # closed on the way out, early or not: the thread reading ahead stops
    with closing(_ahead(_jsonl(path, read) if fmt == "jsonl" else _parquet(path))) as batches:
        first = next(batches, None)
        if first is None or first.num_rows == 0:
            raise _Unsure("no rows")
        schema = first.schema
        batch_lines = {"custom_id", "body"} <= set(schema.names)
        try:
            base, note = job_body(job.request)
        except RowProblem as e:
            # Batch-API bodies may each name their model (_LineChecks checks them); the cap
            # (the job's fields with the rules applied) matters only under a TPM limit.
            if not (batch_lines and e.column == "model" and not job.limits.tpm):
                raise _Unsure("the job itself has a problem") from None
            base, note = {}, None
        cap = completion_cap(base) or 0
        id_column = job.id_column or default_id_column(schema.names, batch_lines=batch_lines)
        if batch_lines:
            check: _Checks = _LineChecks(job, schema, id_column, cap=cap)
        else:
            check = _Checks(job, schema, id_column, fixed_chars=_fixed_chars(job), cap=cap)
        rows = 0
        for batch in _chain(first, batches):
            if batch.schema != schema:
                raise _Unsure("the schema changed")
            check.batch(batch)
            rows += batch.num_rows
            if progress is not None:
                progress(rows)
    check.ids_unique()
    if isinstance(check, _LineChecks):
        notes = tuple(sorted(check.notes))  # the bodies' own
    else:
        notes = (note,) if note else ()
    digest, lines = read.result() if fmt == "jsonl" else digest_and_lines(path)
    if fmt == "jsonl":
        if lines != rows:
            raise _Unsure("a blank line, or two objects on a line")
        columns = tuple((f.name, _output_type(f.type)) for f in schema)
    else:
        columns = tuple((f.name, f.type) for f in schema)
    try:
        check_clash((name for name, _ in columns), id_column, path, answers=job.answer is not None)
    except InputError:
        raise _Unsure("a column clash: the exact pass says where") from None
    return ColumnsChecked(rows, columns, id_column, digest, notes)


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def _jsonl(path: Path, digest: Digest) -> Iterator[pa.RecordBatch]:
    """The file in chunks of whole lines, each parsed by Arrow's JSON reader (threaded)
    with the schema found in the first: memory stays at a few chunks, where Arrow's own
    streaming reader ran 50-90 MB ahead on a 70-270 MB file. The bytes read are fed to
    ``digest`` on the way, so the file is read once."""
    options = pj.ReadOptions(block_size=BLOCK_BYTES, use_threads=True)
    parse: pj.ParseOptions | None = None
    for chunk in _line_chunks(path, digest):
        table = pj.read_json(pa.BufferReader(chunk), read_options=options, parse_options=parse)
        if parse is None:
            # Arrow reads date-like strings as timestamps: read those columns as text.
            fields = [
                pa.field(f.name, pa.string() if pa.types.is_timestamp(f.type) else f.type)
                for f in table.schema
            ]
            parse = pj.ParseOptions(
                explicit_schema=pa.schema(fields), unexpected_field_behavior="error"
            )
            if fields != list(table.schema):
                table = pj.read_json(
                    pa.BufferReader(chunk), read_options=options, parse_options=parse
                )
        # one batch a chunk, not one an Arrow block: each batch costs the checks ~40 calls
        for batch in table.combine_chunks().to_batches():
            batch.validate(full=True)  # strings must be UTF-8, as the exact pass demands
            _no_nan(batch)
            yield batch


def _line_chunks(path: Path, digest: Digest) -> Iterator[pa.Buffer]:
    """The file's bytes in chunks of about CHUNK_BYTES that end at a line's end. The
    part of a line a chunk cuts is read again with the next one (a seek back), not
    copied onto it."""
    with path.open("rb") as f:
        size = CHUNK_BYTES
        while data := f.read(size):
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) == size:  # a line longer than a chunk: read more
                f.seek(-len(data), 1)
                size *= 2
                continue
            if cut == 0 or not data[cut:].strip():  # the end, without a last newline
                cut = len(data)
            f.seek(cut - len(data), 1)
            digest.update(data, cut)
            size = CHUNK_BYTES
            yield pa.py_buffer(data).slice(0, cut)


_T = TypeVar("_T")


def _ahead(items: Iterator[_T], depth: int = 2) -> Generator[_T, None, None]:
    """``items``, made on a worker thread up to ``depth`` ahead of the caller. Reading,
    the digest and Arrow's parsing (which release the GIL) go on while the caller checks
    the batches before: on two cores 1 M messages rows took 0.79 s in one thread, 0.58 s so.
    Closing this generator (the caller returned early) stops the worker and closes
    ``items`` within one item."""
    stop = threading.Event()
    made: queue.Queue[tuple[bool, object]] = queue.Queue(depth)

    def put(last: bool, value: object) -> bool:
        while not stop.is_set():
            try:
                made.put((last, value), timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(False, item):
                    return
            put(True, None)
        except BaseException as e:  # handed to the caller, raised there
            put(True, e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="batchq-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            last, value = made.get()
            if last:
                if isinstance(value, BaseException):
                    raise value
                return
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


def _parquet(path: Path) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(path) as file:
        yield from file.iter_batches(batch_size=65_536)


def _no_nan(batch: pa.RecordBatch) -> None:
    """NaN and Infinity are not JSON: the exact pass refuses the line, Arrow reads them."""
    for array in _leaves(batch.columns):
        if pa.types.is_floating(array.type) and len(array):
            if pc.any(pc.is_nan(array)).as_py() or pc.any(pc.is_inf(array)).as_py():
                raise _Unsure("NaN or Infinity")
            extreme = pc.max(pc.abs(array)).as_py()
            if extreme is not None and extreme >= 2.0**63:
                raise _Unsure("an integer too big for int64 may have been read as a float")


def _leaves(arrays: list[pa.Array]) -> Iterator[pa.Array]:
    for array in arrays:
        if pa.types.is_struct(array.type):
            yield from _leaves([array.field(i) for i in range(array.type.num_fields)])
        elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            yield from _leaves([array.flatten()])
        else:
            yield array


def _output_type(type_: pa.DataType) -> pa.DataType | None:
    """The exact pass's typing of a JSONL column (see io/schema.py's ColumnKinds)."""
    if pa.types.is_null(type_) or pa.types.is_integer(type_):
        return pa.int64()
    if pa.types.is_floating(type_):
        return pa.float64()
    if pa.types.is_boolean(type_):
        return pa.bool_()
    if pa.types.is_string(type_):
        return pa.string()
    if pa.types.is_struct(type_) or pa.types.is_list(type_):
        return None
    raise _Unsure(f"a column of type {type_}")


def _fixed_chars(job: Job) -> int:
    """Characters of the prompt that do not come from the row: system, template text,
    and the framing estimate_tokens counts."""
    r = job.request
    chars = FRAMING_CHARS + (len(r.system) + FRAMING_CHARS if r.system is not None else 0)
    if r.template is not None:
        chars += sum(len(literal) for literal, *_ in string.Formatter().parse(r.template))
    return chars


class _Checks:
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
            raise _Unsure("Batch-API lines: _LineChecks")
        self._fields = sorted(names & REQUEST_FIELDS - ({"model"} if lines else set()))
        for name in self._fields:
            type_ = schema.field(name).type
            if name not in ROW_NUMBERS or not (
                pa.types.is_integer(type_)
                or (pa.types.is_floating(type_) and name != "max_tokens")
                or pa.types.is_null(type_)
            ):
                raise _Unsure(f"a per-row {name} the exact pass checks")
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
            raise _Unsure("a Batch-API body without messages")
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
            raise _Unsure("no template, no messages and no prompt column")
        for name in self._sources:
            if name not in names or not any(ok(schema.field(name).type) for ok in _PLAIN):
                raise _Unsure(f"template field {name!r} is missing or not a plain column")
        if self._sources == ["prompt"] and not _is_text(schema.field("prompt").type):
            raise _Unsure("prompt is not text")
        if id_column is not None:
            _check_id_column(schema, id_column)

    def batch(self, batch: pa.RecordBatch) -> None:
        chars = arrays.int64(self._fixed_chars)
        if self._messages:
            chars = pc.add(chars, _message_chars(batch.column("messages")))
        for name in self._sources:
            column = batch.column(name)
            if column.null_count:
                raise _Unsure(f"a null in {name!r}")
            if self._job.limits.tpm:
                text = column if _is_text(column.type) else pc.cast(column, pa.string())
                chars = pc.add(chars, pc.utf8_length(text))
        cap = self._row_fields(batch)
        if self._job.limits.tpm and batch.num_rows:
            per_token, one = arrays.int64(CHARS_PER_TOKEN), arrays.int64(1)
            most = pc.max(pc.add(pc.add(pc.divide(chars, per_token), one), cap)).as_py()
            if most * 1.1 + 10 > self._job.limits.tpm:
                raise _Unsure("a request near the TPM limit: the exact pass estimates it")
        if self._id_column is not None:
            self._add_ids(batch.column(self._id_column))

    def _add_ids(self, ids: pa.Array) -> None:
        if ids.null_count:
            raise _Unsure("a null id")
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
                    raise _Unsure("a max_tokens of 0 or less")
                cap = pc.fill_null(pc.cast(column, pa.int64()), arrays.int64(self._cap))
            elif self._ranges and name in RANGES and column.null_count < len(column):
                low, high, low_in, high_in = RANGES[name]
                low, high = arrays.float64(low), arrays.float64(high)
                under = pc.less(column, low) if low_in else pc.less_equal(column, low)
                over = pc.greater(column, high) if high_in else pc.greater_equal(column, high)
                if pc.any(pc.or_(under, over)).as_py():
                    raise _Unsure(f"a {name} outside Model Studio's range")
        return cap

    def ids_unique(self) -> None:
        """A repeated key sends the ids to the exact pass, which says which and where."""
        if self._keys.repeated():
            raise _Unsure("an id hash seen twice: the exact pass checks the ids themselves")


class _LineChecks(_Checks):
    """Batch-API lines (``custom_id``, ``body``: SPEC "Input"): the exact pass sends each
    body as it is, with the job's fields as defaults, and ignores template and system. The
    body's columns get a row's checks (``_Checks``); a per-row ``model`` too, each model
    once through the exact pass's own ``build_body``, which also gives the notes."""

    def __init__(self, job: Job, schema: pa.Schema, id_column: str | None, *, cap: int) -> None:
        body = schema.field("body").type
        if not pa.types.is_struct(body):
            raise _Unsure("a body that is not an object")
        inner = pa.schema([body.field(i) for i in range(body.num_fields)])
        others = set(inner.names) - {"messages", "model"} - ROW_NUMBERS
        if others:
            raise _Unsure(f"a Batch-API body with {sorted(others)[0]!r}: the exact pass")
        if "model" in inner.names and not _is_text(inner.field("model").type):
            raise _Unsure("a Batch-API body's model that is not text")
        # fixed_chars: each message's framing only (no system, no template)
        super().__init__(job, inner, None, fixed_chars=FRAMING_CHARS, cap=cap, lines=True)
        if id_column is None:
            raise _Unsure("no id column")
        _check_id_column(schema, id_column)
        self._lines_id = id_column
        self.notes: set[str] = set()
        self._models: set[str | None] = set()

    def batch(self, batch: pa.RecordBatch) -> None:
        body, custom = batch.column("body"), batch.column("custom_id")
        if body.null_count or custom.null_count:
            raise _Unsure("a line without a body or a custom_id: not a Batch-API line")
        inner = pa.RecordBatch.from_struct_array(body)
        for name in self._fields:  # missing and null are one in Arrow, not in the body
            if inner.column(name).null_count:
                raise _Unsure(f"a null or missing {name} in a body")
        models = inner.column("model") if "model" in inner.schema.names else None
        if models is not None and models.null_count:
            raise _Unsure("a null or missing model in a body")
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
            raise _Unsure("a body the rules refuse: the exact pass says where") from None


def _check_id_column(schema: pa.Schema, id_column: str) -> None:
    if id_column not in schema.names or schema.field(id_column).type not in _ID_TYPES:
        raise _Unsure("the id column is missing or not int64 / text")


def _text_messages(type_: pa.DataType) -> None:
    """A ``messages`` column the fast path decides: a list of ``{role, content}`` structs
    of text (multimodal parts, tool calls, names: the exact pass)."""
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_)):
        raise _Unsure("messages is not a list")
    item = type_.value_type
    if not pa.types.is_struct(item) or {item.field(i).name for i in range(item.num_fields)} != {
        "role",
        "content",
    }:
        raise _Unsure("messages are not {role, content} objects")
    for name in ("role", "content"):
        if not _is_text(item.field(name).type):
            raise _Unsure(f"a message's {name} is not text")


def _message_chars(column: pa.Array) -> pa.Array:
    """The exact pass's message checks, and each row's characters as estimate_tokens
    counts them (content, and 12 for each message's framing)."""
    if column.null_count or pc.min(pc.list_value_length(column)).as_py() < 1:
        raise _Unsure("a null or empty messages list")
    messages = column.flatten()
    if messages.null_count:
        raise _Unsure("a null message")
    role, content = messages.field("role"), messages.field("content")
    if role.null_count or not pc.all(pc.is_in(role, value_set=_ROLES)).as_py():
        raise _Unsure("a message without a known role")
    if (
        content.null_count
        and pc.any(pc.and_(pc.is_null(content), pc.not_equal(role, _ASSISTANT))).as_py()
    ):
        raise _Unsure("a message without content")
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
            raise _Unsure(f"template field {name!r} is not a plain column name")
        fields.append(name)
    return fields
