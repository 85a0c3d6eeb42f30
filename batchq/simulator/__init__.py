"""The built-in OpenAI-compatible simulator: a local server to rehearse jobs and run tests.

with serve_in_thread(SimConfig(qps=50, fail_503=0.1)) as sim:
    print(sim.base_url)        # http://127.0.0.1:PORT/v1
    ...
    sim.stats.requests         # what the server saw
"""

from batchq.simulator.server import SimConfig, SimStats, Simulator, reply_for, serve_in_thread

__all__ = ["SimConfig", "SimStats", "Simulator", "reply_for", "serve_in_thread"]
