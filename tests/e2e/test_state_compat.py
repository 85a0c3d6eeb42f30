"""A state folder written before the state package (batchq 0.1.0, commit 28a00d7, by
``tests/data/make_state_v1.py``) resumes: its rows are kept, the latest shard of a row
answered twice wins, and only the rows it does not hold are sent."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from batchq.config import load_job, simulated
from batchq.engine.runner import run_job

STATE_V1 = Path(__file__).resolve().parents[1] / "data" / "state_v1"


def latest_by_row(shards: Path) -> dict[int, dict[str, Any]]:
    latest: dict[int, dict[str, Any]] = {}
    for shard in sorted(shards.glob("*.parquet")):  # oldest first
        for row in pq.read_table(shard).to_pylist():
            latest[row["_row"]] = row
    return latest


def test_a_state_folder_of_batchq_0_1_resumes_and_keeps_its_rows(
    simulator: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "job"
    shutil.copytree(STATE_V1, folder)
    monkeypatch.chdir(folder)
    kept = latest_by_row(folder / "out.parquet.batchq" / "shards")
    assert 0 < len(kept) < 60
    assert any(r["status"] == "error" for r in kept.values())
    sim = simulator()
    job = simulated(load_job(Path("job.toml")), sim.base_url)
    job = replace(job, limits=replace(job.limits, qps=None))  # limits are not the job's identity

    summary = anyio.run(lambda: run_job(job, api_key=None))

    assert sim.stats.requests == 60 - len(kept)  # nothing it holds is sent again
    out = pq.read_table(folder / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == [f"r{i}" for i in range(60)]
    for i, row in enumerate(out):
        if i in kept:
            old = kept[i]
            names = ["status", "response", "attempts", "error_code", "prompt_tokens"]
            assert {n: row[n] for n in names} == {n: old[n] for n in names}, i
        else:
            assert row["status"] == "ok"
            assert row["response"] == f"echo: Review: review number {i}"
    errors = sum(r["status"] == "error" for r in kept.values())
    assert (summary.ok, summary.error) == (60 - errors, errors)
    assert not (folder / "out.parquet.batchq").exists()
