"""batchq: run batches of prompts against OpenAI-compatible chat/completions endpoints.

From Python: ``batchq.run(frame, model=..., template=...)`` and ``batchq.arun`` (see
``batchq.api``); ``batchq.run_job`` is the command line's ``batchq run`` as a function,
both thin shells over :func:`batchq.engine.runner.run_job`. Names are imported on first
use, so that the console entry point can set process-wide defaults before pyarrow loads.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BatchqError",
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
