"""batchq: run batches of prompts against OpenAI-compatible chat/completions endpoints.

The command line (``batchq run``) is a thin shell over :func:`batchq.runner.run_job`.
"""

from batchq.config import Job, load_job
from batchq.errors import BatchqError, InputError, RunStopped, UsageError
from batchq.runner import RunSummary, run_job

__all__ = [
    "BatchqError",
    "InputError",
    "Job",
    "RunStopped",
    "RunSummary",
    "UsageError",
    "load_job",
    "run_job",
]
__version__ = "0.1.0"
