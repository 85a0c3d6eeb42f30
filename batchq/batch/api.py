"""The providers' Batch API as a second path to the same output: ``export-batch`` writes a
job's pending requests as Batch-API JSONL, ``import-batch`` reads the provider's output
and error files back into the job's state folder, so the output, ``cost`` and ``status``
are the same whichever path answered a row, and a live ``run`` finishes what is missing.

An exported line (OpenAI's and Model Studio's format)::

    {"custom_id": "<row id>", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Files hold one model each (Model Studio requires it) and are split at ``max_lines``
(50,000, both providers' limit) and ``max_bytes`` (200 MB, OpenAI's limit, the smaller);
the body is the one a live run would send, without ``stream`` (a batch is not streamed).
``manifest.json`` beside them maps each file to its model, line count and rows.

A result line: ``{"custom_id", "response": {"status_code", "request_id", "body"},
"error"}``; output and error files may come in any order; a row answered ok in one file
and failed in another is ok.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batchq.answer import Checker
from batchq.config import Job, job_settings
from batchq.errors import InputError, RunStopped, UsageError
from batchq.files import cannot_write, write_atomic
from batchq.io.preflight import InputInfo, preflight, row_id
from batchq.io.reader import read_batches
from batchq.money.pricing import PriceTable, RowPricer, region_of
from batchq.output.merge import merge_output
from batchq.result import Result
from batchq.send.client import RETRY_STATUS
from batchq.send.request import build_body
from batchq.send.response import InvalidCompletion, completion_columns
from batchq.state import RowMask, StateDir, check_output, manifest_for

__all__ = [
    "ExportResult",
    "ImportResult",
    "export_batch",
    "export_rows",
    "import_batch",
    "read_into",
    "row_index",
]

#: Error lines that are not the row's answer: the batch ran out of time (OpenAI's and
#: Model Studio's code) or was cancelled before the row; with a 5xx or 429 status, as a
#: live run would retry them. Such rows stay pending.
RETRYABLE_CODES = frozenset({"batch_expired", "batch_cancelled"})
MAX_LINES = 50_000
MAX_BYTES = 200 * 1024**2
URL = "/v1/chat/completions"
EXPORT_MANIFEST = "manifest.json"
#: Imported rows a shard.
SHARD_ROWS = 10_000
_NOT_IN_A_BATCH = ("stream", "stream_options")


@dataclass
class _File:
    path: Path
    model: str
    handle: IO[bytes]
    lines: int = 0
    bytes: int = 0
    first_row: int = -1
    last_row: int = -1

    def entry(self) -> dict[str, Any]:
        names = ("model", "lines", "bytes", "first_row", "last_row")
        return {"file": self.path.name, **{name: getattr(self, name) for name in names}}


@dataclass
class ExportResult:
    folder: Path
    rows: int
    files: list[dict[str, Any]] = field(default_factory=list)
    already_done: int = 0

    @property
    def manifest(self) -> Path:
        """The export's index of its files (and the job, for ``import-batch --job``)."""
        return self.folder / EXPORT_MANIFEST


def export_batch(
    job: Job,
    folder: Path,
    *,
    max_lines: int = MAX_LINES,
    max_bytes: int = MAX_BYTES,
    command: str | None = None,
) -> ExportResult:
    """Write ``job``'s pending rows as Batch-API files into ``folder``.

    The job's state folder is opened as a run opens it: refused while a run holds its
    lock (those rows are being sent: exported, they would be paid twice), and marked with
    the job, so that ``import_batch`` into a changed job is refused as a resumed run is."""
    check_output(job)
    info = preflight(job)
    if StateDir.finished(job, info):
        return export_rows(
            job,
            info,
            folder,
            RowMask(info.total_rows, value=True),
            max_lines=max_lines,
            max_bytes=max_bytes,
        )
    state = StateDir.open(job, info, manifest=_manifest(job, info, command))
    try:
        done = state.done_mask(info.total_rows)
        return export_rows(job, info, folder, done, max_lines=max_lines, max_bytes=max_bytes)
    finally:
        state.close()


#: Which rows go into an export: (input position, id, request body, done already) -> take.
Take = Callable[[int, str, dict[str, Any], bool], bool]


def export_rows(
    job: Job,
    info: InputInfo,
    folder: Path,
    done: RowMask,
    *,
    max_lines: int,
    max_bytes: int,
    take: Take | None = None,
) -> ExportResult:
    """Write the rows not ``done`` (those ``take`` takes, when given: it is shown every
    row) as Batch-API files (and their manifest) into ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"cannot make the export folder {folder}: {e.strerror}; choose another --out-dir"
        ) from None
    result = ExportResult(folder, 0, already_done=done.count())
    try:
        _write_lines(
            job, info, folder, done, result, max_lines=max_lines, max_bytes=max_bytes, take=take
        )
        manifest = {
            "name": job.name,
            "input": str(info.path),
            "input_digest": info.digest,
            "id_column": info.id_column,
            "rows": result.rows,
            "files": result.files,
            "request": _manifest(job, info, None)["request"],
            "job": job_settings(job),
        }
        text = orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
        write_atomic(result.manifest, lambda f: f.write(text))
    except OSError as e:  # a full disk: no half-written file is left to be uploaded
        for entry in result.files:
            with contextlib.suppress(OSError):
                (folder / entry["file"]).unlink(missing_ok=True)
        raise RunStopped(
            f"{cannot_write(e, folder, str(folder))}: the Batch-API files were not written; "
            "free some space (or fix the folder) and rerun the same command"
        ) from None
    return result


def _write_lines(
    job: Job,
    info: InputInfo,
    folder: Path,
    done: RowMask,
    result: ExportResult,
    *,
    max_lines: int,
    max_bytes: int,
    take: Take | None,
) -> None:
    """The rows' lines into files of at most ``max_lines`` lines and ``max_bytes`` bytes,
    one model's a file; each file, once closed (or failed), is in ``result.files``."""
    open_files: dict[str, _File] = {}
    counts: dict[str, int] = {}
    try:
        for index, row in _rows(info):
            if take is None and done[index]:
                continue
            body, ident = build_body(row, job.request), row_id(row, info.id_column, index)
            if take is not None and not take(index, ident, body, done[index]):
                continue
            for key in _NOT_IN_A_BATCH:
                body.pop(key, None)
            line = (
                orjson.dumps({"custom_id": ident, "method": "POST", "url": URL, "body": body})
                + b"\n"
            )
            model = str(body["model"])
            file = open_files.get(model)
            if file is None or file.lines >= max_lines or file.bytes + len(line) > max_bytes:
                if file is not None:
                    _close(file, result)
                counts[model] = counts.get(model, 0) + 1
                file = open_files[model] = _open(folder, job.name, model, counts[model])
            file.handle.write(line)
            file.lines += 1
            file.bytes += len(line)
            file.first_row = index if file.first_row < 0 else file.first_row
            file.last_row = index
            result.rows += 1
    except BaseException:
        for file in open_files.values():
            with contextlib.suppress(OSError):  # what was buffered did not fit: said above
                _close(file, result)
        raise
    for file in open_files.values():
        _close(file, result)


def _open(folder: Path, name: str, model: str, number: int) -> _File:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model)
    path = folder / f"{name}-{slug}-{number:03d}.jsonl"
    return _File(path, model, path.open("wb"))


def _close(file: _File, result: ExportResult) -> None:
    if not file.handle.closed:
        try:
            file.handle.close()  # closed, even when its last flush fails
        finally:
            result.files.append(file.entry())


def _rows(info: InputInfo) -> Iterator[tuple[int, dict[str, Any]]]:
    for batch in read_batches(info.path):
        for i, row in enumerate(batch.rows):
            yield batch.start + i, row


# --- import ----------------------------------------------------------------------------


@dataclass
class ImportResult:
    imported: int
    ok: int
    error: int
    missing: int
    missing_ids: list[str]
    merged: bool
    output: Path
    repeated: int = 0  # ids answered more than once in the files
    twice: list[Path] = field(default_factory=list)  # files given more than once
    retryable: int = 0  # rows failed as a live run would retry (left pending)
    invalid: int = 0  # answers that failed the job's [answer] check (re-asked live if it may)


def import_batch(
    job: Job,
    files: list[Path],
    *,
    keep_state: bool = False,
    command: str | None = None,
    prices: Path | None = None,
) -> ImportResult:
    """Read Batch-API result files into ``job``'s state folder; merge the output when every
    row has a result. Rows the files do not answer stay pending."""
    check_output(job)
    info = preflight(job)
    rows = row_index(job, info)
    results = _read_results(files, rows)
    if job.answer is not None:
        _check_answers(Checker(job.answer), results.rows.values())
    manifest = _manifest(job, info, command)
    state = StateDir.open(job, info, manifest=manifest)
    try:
        fresh = _write_fresh(state, info, results)
        reasks = job.answer.reasks if job.answer is not None else None
        done = state.done_mask(info.total_rows, reasks=reasks)  # re-asks left: pending
        missing = [i for i, d in enumerate(done) if not d]
        merged = not missing
        if merged:
            pricer = RowPricer(PriceTable.load(prices), region_of(job.request.provider))
            merge_output(
                state,
                info,
                job.output,
                manifest=manifest,
                answers=job.answer is not None,
                costs=pricer,
            )
            if not keep_state:
                state.remove()
    finally:
        state.close()
    ok = sum(r.status == "ok" for r in fresh)
    invalid = sum(r.status == "invalid" for r in fresh)
    ids = [_id_of(rows, i) for i in missing[:5]]
    retryable = len(results.retryable - results.rows.keys())
    error = len(fresh) - ok - invalid
    return ImportResult(
        len(fresh),
        ok,
        error,
        len(missing),
        ids,
        merged,
        job.output,
        results.repeated,
        results.twice,
        retryable,
        invalid,
    )


def read_into(
    state: StateDir,
    job: Job,
    info: InputInfo,
    files: list[Path],
    rows: dict[str, tuple[int, str]],
) -> tuple[list[Result], set[int]]:
    """Read result ``files`` into the open ``state`` (``--via batch``): the rows written
    (an answer, or an error for good), and the positions failed as a live run would
    retry (left pending). ``rows`` is ``row_index(job, info)``."""
    results = _read_results(files, rows)
    if job.answer is not None:
        _check_answers(Checker(job.answer), results.rows.values())
    return _write_fresh(state, info, results), results.retryable - results.rows.keys()


def _write_fresh(state: StateDir, info: InputInfo, results: _Results) -> list[Result]:
    """Write the rows not answered ok already; those rows."""
    done_ok = state.done_mask(info.total_rows, retry=frozenset({"error"}))
    fresh = [r for r in results.rows.values() if not done_ok[r.row]]
    for start in range(0, len(fresh), SHARD_ROWS):
        state.write(fresh[start : start + SHARD_ROWS])
    return fresh


def _manifest(job: Job, info: InputInfo, command: str | None) -> dict[str, Any]:
    return manifest_for(job, info, region=region_of(job.request.provider), command=command)


def row_index(job: Job, info: InputInfo) -> dict[str, tuple[int, str]]:
    """Each row's id -> (position, requested model)."""
    index: dict[str, tuple[int, str]] = {}
    for i, row in _rows(info):
        index[row_id(row, info.id_column, i)] = (i, str(build_body(row, job.request)["model"]))
    return index


def _id_of(rows: dict[str, tuple[int, str]], position: int) -> str:
    return next(ident for ident, (i, _) in rows.items() if i == position)


@dataclass
class _Results:
    """The result row of every line, by input position, and what came more than once."""

    rows: dict[int, Result] = field(default_factory=dict)
    where: dict[int, str] = field(default_factory=dict)  # the line each row was read from
    repeated: int = 0  # ids answered more than once (the same answer, or an error and an ok)
    twice: list[Path] = field(default_factory=list)  # files given more than once, read once
    retryable: set[int] = field(default_factory=set)  # rows failed as a live run would retry


def _read_results(files: list[Path], rows: dict[str, tuple[int, str]]) -> _Results:
    """Every line of ``files``: an ok line beats an error line; two different ok answers
    for one id are refused (which is the row's?)."""
    results = _Results()
    seen: list[Path] = []
    for path in files:
        if any(path.samefile(other) for other in seen):
            results.twice.append(path)
            continue
        seen.append(path)
        try:
            handle = path.open("rb")
        except OSError as e:
            raise UsageError(f"cannot read the result file {path}: {e.strerror}") from None
        with handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    _take(
                        results,
                        _result_row(raw, rows, path=path, line=number),
                        f"{path}, line {number}",
                    )
    return results


def _take(results: _Results, line: tuple[Result, bool], where: str) -> None:
    row, retryable = line
    position = row.row
    if retryable:
        # Not the row's answer: the batch did not get to it (expired) or the service
        # failed it (5xx, 429). It stays pending, so that the next run sends it.
        results.retryable.add(position)
        return
    old = results.rows.get(position)
    if old is not None:
        results.repeated += 1
        if old.status == "ok" and row.status == "ok" and _answer(old) != _answer(row):
            raise UsageError(
                f"custom_id {row.id!r} has two different answers, at {results.where[position]} "
                f"and at {where}: import each row's result once (are these files of two "
                "batches of the same rows? import the one you want)"
            )
        if old.status == "ok" or row.status != "ok":
            return
    results.rows[position] = row
    results.where[position] = where


def _check_answers(checker: Checker, rows: Iterable[Result]) -> None:
    """Check the answers as a live run does (SPEC "Answers you can use"). One that is not
    valid is ``invalid`` with no re-ask yet: the next ``batchq run`` asks it again, live,
    from that answer, as many times as the job's ``reasks`` say."""
    for row in rows:
        if row.status != "ok":
            continue
        verdict = checker.verdict({"response": row.response, "choices": row.choices})
        if verdict.value is not None:
            row.answer, row.agreement = verdict.value, verdict.agreement
        else:
            row.invalid(verdict.reason or "it is not valid")


def _answer(row: Result) -> tuple[Any, ...]:
    return row.response, row.tool_calls, row.reasoning, row.choices


def _result_row(
    raw: bytes, rows: dict[str, tuple[int, str]], *, path: Path, line: int
) -> tuple[Result, bool]:
    """A result line's Result, and whether it is retryable (not the row's answer: the
    batch did not get to it, or the service failed it as a live run would retry)."""

    def problem(message: str) -> InputError:
        return InputError(message, path=str(path), line=line)

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise problem("this line is not JSON: is it a Batch-API result file?") from None
    if not isinstance(data, dict) or "custom_id" not in data:
        raise problem("this line has no custom_id: is it a Batch-API result file?")
    ident = str(data["custom_id"])
    if ident not in rows:
        raise problem(
            f"custom_id {ident!r} is not a row of this job's input: import the "
            "files of this job's own export"
        )
    position, model = rows[ident]
    response = _dict(data.get("response"))
    body = _dict(response.get("body"))
    status = response.get("status_code")
    if status == 200:
        try:
            completion = completion_columns(body)
        except InvalidCompletion as e:
            error = {"type": "invalid_response", "code": "invalid_response", "message": str(e)}
        else:
            result = Result.answered(
                row=position, id=ident, model=model, attempts=1, via="batch", completion=completion
            )
            result.batch_prompt_tokens = result.prompt_tokens
            result.batch_completion_tokens = result.completion_tokens
            return result, False
    else:
        error = _dict(body.get("error")) or _dict(data.get("error"))
    retryable = status in RETRY_STATUS or error.get("code") in RETRYABLE_CODES
    return Result.failed(
        row=position,
        id=ident,
        model=model,
        attempts=1,
        via="batch",
        http_status=status if isinstance(status, int) else None,
        # without a type, an answer with a status reads as a live one does (client.classify)
        error_type=str(error.get("type") or ("http_error" if status else "batch_error")),
        error_code=str(error.get("code") or status or "batch_error"),
        error_message=str(error.get("message") or "the batch gave no answer for this row"),
    ), retryable


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
