"""The console entry point: process-wide defaults first, then the CLI."""

from __future__ import annotations

import os


def main() -> None:
    # Arrow's default allocator (mimalloc) keeps the blocks it frees, so the merge's peak
    # RSS grew with the row count: 198 MB at 100k rows, against 136 MB with the system
    # allocator. The variable must be set before pyarrow loads.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    from batchq import memory

    memory.few_arenas()  # before pyarrow starts its threads
    from batchq.cli import main as cli

    cli()
