"""Shared fixtures: input files, the simulator on a real loopback port, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from batchq.cli import main
from batchq.simulator import SimConfig, serve_in_thread
from batchq.simulator.server import Running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    def write(rows: list[dict[str, Any]], name: str = "in.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


@pytest.fixture
def simulator() -> Iterator[Callable[..., Running]]:
    """Start simulators (``simulator(qps=5)``); all stop when the test ends."""
    stack: list[Any] = []

    def start(**config: Any) -> Running:
        context = serve_in_thread(SimConfig(**config))
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def cli() -> Callable[..., Result]:
    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke
