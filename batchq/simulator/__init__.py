"""The built-in OpenAI-compatible simulator: a local server to rehearse jobs and run tests.

with serve_in_thread(SimConfig(qps=50, fail_503=0.1)) as sim:
    print(sim.base_url)        # http://127.0.0.1:PORT/v1
    ...
    sim.stats.requests         # what the server saw

The server (aiohttp.web) loads on first use of these names, so that the CLI can name the
simulator's options (``limits.SHAPES``) without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchq.simulator.server import SimConfig, SimStats, Simulator, reply_for, serve_in_thread

__all__ = ["SimConfig", "SimStats", "Simulator", "reply_for", "serve_in_thread"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batchq.simulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
