"""batchq: run batches of prompts against OpenAI-compatible chat/completions endpoints.

From Python: ``batchq.run(frame, model=..., template=...)`` and ``batchq.arun`` (see
``batchq.api``); ``batchq.run_job`` is the command line's ``batchq run`` as a function,
both thin shells over :func:`batchq.engine.runner.run_job`. Names are imported on first
use, so that the console entry point can set process-wide defaults before pyarrow loads.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what a type checker sees; at run time each is imported on first use
    from batchq.api import arun, run, run_job
    from batchq.config import Job, load_job
    from batchq.engine.runner import RunOptions, RunSummary
    from batchq.errors import (
        BatchqError,
        EmptyInput,
        InputError,
        Interrupted,
        RunStopped,
        UsageError,
    )

if "pyarrow" not in sys.modules:
    # Arrow's system allocator, as the console entry picks it (``_entry.py``), unless the
    # process chose one: mimalloc's pool kept what it freed, and batchq.run_job over
    # 200,000 rows peaked at 241 MB with it, 189 MB with this (the CLI: 166 MB). Only
    # read when pyarrow loads, so it cannot be switched later (``memory.system_pool``).
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

__all__ = [
    "BatchqError",
    "EmptyInput",
    "InputError",
    "Interrupted",
    "Job",
    "RunOptions",
    "RunStopped",
    "RunSummary",
    "UsageError",
    "arun",
    "load_job",
    "run",
    "run_job",
]
__version__ = "0.1.0"

_HOMES = {
    "BatchqError": "batchq.errors",
    "EmptyInput": "batchq.errors",
    "InputError": "batchq.errors",
    "Interrupted": "batchq.errors",
    "RunStopped": "batchq.errors",
    "UsageError": "batchq.errors",
    "Job": "batchq.config",
    "load_job": "batchq.config",
    "RunOptions": "batchq.engine.runner",
    "RunSummary": "batchq.engine.runner",
    "arun": "batchq.api",
    "run": "batchq.api",
    "run_job": "batchq.api",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'batchq' has no attribute {name!r}")
