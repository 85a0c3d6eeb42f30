"""The state folder ``<output>.batchq/``: the one owner of its layout (``layout.py``), its
manifest (``manifest.py``), its lock (``lock.py``) and its shards, of which the latest
result of each row wins (``folder.py``). Everything else asks a StateDir."""

from batchq.state.folder import ShardIndex, StateDir
from batchq.state.layout import check_output, output_of, state_path
from batchq.state.manifest import (
    MANIFEST_KEY,
    check_same_job,
    fingerprint,
    manifest_for,
    output_manifest,
)
from batchq.state.mask import RowMask

__all__ = [
    "MANIFEST_KEY",
    "RowMask",
    "ShardIndex",
    "StateDir",
    "check_output",
    "check_same_job",
    "fingerprint",
    "manifest_for",
    "output_manifest",
    "output_of",
    "state_path",
]
