"""The Ray engine (``--engine ray``) through the real CLI, on a Ray cluster of two nodes on
this machine (a head and a second node, shared by these tests), against simulators on
loopback ports: the same output as the local engine, one limit for every worker, kills of
the driver and of a worker, a run finished by the other engine, ``batchq.ray.map``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

pytest.importorskip("ray")

from tests.e2e.test_resume import FAULTS, command, flushed_rows, reply

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
#: What may differ between two runs of the same rows: timing, request ids, and the
#: attempts random faults took.
VARYING = {"latency_ms", "request_id", "attempts", "created", "response_id"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and a second node on this machine, for this module's tests (stopped after
    them: its processes would slow every other test); its address."""
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="bq-ray-", dir="/tmp"))  # Ray's socket paths: short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = [
        RAY,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    ray_start(head, env)
    address = f"127.0.0.1:{port}"
    ray_start([RAY, "start", f"--address={address}", "--num-cpus=2"], env)
    yield address
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


def ray_start(command: list[str], env: dict[str, str]) -> None:
    """``ray start``, up to three times (a port Ray picked may be taken meanwhile)."""
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        if done.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review number {i}"} for i in range(n)]


def on_ray(address: str, workers: int = 2) -> list[str]:
    return ["--engine", "ray", "--ray-address", address, "--workers", str(workers)]


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def launch(args: list[str]) -> subprocess.Popen[str]:
    """The CLI in the background, its output kept (read by ``communicate``)."""
    return subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def kill_once_saved(process: subprocess.Popen[str], out: Path, saved: int) -> float:
    """``kill -9`` ``process`` once more than ``saved`` rows are in its shards; when."""
    wait_for(lambda: len(flushed_rows(out)) > saved)
    process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    process.communicate(timeout=10)  # reaped, its pipe closed
    return killed


def wait_for(test: Callable[[], bool], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not test():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_ray_gives_the_local_engines_output_row_for_row_under_faults(
    cluster: str,
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    tmp_path: Path,
) -> None:
    n = 600
    data = rows(n) + [{"id": f"d{i}", "text": f"review number {i}"} for i in range(40)]
    path = write_jsonl(data)
    sim = simulator(latency_ms=20, seed=3, **FAULTS)
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        extra = on_ray(cluster) if engine == "ray" else []
        done = run(command(sim, path, out, "--dedupe", "--keep-raw", *extra))
        assert done.returncode == 0, done.stderr
        outs[engine] = pl.read_parquet(out)
    if "ray" in outs:
        assert "ray: 2 workers on 2 nodes" in done.stderr, "the workers spread over both nodes"
    local, ray = outs["local"], outs["ray"]
    assert local.columns == ray.columns
    same = [c for c in local.columns if c not in VARYING | {"raw"}]
    assert local.select(same).equals(ray.select(same))
    assert set(ray["status"]) == {"ok"}
    assert ray["response"].to_list()[:n] == [reply(i) for i in range(n)]
    # dedupe across workers: each distinct request was sent once, whichever worker sent it
    assert "40 rows repeat another row's request" in done.stderr


@pytest.mark.timeout(240)
def test_two_workers_share_one_limit(
    cluster: str,
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    tmp_path: Path,
) -> None:
    path = write_jsonl(rows(1200))
    sim = simulator(latency_ms=30, qps=100, seed=1)
    # Told three times the limit: the run finds it, one limit for both workers.
    done = run(command(sim, path, tmp_path / "over.parquet", "--qps", "300", *on_ray(cluster)))
    assert done.returncode == 0, done.stderr
    limited = sim.stats.limited / sim.stats.requests
    per_second = sorted(sim.stats.ok_by_second.values())
    steady = per_second[len(per_second) // 2]  # the median second
    print(f"limit 429s: {limited:.1%}, median {steady} ok/s of a 100 limit")
    assert limited < 0.05
    assert steady >= 90
    # Told under the limit: no 429 at all.
    sim2 = simulator(latency_ms=30, qps=100, seed=2)
    under = write_jsonl(rows(360), name="under.jsonl")
    done = run(command(sim2, under, tmp_path / "under.parquet", "--qps", "90", *on_ray(cluster)))
    assert done.returncode == 0, done.stderr
    assert sim2.stats.limited == 0


@pytest.mark.timeout(240)
def test_a_driver_kill_9_stops_every_worker_and_the_local_engine_finishes_the_run(
    cluster: str,
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    tmp_path: Path,
) -> None:
    n = 3000
    path = write_jsonl(rows(n))
    sim = simulator(latency_ms=20, seed=4)
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--qps", "200", "--quiet")
    killed = kill_once_saved(launch([*args, *on_ray(cluster)]), out, 200)
    time.sleep(2.0 - (time.monotonic() - killed))
    at_two_s = sim.stats.requests
    time.sleep(2.0)
    assert sim.stats.requests == at_two_s, "a worker sent a request more than 2 s after"
    flushed = flushed_rows(out)
    assert len(flushed) < n, "the kill should land mid-run"
    seen = dict(sim.stats.by_prompt)
    in_flight = sum(1 for i in range(n) if i not in flushed and seen.get(reply(i)))
    done = run([*args, "--qps", "1000"])  # the local engine resumes what Ray started
    assert done.returncode == 0, done.stderr
    df = pl.read_parquet(out)
    assert df["response"].to_list() == [reply(i) for i in range(n)]
    for i in flushed:
        assert sim.stats.by_prompt[reply(i)] == 1, f"row {i} was saved, then sent again"
    resent = sum(1 for i in range(n) if sim.stats.by_prompt[reply(i)] > 1)
    print(f"in flight at the kill (sent, not saved): {in_flight}; sent again: {resent}")
    assert resent <= in_flight


@pytest.mark.timeout(240)
def test_a_killed_worker_s_rows_are_sent_by_the_other_and_the_local_run_is_resumed_on_ray(
    cluster: str,
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    tmp_path: Path,
) -> None:
    n = 3000
    path = write_jsonl(rows(n))
    sim = simulator(latency_ms=20, seed=5)
    out = tmp_path / "out.parquet"
    args = command(sim, path, out, "--qps", "400")
    # Started locally, stopped, then finished on Ray.
    kill_once_saved(launch(args), out, 300)
    before = len(flushed_rows(out))
    driver = launch([*args, *on_ray(cluster)])
    wait_for(lambda: len(flushed_rows(out)) > before + 500)
    senders = subprocess.run(["pgrep", "-f", "ray::Sender"], capture_output=True, text=True)
    pids = [int(p) for p in senders.stdout.split()]
    assert pids, "no Ray worker process found"
    os.kill(pids[0], signal.SIGKILL)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 0, stderr
    assert "was lost" in stderr
    df = pl.read_parquet(out)
    assert df["response"].to_list() == [reply(i) for i in range(n)]
    again = sum(1 for i in range(n) if sim.stats.by_prompt[reply(i)] > 1)
    print(f"rows sent twice: {again}")
    assert again <= 32 + 400  # the lost worker's in flight and its last unsaved second


@pytest.mark.timeout(120)
def test_without_ray_the_engine_asks_for_the_install_and_sends_nothing(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    hide = tmp_path / "hide"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    sim = simulator(latency_ms=5)
    path = write_jsonl(rows(10))
    env = {**os.environ, "PYTHONPATH": str(hide)}
    args = [*command(sim, path, tmp_path / "o.parquet"), "--engine", "ray"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'batchq[ray]'" in done.stderr
    assert sim.stats.requests == 0


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, in this process
def test_ray_map_sends_a_dataset_under_one_budget_and_resumes_from_its_output(
    cluster: str, simulator: Callable[..., Any], tmp_path: Path
) -> None:
    import ray

    import batchq.ray

    sim = simulator(latency_ms=10, seed=6, fail_503=0.05, fail_500=0.02)
    ray.init(address=cluster, log_to_driver=False, include_dashboard=False)
    try:
        items = [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(400)]
        ds = ray.data.from_items(items).repartition(4)
        out = tmp_path / "labels.parquet"
        keys: dict[str, Any] = {
            "model": "qwen-plus",
            "base_url": sim.base_url,
            "qps": 150,
            "id_column": "id",
            "output": str(out),
            "workers": 2,
        }
        labeled = batchq.ray.map(ds, **keys)
        assert sim.stats.requests == 0, "map is lazy"
        got = sorted(labeled.take_all(), key=lambda r: int(r["id"][1:]))
        assert [r["response"] for r in got] == [f"echo: hello {i}" for i in range(400)]
        assert {r["status"] for r in got} == {"ok"}
        sent = sim.stats.requests
        again = batchq.ray.map(ray.data.from_items(items), **keys).take_all()
        assert len(again) == 400
        assert sim.stats.requests == sent, "a rerun over the same output sends nothing"
    finally:
        ray.shutdown()
    print(json.dumps({"requests": sent}))


#: $1,000 per 1M tokens in and out: a token costs $0.001.
PRICES = '[models."qwen-plus"]\ntiers = [{ input = 1000.0, output = 1000.0 }]\n'


@pytest.mark.timeout(180)
def test_a_run_s_own_ray_keeps_one_cap_keeps_the_key_out_and_leaves_nothing_behind(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    from tests.e2e.test_spend_matrix import billed, ledger_of

    sim = simulator(latency_ms=40, seed=7, fail_503=0.05, fail_drop=0.03)
    path = write_jsonl([{"id": f"r{i}", "text": f"review {i} of many words"} for i in range(80)])
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    ray_tmp = Path(tempfile.mkdtemp(prefix="bq-ray-", dir="/tmp"))  # Ray's sockets: short
    secret = "sk-ray-secret-0123456789"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "SECRET_KEY": secret}
    args = [
        *command(sim, path, tmp_path / "o.parquet"),
        "--api-key-env",
        "SECRET_KEY",
        "--prices",
        str(prices),
        "--max-cost",
        "0.25",
        "--max-tokens",
        "20",
        "--labels",
        "positive,negative",
        "--concurrency",
        "8",
        "--engine",
        "ray",
        "--workers",
        "2",
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=150)
    assert done.returncode == 3, done.stderr
    assert "the run stopped at its budget" in done.stderr
    spent = billed(ledger_of(sim), prices)
    print(f"billed ${spent:.4f} of a $0.25 cap by two workers")
    assert 0 < spent <= 0.25
    left = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a Ray process outlived the run"
    for file in ray_tmp.rglob("*"):
        if file.is_file() and not file.is_socket():
            assert secret.encode() not in file.read_bytes(), f"the key is in {file}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, in this process
def test_batchq_run_over_a_frame_on_ray_gives_the_frame_back(
    cluster: str, simulator: Callable[..., Any]
) -> None:
    import polars as pl

    import batchq

    sim = simulator(latency_ms=10, seed=8, fail_503=0.05)
    frame = pl.DataFrame(
        {"id": [f"r{i}" for i in range(120)], "text": [str(i) for i in range(120)]}
    )
    labeled = batchq.run(
        frame,
        model="qwen-plus",
        base_url=sim.base_url,
        template="Say {text}",
        engine="ray",
        ray_address=cluster,
        workers=2,
        cache=False,
        progress=False,
    )
    assert labeled["id"].to_list() == frame["id"].to_list()
    assert labeled["response"].to_list() == [f"echo: Say {i}" for i in range(120)]


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, in this process
@pytest.mark.parametrize(
    ("via", "dedupe", "answer", "n", "capped", "stream"),
    [
        ("live", True, True, 3, True, False),
        ("batch", False, True, 1, True, True),
        ("live", False, False, 3, False, True),
        ("batch", True, True, 1, False, False),
    ],
)
def test_money_and_counts_hold_where_ray_meets_the_spend_features(
    cluster: str,
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    via: str,
    dedupe: bool,
    answer: bool,
    n: int,
    capped: bool,
    stream: bool,
) -> None:
    """Cells of tests/e2e/test_spend_matrix.py on Ray: the cap, the cost column, status,
    cost and the summary held to the simulator's ledger, with dedupe, re-asks, n choices,
    the Batch API's rounds and streaming."""
    from tests.e2e.test_spend_matrix import check_cell

    extra = (*on_ray(cluster), *(["--param", "stream=true"] if stream else []))
    check_cell(simulator, write_jsonl, cli, tmp_path, via, dedupe, answer, n, capped, extra)


@pytest.mark.timeout(180)
def test_sigint_stops_a_ray_run_with_130_its_rows_saved_and_a_rerun_finishes_it(
    cluster: str,
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    tmp_path: Path,
) -> None:
    n = 2000
    path = write_jsonl(rows(n))
    sim = simulator(latency_ms=20, seed=9)
    out = tmp_path / "out.parquet"
    args = [*command(sim, path, out, "--qps", "200"), *on_ray(cluster)]
    driver = launch(args)
    wait_for(lambda: len(flushed_rows(out)) > 200)
    driver.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    _, stderr = driver.communicate(timeout=30)
    assert driver.returncode == 130, stderr
    assert time.monotonic() - stopped < 15, "the stop took longer than its grace"
    time.sleep(0.5)
    at_stop = sim.stats.requests
    time.sleep(1.5)
    assert sim.stats.requests == at_stop, "a worker went on sending after the run stopped"
    saved = flushed_rows(out)
    done = run(args)
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(out)["response"].to_list() == [reply(i) for i in range(n)]
    assert all(sim.stats.by_prompt[reply(i)] == 1 for i in saved), "a saved row was sent again"
