"""What a job's results belong to, recorded in its state folder (``manifest.json``) and
in its output file's metadata (MANIFEST_KEY), and the check that refuses to mix them.

The identity of a job's results: the input (digest, rows, id column), the endpoint (a
rehearsal's simulator, or a provider and base URL) and the request settings that change
answers. Beside it: the manifest's version, the price region and the price file's text
(the caller's, so that ``status`` and ``cost`` price it as the run did, with no flag
repeated) and the command that resumes the run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchq.config import Job, RequestSettings
from batchq.errors import UsageError
from batchq.io.preflight import InputInfo

__all__ = [
    "MANIFEST_KEY",
    "VERSION",
    "check_same_job",
    "fingerprint",
    "manifest_for",
    "output_manifest",
]

VERSION = 1
#: The output file's metadata key for the manifest of the job that wrote it.
MANIFEST_KEY = b"batchq.manifest"


def manifest_for(
    job: Job,
    info: InputInfo,
    *,
    region: str,
    command: str | None = None,
    prices: str | None = None,
) -> dict[str, Any]:
    """The manifest of ``job`` over the input ``info`` describes; ``prices``: the text of
    the price file the run was priced with (``status`` and ``cost`` price it so too)."""
    recorded = {"prices": prices} if prices is not None else {}
    return {
        "version": VERSION,
        "region": region,
        "command": command,
        **recorded,
        **_identity(job, info),
    }


def fingerprint(job: Job, digest: str) -> str:
    """What names a Python call's cache folder: the input's digest, the id column asked
    for, the endpoint and the request settings; the same for the same call, whatever the
    input's file is called or where the simulator listens. (Never the key: no part of
    a job holds it.)"""
    identity = {
        "input_digest": digest,
        "id_column": job.id_column,
        "endpoint": _endpoint_of(job.request),
        "request": _request_of(job),
    }
    text = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(text).hexdigest()[:24]


def _identity(job: Job, info: InputInfo) -> dict[str, Any]:
    return {
        "input": str(info.path),
        "input_digest": info.digest,
        "input_rows": info.total_rows,
        "id_column": info.id_column,
        "endpoint": _endpoint_of(job.request),
        "request": _request_of(job),
    }


def _request_of(job: Job) -> dict[str, Any]:
    r = job.request
    return {
        "model": r.model,
        "system": r.system,
        "template": r.template,
        "max_tokens": r.max_tokens,
        "temperature": r.temperature,
        "params": r.params,
        **({"answer": job.answer.identity()} if job.answer is not None else {}),
    }


def _endpoint_of(request: RequestSettings) -> dict[str, Any]:
    """Where a job's answers come from: part of what its results belong to. The simulator
    is one endpoint whatever its port; a real endpoint is its provider and base URL."""
    return {
        "provider": request.provider,
        "base_url": None if request.simulated else request.url,
        "simulated": request.simulated,
    }


def check_same_job(old: dict[str, Any] | None, job: Job, info: InputInfo) -> None:
    """Refuse, naming what changed, to mix results of the job ``old`` describes into
    ``job`` (None: no manifest to compare)."""
    if old is None:
        return
    new = _identity(job, info)
    _check_same_endpoint(old, new, job)
    changed = []
    if old.get("input_digest") != new["input_digest"]:
        changed.append(f"the input file ({old.get('input')} has changed)")
    changed += _changed_request(old.get("request", {}), new["request"])
    if old.get("id_column") != new["id_column"] and not changed:
        changed.append("the id column")
    if changed:
        raise UsageError(
            f"{job.output} holds results of a different job; changed: {'; '.join(changed)}. "
            "Rerun with --restart to throw those results away and start over, "
            "or undo the change to resume"
        )


def _changed_request(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What changed between two manifests' requests, in the job file's words:
    ``[request].temperature (was 0.0, now 0.7)``, ``[answer].labels (was [...], now
    [...])``; other request fields (``params``) are keys of ``[request]`` too."""
    changed = []
    for key in dict.fromkeys([*now, *was]):
        if key not in ("params", "answer") and was.get(key) != now.get(key):
            changed.append(_change(f"[request].{key}", was.get(key), now.get(key)))
    params_was, params_now = was.get("params") or {}, now.get("params") or {}
    for key in dict.fromkeys([*params_now, *params_was]):
        if params_was.get(key) != params_now.get(key):
            changed.append(_change(f"[request].{key}", params_was.get(key), params_now.get(key)))
    answer_was, answer_now = was.get("answer"), now.get("answer")  # [answer] may come or go
    if answer_was is None or answer_now is None:
        if answer_was != answer_now:
            changed.append(
                f"[answer] ({'none' if answer_was is None else 'set'} before, "
                f"{'none' if answer_now is None else 'set'} now)"
            )
        return changed
    for key in dict.fromkeys([*answer_now, *answer_was]):
        if answer_was.get(key) != answer_now.get(key):
            changed.append(_change(f"[answer].{key}", answer_was.get(key), answer_now.get(key)))
    return changed


def _change(name: str, was: Any, now: Any) -> str:
    if isinstance(was, dict) and isinstance(now, dict):  # two JSON Schemas: too long to show
        return f"{name} (a different JSON Schema)"
    return f"{name} (was {_shown(was)}, now {_shown(now)})"


def _shown(value: Any) -> str:
    """A value as a job file (TOML) writes it; ``not set`` for none."""
    if value is None:
        return "not set"
    if isinstance(value, dict):
        return "a JSON Schema"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return orjson.dumps(value).decode()


def _check_same_endpoint(old: dict[str, Any], new: dict[str, Any], job: Job) -> None:
    """Refuse to mix a rehearsal's answers with real ones, or one endpoint's with another's.
    (A manifest from before endpoints were recorded is taken as it is.)"""
    was, now = old.get("endpoint"), new["endpoint"]
    if was is None or was == now:
        return
    if was["simulated"]:
        problem = (
            f"{job.output} holds the simulator's answers (a --simulate rehearsal), "
            f"not {now['provider']}'s"
        )
    elif now["simulated"]:
        problem = f"{job.output} holds real answers from {was['base_url']}, not the simulator's"
    else:
        problem = (
            f"{job.output} holds answers from {was['base_url']} ({was['provider']}), "
            f"not from {now['base_url']} ({now['provider']})"
        )
    raise UsageError(
        f"{problem}; one output never mixes two endpoints' answers. Rerun with --restart "
        "to throw those answers away and send every row again, choose another --output, "
        "or undo the change to resume"
    )


def output_manifest(output: Path) -> dict[str, Any] | None:
    """The manifest of the job that wrote ``output``; None for a file batchq did not write
    (not Parquet, or Parquet without one)."""
    try:
        metadata = pq.read_schema(output).metadata or {}
    except (pa.ArrowException, OSError):
        return None
    raw = metadata.get(MANIFEST_KEY)
    return orjson.loads(raw) if raw else None
