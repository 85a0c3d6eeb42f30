"""Reaching Ray: imported only when the Ray engine is asked for; started locally (and
stopped at the end) when no address is given; its own log noise kept out of the terminal
unless the run is verbose."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from batchq.errors import UsageError

__all__ = ["INSTALL", "awaited", "connect", "import_ray"]

INSTALL = "pip install 'batchq[ray]'"
#: Workers when the job names none: one per CPU Ray offers, at most this many.
MAX_DEFAULT_WORKERS = 8


def import_ray() -> Any:
    """The ``ray`` module; UsageError (exit 2) with the install line without it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # unless the user set it
    try:
        import ray
    except ImportError:
        raise UsageError(f"the Ray engine needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(address: str | None, *, verbose: bool = False) -> Callable[[], None]:
    """Join the Ray at ``address`` (None: start one on this machine); what ends it (a Ray
    this process joined before, as in a user's Ray program, is left as it was)."""
    ray = import_ray()
    if ray.is_initialized():
        return lambda: None
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    try:  # "local": a Ray of its own, even beside a cluster started on this machine
        ray.init(address=address or "local", **options)
    except (ConnectionError, ValueError, RuntimeError, OSError) as e:
        if address is None:
            raise UsageError(f"cannot start Ray on this machine: {e}") from None
        raise UsageError(
            f"cannot reach Ray at {address}: {e}; start it with `ray start "
            "--head`, or drop --ray-address to start one here"
        ) from None
    return ray.shutdown  # type: ignore[no-any-return]


def default_workers() -> int:
    ray = import_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


async def awaited(ref: Any) -> Any:
    """A Ray object ref's value, awaited on any asyncio loop (uvloop too)."""
    return await asyncio.wrap_future(ref.future())
