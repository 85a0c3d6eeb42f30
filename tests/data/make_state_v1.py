"""Write ``state_v1/``: an interrupted job's state folder as batchq 0.1.0 (commit 28a00d7)
wrote it, for the test that a state folder from before the state package still resumes.

A rehearsal (a simulated endpoint, so any simulator's port resumes it) of 60 rows at
10 QPS, with 500s on a third of the requests and one attempt a row, stopped by SIGINT
after 3 s; then the same with ``--retry-errors``, stopped after 2.5 s, so that some rows
are in two shards (an error, then an answer: the latest wins). Rerun from the repository
root with that commit checked out: ``python tests/data/make_state_v1.py``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "state_v1"
JOB = """\
name = "v1"
input = "in.jsonl"
output = "out.parquet"
[request]
provider = "custom"
base_url = "http://127.0.0.1:1/v1"
model = "qwen-plus"
template = "Review: {text}"
[limits]
qps = 10
concurrency = 4
max_attempts = 1
"""


def child(retry_errors: bool) -> None:
    import anyio  # noqa: I001  (the modules of 0.1.0: batchq.runner is gone since)

    from batchq.config import load_job, simulated
    from batchq.runner import run_job
    from batchq.simulator import SimConfig, serve_in_thread

    with serve_in_thread(SimConfig(fail_500=0.33, seed=4)) as sim:
        job = simulated(load_job(Path("job.toml")), sim.base_url)
        anyio.run(lambda: run_job(job, api_key=None, retry_errors=retry_errors, seed=1))


def main() -> None:
    shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir()
    rows = [{"id": f"r{i}", "text": f"review number {i}"} for i in range(60)]
    (FOLDER / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (FOLDER / "job.toml").write_text(JOB)
    for flag, after in (("", 3.0), ("retry", 2.5)):
        process = subprocess.Popen([sys.executable, __file__, "child", flag], cwd=FOLDER)
        time.sleep(after)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    (FOLDER / "out.parquet.batchq" / "lock").unlink()


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2] == "retry")
    else:
        main()
