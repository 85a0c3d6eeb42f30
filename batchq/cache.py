"""The Python API's cache: one folder per call, named by the call's fingerprint.

    $XDG_CACHE_HOME/batchq/          (default ~/.cache/batchq/)
      <fingerprint>/
        call.json        what the call was (for ``batchq cache list``), and when last used
        input.parquet    the data as the run reads it (input.jsonl for a list of dicts;
                         none for a path, read where it is)
        output.parquet   the run's output, with its state folder beside it while it runs
        output.arrow     the output as Arrow IPC, which the frames handed back map
      staging/           data being written, before its digest names its folder

The fingerprint is the input's content, the request settings and the endpoint (see
``state.manifest.fingerprint``), so the same call after a crash or a kernel restart finds
its folder and resumes, and a finished one is read back without sending anything. A
simulated call and a real one never share a folder. Nothing here holds the key.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchq.config import Job
from batchq.files import write_atomic
from batchq.io.rules import digest_and_lines
from batchq.state import StateDir, fingerprint

__all__ = ["CallFolder", "cache_root", "entries", "remove"]

CALL = "call.json"
OUTPUT = "output.parquet"
FRAME = "output.arrow"
STAGING = "staging"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/batchq``, else ``~/.cache/batchq``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchq"


@dataclass(frozen=True)
class CallFolder:
    """One call's folder in the cache."""

    path: Path

    @property
    def output(self) -> Path:
        return self.path / OUTPUT

    @property
    def frame(self) -> Path:
        """The output as Arrow IPC, memory-mapped by the frames a call hands back."""
        return self.path / FRAME

    @classmethod
    def staging(cls, suffix: str) -> Path:
        """A fresh file to write a call's data to before its folder is known."""
        folder = cache_root() / STAGING
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}{suffix}"

    @classmethod
    def for_call(cls, job: Job, data_file: Path, *, staged: bool, what: str) -> CallFolder:
        """The folder of ``job`` over ``data_file``, made if new. A staged file is moved
        in as its ``input``; the record of the call is written (or its use noted)."""
        digest = digest_and_lines(data_file)[0]
        folder = cls(cache_root() / fingerprint(job, digest))
        folder.path.mkdir(parents=True, exist_ok=True)
        if staged:  # the same content whichever call wrote it: replacing it is harmless
            os.replace(data_file, folder.path / f"input{''.join(data_file.suffixes)}")
        folder._record(job, what)
        return folder

    def input(self) -> Path | None:
        """The staged data in the folder, if the call's data was staged."""
        return next(iter(sorted(self.path.glob("input.*"))), None)

    def record(self) -> dict[str, Any]:
        try:
            return orjson.loads((self.path / CALL).read_bytes())  # type: ignore[no-any-return]
        except (OSError, orjson.JSONDecodeError):
            return {}

    def last_used(self) -> float:
        try:
            return (self.path / CALL).stat().st_mtime
        except OSError:
            return self.path.stat().st_mtime

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def drop_if_unused(self) -> None:
        """Delete the folder when no run has left anything in it (the call was refused
        before sending: bad input, a setting, a missing key)."""
        if not self.output.exists() and not StateDir.of(self.output).path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def running(self) -> bool:
        """Whether a live process is running this call now."""
        return StateDir.of(self.output).holder()[0]

    def _record(self, job: Job, what: str) -> None:
        r = job.request
        record = self.record() or {"created": time.time()}
        record |= {
            "name": job.name,
            "model": r.model,
            "provider": r.provider,
            "simulated": r.simulated,
            "input": what,
            "used": time.time(),
        }
        text = orjson.dumps(record, option=orjson.OPT_INDENT_2)
        write_atomic(self.path / CALL, lambda f: f.write(text))


def entries() -> Iterator[CallFolder]:
    """Every call's folder in the cache, the most recently used first."""
    root = cache_root()
    if not root.is_dir():
        return
    folders = [CallFolder(p) for p in root.iterdir() if p.is_dir() and (p / CALL).exists()]
    yield from sorted(folders, key=CallFolder.last_used, reverse=True)


def remove(folder: CallFolder) -> bool:
    """Delete a call's folder, unless a run is using it now (False)."""
    if folder.running():
        return False
    shutil.rmtree(folder.path, ignore_errors=True)
    return True


def clear_staging(older_than_s: float = 3600.0) -> None:
    """Data files a killed call left in staging."""
    folder = cache_root() / STAGING
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if time.time() - path.stat().st_mtime > older_than_s:
            path.unlink(missing_ok=True)
