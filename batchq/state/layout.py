"""Where a job's state folder is, what it holds, and the checks on the output path.

<output>.batchq/
  manifest.json          what the results belong to (``manifest.py``)
  lock                   held (flock) by the running process, with its pid (``lock.py``)
  shards/000001.parquet  finished rows, SHARD_SCHEMA, each written atomically
  shards/000002-w1.parquet  …written by one of several writers (a Ray engine's worker)
  shards/damaged-*       shards that could not be read, set aside (rows sent again)
  batches.json           ``--via batch``: each remote step, recorded before the next
  batch/                 the files uploaded (r1/…) and downloaded (…-output.jsonl)
"""

from __future__ import annotations

import os
from pathlib import Path

from batchq.config import Job
from batchq.errors import UsageError
from batchq.state.manifest import output_manifest

__all__ = [
    "MANIFEST",
    "SUFFIX",
    "check_output",
    "output_of",
    "shard_name",
    "shard_seq",
    "state_path",
]

SUFFIX = ".batchq"
MANIFEST = "manifest.json"
LOCK = "lock"
SHARDS = "shards"
BATCH_JOURNAL = "batches.json"
BATCH_FILES = "batch"
#: Whole shards: temp files (``.tmp-*``) and damaged ones set aside do not match.
SHARD_GLOB = "[0-9]*.parquet"


def state_path(output: Path) -> Path:
    """The state folder of the job writing ``output``: ``<output>.batchq/``."""
    return output.with_name(output.name + SUFFIX)


def output_of(path: Path) -> Path:
    """The output a path names: a state folder's output, or the path itself."""
    if path.name.endswith(SUFFIX):
        return path.with_name(path.name.removesuffix(SUFFIX))
    return path


def shard_name(seq: int, writer: str | None = None) -> str:
    """A shard's file name: its number, and the writer's tag when several write at once
    (numbers may then repeat; the name orders them, and a row is one writer's)."""
    return f"{seq:06d}-{writer}.parquet" if writer else f"{seq:06d}.parquet"


def shard_seq(path: Path) -> int:
    """The number a shard's name starts with."""
    return int(path.stem.partition("-")[0])


def check_output(job: Job) -> None:
    """The output is not the input, nor a folder, nor a file batchq did not write; its
    folder is writable, or can be made: its nearest existing ancestor is a writable
    folder (the state folder is made with its parents, after every check)."""
    output, state = job.output, state_path(job.output)
    if output.exists() and job.input.exists() and os.path.samefile(output, job.input):
        raise UsageError(
            f"the output {output} is the input file: batchq never writes over "
            "its input; choose another --output"
        )
    if output.is_dir():
        raise UsageError(
            f"the output {output} is a folder: give a file path, such as "
            f"{output / (job.input.stem + '.parquet')}"
        )
    if output.exists() and output_manifest(output) is None:
        raise UsageError(
            f"{output} exists and is not a batchq output: batchq will not write "
            "over it; choose another --output, or move the file away"
        )
    if state.exists() and not state.is_dir():
        raise UsageError(
            f"{state} is a file, where the run keeps its state folder: move it "
            "away or choose another --output"
        )
    folder = output.parent if str(output.parent) else Path(".")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"the output folder {folder} cannot be made: {existing} is a file; "
            "choose another output"
        )
    if not os.access(existing, os.W_OK):
        what = "is not writable" if existing == folder else f"cannot be made in {existing}"
        raise UsageError(f"the output folder {folder} {what}: choose another output")
