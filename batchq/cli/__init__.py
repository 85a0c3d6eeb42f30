"""The command line: click commands only, one module per family. The one place that
prints and sets exit codes."""

from __future__ import annotations

import click

from batchq.cli.batch import batch, export_batch, import_batch
from batchq.cli.cache import cache
from batchq.cli.reports import cost, estimate, status
from batchq.cli.run import run
from batchq.cli.simulate import simulate

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchq")
def main() -> None:
    """Run batches of prompts against OpenAI-compatible chat/completions endpoints."""


for command in (run, status, cost, estimate, export_batch, import_batch, batch, simulate, cache):
    main.add_command(command)

if __name__ == "__main__":
    main()
