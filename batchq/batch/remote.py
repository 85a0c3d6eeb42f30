"""The provider's ``/files`` and ``/batches`` (OpenAI's wire API, which Model Studio speaks
under ``compatible-mode/v1``), over httpx.

A call the service could not answer (a dropped connection, a timeout, 429, 5xx) is tried
again with backoff, up to ATTEMPTS times; the caller's journal makes a retried upload
or create safe (it looks for what a lost answer did before doing it again). Any other
refusal is a RunStopped (401 / 403: the key; 400: what the provider said), its message
never holding the key.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from batchq.errors import RunStopped
from batchq.files import cannot_write
from batchq.send.client import redact

__all__ = ["Remote"]

ATTEMPTS = 6
TIMEOUT_S = 300.0
_Build = Callable[[AsyncExitStack], httpx.Request]
#: Pages of ``GET /files`` and ``GET /batches`` read, at most, when looking for one.
MAX_PAGES = 20


class Remote:
    """One provider's files and batches, at ``base_url`` (…/v1 or …/compatible-mode/v1)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = anyio.sleep,
    ) -> None:
        headers = {"User-Agent": "batchq"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._key = api_key
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=TIMEOUT_S,
            transport=transport,
        )
        self._sleep = sleep

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    # --- files -------------------------------------------------------------------------

    async def upload(self, path: Path, name: str) -> dict[str, Any]:
        """Upload ``path`` as ``name`` with ``purpose=batch``: the file object."""

        def request(stack: AsyncExitStack) -> httpx.Request:
            handle = stack.enter_context(path.open("rb"))
            files = {"file": (name, handle, "application/jsonl")}
            return self._http.build_request("POST", "files", data={"purpose": "batch"}, files=files)

        return orjson.loads(await self._call(request, f"uploading {name}"))  # type: ignore[no-any-return]

    async def find_file(self, name: str) -> dict[str, Any] | None:
        """The newest batch file named ``name``, if the provider lists one."""
        async for file in self._pages("files", {"purpose": "batch"}, "listing files"):
            if file.get("filename") == name:
                return file
        return None

    async def download(self, file_id: str, path: Path) -> None:
        """The content of ``file_id`` into ``path``, streamed, whole or not at all."""
        await self._call(self._get(f"files/{file_id}/content"), f"downloading {file_id}", into=path)

    async def delete(self, file_id: str) -> None:
        await self._call(
            lambda _: self._http.build_request("DELETE", f"files/{file_id}"),
            f"deleting {file_id}",
            missing_ok=True,
        )

    # --- batches -----------------------------------------------------------------------

    async def create(self, file_id: str, window: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": window,
            "metadata": metadata,
        }

        def request(_: AsyncExitStack) -> httpx.Request:
            return self._http.build_request("POST", "batches", json=body)

        return orjson.loads(await self._call(request, f"creating a batch of {file_id}"))  # type: ignore[no-any-return]

    async def find_batch(self, metadata: dict[str, str]) -> dict[str, Any] | None:
        """The newest batch whose metadata holds every item of ``metadata``."""
        async for batch in self._pages("batches", {}, "listing batches"):
            held = batch.get("metadata") or {}
            if all(held.get(k) == v for k, v in metadata.items()):
                return batch
        return None

    async def batch(self, batch_id: str) -> dict[str, Any] | None:
        """The batch ``batch_id``; None when the provider does not know it (404)."""
        content = await self._call(
            self._get(f"batches/{batch_id}"), f"reading batch {batch_id}", missing_ok=True
        )
        return orjson.loads(content) if content else None

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        def request(_: AsyncExitStack) -> httpx.Request:
            return self._http.build_request("POST", f"batches/{batch_id}/cancel")

        return orjson.loads(await self._call(request, f"cancelling batch {batch_id}"))  # type: ignore[no-any-return]

    # --- the wire ----------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> _Build:
        return lambda _: self._http.build_request("GET", path, params=params)

    async def _pages(
        self, path: str, params: dict[str, Any], what: str
    ) -> AsyncIterator[dict[str, Any]]:
        after = None
        for _ in range(MAX_PAGES):
            query = {**params, "limit": 100, **({"after": after} if after else {})}
            page = orjson.loads(await self._call(self._get(path, query), what))
            data = page.get("data") or []
            for item in data:
                yield item
            if not page.get("has_more") or not data:
                return
            after = data[-1].get("id")

    async def _call(
        self, request: _Build, what: str, *, missing_ok: bool = False, into: Path | None = None
    ) -> bytes:
        """Send the request ``request`` builds (afresh for each attempt, its files open in
        the stack it is given); the answer's body on a 2xx (or, ``into`` a file, written
        there as it comes, then renamed into place); nothing on a 404 when ``missing_ok``."""
        delay = 1.0
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with AsyncExitStack() as stack:
                    response = await self._http.send(request(stack), stream=True)
                    stack.push_async_callback(response.aclose)
                    if into is not None and response.is_success:
                        try:
                            await _save(response, into)
                        except OSError as e:
                            raise RunStopped(_unsaved(e, into)) from None
                        return b""
                    content = await response.aread()
            except httpx.TransportError as e:
                problem: str = f"{type(e).__name__}: {e}"
                status = None
            else:
                if response.is_success:
                    return content
                if missing_ok and response.status_code == 404:
                    return b""  # no 2xx answer here is empty
                status = response.status_code
                problem = f"HTTP {status}: {_message(content)}"
                if status not in (408, 409, 429) and status < 500:
                    raise RunStopped(
                        redact(
                            f"{what}: the provider refused it ({problem})" + _advice(status),
                            self._key,
                        ),
                        http_status=status,
                    )
            if attempt == ATTEMPTS:
                raise RunStopped(
                    redact(
                        f"{what}: no answer after {ATTEMPTS} tries ({problem}); "
                        "rerun the same command to go on",
                        self._key,
                    ),
                    http_status=status,
                )
            await self._sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")


async def _save(response: httpx.Response, path: Path) -> None:
    """``response``'s body into ``path`` through a ``.part`` file: whole or not at all."""
    partial = path.with_name(path.name + ".part")
    try:
        with partial.open("wb") as out:
            async for chunk in response.aiter_bytes(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    except BaseException:  # a full disk, a lost connection: no part left filling the disk
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise


def _unsaved(error: OSError, path: Path) -> str:
    return (
        f"{cannot_write(error, path, str(path))}: the batch's results stay on the provider "
        "until it expires; free some space (or fix the folder) and rerun the same command "
        "to collect them"
    )


def _message(content: bytes) -> str:
    try:
        error = orjson.loads(content).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return content[:200].decode(errors="replace")
    return str(error.get("message") or error.get("code") or error)[:300]


def _advice(status: int) -> str:
    if status in (401, 403):
        return "; check the API key and that the account may use the Batch API"
    if status == 404:
        return "; does this endpoint serve the Batch API (/files, /batches)?"
    return ""
