"""The simulator's Batch API: ``/files`` and ``/batches`` as OpenAI and Model Studio serve
them (under ``/v1`` and ``/compatible-mode/v1``), answered from memory.

A batch is ``validating`` when created, ``in_progress`` (its ``request_counts`` growing)
until ``batch_seconds`` have passed, then ``completed`` with an output file and, when a
line failed, an error file. Its lines are answered as ``POST /chat/completions`` would
answer them, one model a file (two models: the batch ``failed`` validation, with
``errors``). ``batch_fail_lines`` of the lines fail with a 500 (a live run would retry
them); a message with the moderation marker is refused with a 400. With
``batch_expire`` a batch ends ``expired`` half-done: its other lines are
``batch_expired`` error lines. A cancelled batch keeps what it finished. The limits
are the provider's, by path: ``/compatible-mode/`` is Model Studio's (500 MB a file, a
window of 24h to 336h), anything else OpenAI's (200 MB, 24h).

``stall`` makes the first step of a kind (``upload``, ``create``, ``download``) answer
only after ``stall_s`` once done, so that a test can kill the client between the provider's doing
and the client's recording of it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from batchq.batch.rules import MODEL_STUDIO, OPENAI, BatchRules, window_hours
from batchq.errors import UsageError
from batchq.simulator.content import MODERATION_MARKER, completion, refusal, reply_for
from batchq.simulator.ledger import Ledger

if TYPE_CHECKING:
    from batchq.simulator.server import SimConfig

__all__ = ["BatchService", "BatchStats"]

_TERMINAL = ("completed", "failed", "expired", "cancelled")
_PREFIX = r"/{prefix:(?:.*/)?}v1"


@dataclass
class BatchStats:
    """What the Batch API saw: each kind of call, counted."""

    calls: Counter[str] = field(default_factory=Counter)

    @property
    def uploads(self) -> int:
        return self.calls["upload"]

    @property
    def creates(self) -> int:
        return self.calls["create"]

    @property
    def deletes(self) -> int:
        return self.calls["delete"]


@dataclass
class _Batch:
    data: dict[str, Any]
    lines: list[dict[str, Any]]
    started: float
    model_studio: bool
    finished: bool = False


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return _json(body, status)


def _rules(request: web.Request) -> BatchRules:
    return MODEL_STUDIO if "/compatible-mode/" in request.path else OPENAI


class BatchService:
    """The files and batches, their routes on ``app``, and what they saw."""

    def __init__(self, config: SimConfig, app: web.Application, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self.stats = BatchStats()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self._rng = random.Random(config.seed)
        routes = app.router
        routes.add_post(_PREFIX + "/files", self.upload)
        routes.add_get(_PREFIX + "/files", self.list_files)
        routes.add_get(_PREFIX + "/files/{id}", self.get_file)
        routes.add_get(_PREFIX + "/files/{id}/content", self.content)
        routes.add_delete(_PREFIX + "/files/{id}", self.delete)
        routes.add_post(_PREFIX + "/batches", self.create)
        routes.add_get(_PREFIX + "/batches", self.list_batches)
        routes.add_get(_PREFIX + "/batches/{id}", self.get_batch)
        routes.add_post(_PREFIX + "/batches/{id}/cancel", self.cancel)

    def _denied(self, request: web.Request) -> web.Response | None:
        key = self.config.api_key
        if key and request.headers.get("Authorization", "") != f"Bearer {key}":
            return _error(401, "invalid_api_key", "Incorrect API key provided.")
        return None

    async def _stall(self, step: str) -> None:
        """The first ``step`` of the kind ``stall`` names answers ``stall_s`` late."""
        if self.config.stall == step and self.stats.calls[step] == 1:
            await asyncio.sleep(self.config.stall_s)

    # --- files -------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or purpose != "batch":
            if isinstance(upload, web.FileField):
                upload.file.close()
            return _error(400, "invalid_parameter", "a file and purpose=batch are required")
        with upload.file:
            content = upload.file.read()
        rules = _rules(request)
        if len(content) > rules.max_bytes:
            return _error(400, "invalid_file", f"the file is over {rules.max_bytes} bytes")
        if content.count(b"\n") > rules.max_lines:
            return _error(400, "invalid_file", f"the file has over {rules.max_lines} lines")
        self.stats.calls["upload"] += 1
        ident = f"file-sim-{next(self._ids)}"
        self.files[ident] = {
            "id": ident,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": "batch",
            "status": "processed",
        }
        self.contents[ident] = content
        await self._stall("upload")
        return _json(self.files[ident])

    async def list_files(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        self.stats.calls["list_files"] += 1
        purpose = request.query.get("purpose")
        data = [f for f in self.files.values() if purpose in (None, f["purpose"])]
        return _json({"object": "list", "data": data[::-1], "has_more": False})

    async def get_file(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        file = self.files.get(request.match_info["id"])
        return _json(file) if file else _error(404, "not_found", "No such file.")

    async def content(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        ident = request.match_info["id"]
        if ident not in self.contents:
            return _error(404, "not_found", "No such file.")
        self.stats.calls["download"] += 1
        await self._stall("download")
        return web.Response(body=self.contents[ident], content_type="application/octet-stream")

    async def delete(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        ident = request.match_info["id"]
        if self.files.pop(ident, None) is None:
            return _error(404, "not_found", "No such file.")
        self.contents.pop(ident, None)
        self.stats.calls["delete"] += 1
        return _json({"id": ident, "object": "file", "deleted": True})

    # --- batches -----------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.read())
            file_id, window = str(body["input_file_id"]), str(body["completion_window"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(
                400, "invalid_parameter", "input_file_id and completion_window are required"
            )
        if body.get("endpoint") != "/v1/chat/completions":
            return _error(400, "invalid_parameter", "endpoint must be /v1/chat/completions")
        try:
            hours = window_hours(window, _rules(request))
        except UsageError:
            return _error(400, "invalid_parameter", f"completion_window {window} is not valid")
        if file_id not in self.contents:
            return _error(404, "not_found", f"No such file: {file_id}.")
        self.stats.calls["create"] += 1
        now = int(time.time())
        lines = [orjson.loads(x) for x in self.contents[file_id].splitlines() if x.strip()]
        ident = f"batch_sim_{next(self._ids)}"
        data = {
            "id": ident,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + hours * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata") or {},
        }
        self.batches[ident] = _Batch(data, lines, time.monotonic(), _rules(request) is MODEL_STUDIO)
        await self._stall("create")
        return _json(data)

    async def list_batches(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        self.stats.calls["list_batches"] += 1
        data = [self._advance(b) for b in self.batches.values()][::-1]
        return _json({"object": "list", "data": data, "has_more": False})

    async def get_batch(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "not_found", "No such batch.")
        self.stats.calls["poll"] += 1
        return _json(self._advance(batch))

    async def cancel(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "not_found", "No such batch.")
        self.stats.calls["cancel"] += 1
        data = self._advance(batch)
        if data["status"] not in _TERMINAL:
            self._finish(batch, "cancelled", done=self._share_done(batch))
        return _json(batch.data)

    # --- the batch's life ---------------------------------------------------------------

    def _share_done(self, batch: _Batch) -> float:
        seconds = max(self.config.batch_seconds, 1e-6)
        return min(1.0, (time.monotonic() - batch.started) / seconds)

    def _advance(self, batch: _Batch) -> dict[str, Any]:
        """The batch as of now: validated, in progress, or finished."""
        data = batch.data
        if batch.finished:
            return data
        models = {str(x.get("body", {}).get("model")) for x in batch.lines}
        if len(models) > 1 or self.config.batch_invalid:
            data["errors"] = {
                "object": "list",
                "data": [
                    {
                        "code": "model_mismatch",
                        "line": None,
                        "param": "body.model",
                        "message": "All requests in a batch file must use the same model.",
                    }
                ],
            }
            self._finish(batch, "failed", done=0.0)
            return data
        share = self._share_done(batch)
        if share >= 1.0:
            self._finish(
                batch,
                "expired" if self.config.batch_expire else "completed",
                done=0.5 if self.config.batch_expire else 1.0,
            )
            return data
        data["status"] = "in_progress"
        data["in_progress_at"] = data["in_progress_at"] or int(time.time())
        reached = int(len(batch.lines) * share)
        data["request_counts"]["completed"] = reached
        return data

    def _finish(self, batch: _Batch, status: str, *, done: float) -> None:
        """End ``batch`` as ``status``, its first ``done`` share of lines answered."""
        data, now = batch.data, int(time.time())
        batch.finished = True
        data["status"] = status
        data[f"{status}_at"] = now
        if status == "failed":
            return
        reached = int(len(batch.lines) * done)
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        for number, line in enumerate(batch.lines):
            if number >= reached:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                err.append(self._error_line(line, None, code, f"the batch was {status} first"))
                continue
            answer = self._answer(line)
            (out if answer["response"]["status_code"] == 200 else err).append(answer)
        data["request_counts"].update(completed=len(out), failed=len(err))
        for kind, lines in (("output", out), ("error", err)):
            if lines:
                ident = f"file-sim-{next(self._ids)}"
                content = b"".join(orjson.dumps(x) + b"\n" for x in lines)
                self.files[ident] = {
                    "id": ident,
                    "object": "file",
                    "bytes": len(content),
                    "created_at": now,
                    "filename": f"{data['id']}_{kind}.jsonl",
                    "purpose": "batch_output",
                    "status": "processed",
                }
                self.contents[ident] = content
                data[f"{kind}_file_id"] = ident

    def _answer(self, line: dict[str, Any]) -> dict[str, Any]:
        body = dict(line.get("body") or {})
        ident = f"batch_req_{next(self._ids)}"
        try:
            reply = reply_for(body["messages"])
        except (KeyError, TypeError, AttributeError):
            return self._error_line(line, 400, "invalid_parameter_error", "no messages")
        if MODERATION_MARKER in reply:
            return self._error_line(
                line, 400, "data_inspection_failed", "Input data may contain inappropriate content."
            )
        if (refused := refusal(body)) is not None:
            return self._error_line(line, 400, "invalid_parameter_error", refused)
        if self._rng.random() < self.config.batch_fail_lines:
            return self._error_line(line, 500, "internal_error", "An internal error occurred.")
        whole = completion(body, f"chatcmpl-batch-{ident}", per_char=self.config.tokens_per_char)
        self.ledger.add("batch", body, 200, reply, whole["usage"])
        return {
            "id": ident,
            "custom_id": line.get("custom_id"),
            "error": None,
            "response": {"status_code": 200, "request_id": ident, "body": whole},
        }

    def _error_line(
        self, line: dict[str, Any], status: int | None, code: str, message: str
    ) -> dict[str, Any]:
        ident = f"batch_req_{next(self._ids)}"
        self.ledger.add("batch", dict(line.get("body") or {}), status or 0, "")  # unbilled
        error = {"code": code, "message": message}
        response = None
        if status is not None:  # the body a live request gets (type, param and all)
            body = {"error": {"message": message, "type": code, "param": None, "code": code}}
            response = {"status_code": status, "request_id": ident, "body": body}
        return {
            "id": ident,
            "custom_id": line.get("custom_id"),
            "response": response,
            "error": error,
        }
