"""The state folder: atomic shards, done rows, refusing a changed job, the lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchq.config import load_job
from batchq.errors import UsageError
from batchq.io.preflight import preflight
from batchq.money.pricing import PriceTable
from batchq.money.report import cost_report, find_results, status
from batchq.run.runner import FLUSH_MAX_ROWS, FLUSH_MAX_TEXT, Journal
from batchq.state.folder import RowMask, StateDir


def result(row: int, status: str = "ok", attempts: int = 1) -> dict[str, Any]:
    return {"_row": row, "_id": str(row), "status": status, "attempts": attempts}


@pytest.fixture
def job(write_jsonl: Callable[..., Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(5)])
    return load_job(None, overrides={"input": str(path), "model": "m",
                                     "output": str(tmp_path / "o.parquet")})  # fmt: skip


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 21])
def test_row_mask_is_a_bit_a_row(size: int) -> None:
    mask = RowMask(size)
    assert len(mask) == size
    assert mask.count() == 0
    assert list(RowMask(size, value=True)) == [True] * size
    assert RowMask(size, value=True).count() == size  # no stray bits past the end
    wanted = [i % 3 == 0 for i in range(size)]
    for i, on in enumerate(wanted):
        mask[i] = on
    assert list(mask) == wanted
    assert mask.count() == sum(wanted)
    if size > 1:
        mask[0] = False
        mask[size - 1] = True
        assert (mask[0], mask[size - 1]) == (False, True)
        assert mask.count() == sum(wanted[1:-1]) + 1


def test_shards_record_done_rows(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    state = StateDir.open(job, info)
    state.write_shard([result(0), result(3, "error", 2)])
    state.write_shard([result(4)])
    assert [p.name for p in state.shard_paths()] == ["000001.parquet", "000002.parquet"]
    assert list(state.done_mask(5)) == [1, 0, 0, 1, 1]
    assert list(state.done_mask(5, retry_errors=True)) == [1, 0, 0, 0, 1]
    assert state.max_attempts_by_row() == {3: 2}
    assert not list(state.shards.glob(".tmp-*"))
    state.close()


def test_the_journal_flushes_by_rows_and_by_answer_text(job) -> None:  # type: ignore[no-untyped-def]
    state = StateDir.open(job, preflight(job))
    flushed: list[int] = []
    journal = Journal(state, lambda event: flushed.append(event.rows))
    long = "x" * (FLUSH_MAX_TEXT // 3)
    for row in range(7):  # the third long answer reaches the limit: a shard of 3 rows
        journal.add({**result(row), "response": long, "choices": ["y"] if row else None})
    for row in range(7, 7 + FLUSH_MAX_ROWS):
        journal.add({**result(row), "response": "short"})
    journal.flush()
    assert flushed == [3, 3, FLUSH_MAX_ROWS, 1]
    assert len(state.shard_paths()) == 4
    state.close()


def test_a_later_ok_supersedes_an_earlier_error(job) -> None:  # type: ignore[no-untyped-def]
    state = StateDir.open(job, preflight(job))
    state.write_shard([result(1, "error")])
    state.write_shard([result(1, "ok")])
    assert state.done_mask(5, retry_errors=True)[1] == 1
    assert state.max_attempts_by_row() == {}
    state.close()


def test_a_changed_request_is_refused_unless_restart(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    state = StateDir.open(job, info)
    state.write_shard([result(0)])
    state.close()
    changed = load_job(None, overrides={"input": str(job.input), "model": "other",
                                        "output": str(job.output)})  # fmt: skip
    with pytest.raises(UsageError, match=r"model \(was 'm', now 'other'\).*--restart"):
        StateDir.open(changed, info)
    state = StateDir.open(changed, info, restart=True)
    assert state.shard_paths() == []
    state.close()


def test_changed_limits_are_allowed(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    StateDir.open(job, info).close()
    faster = load_job(None, overrides={"input": str(job.input), "model": "m", "qps": 99,
                                       "output": str(job.output)})  # fmt: skip
    StateDir.open(faster, info).close()


def test_a_changed_input_is_refused(job) -> None:  # type: ignore[no-untyped-def]
    StateDir.open(job, preflight(job)).close()
    job.input.write_text('{"prompt": "different"}\n')
    with pytest.raises(UsageError, match="the input file"):
        StateDir.open(job, preflight(job))


def test_one_run_at_a_time(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    first = StateDir.open(job, info)
    with pytest.raises(UsageError, match="another batchq process"):
        StateDir.open(job, info)
    first.close()
    StateDir.open(job, info).close()


def test_status_and_cost_of_a_state_folder_count_each_row_once(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    state = StateDir.open(job, info)
    usage = {"model": "qwen-plus", "prompt_tokens": 1000, "completion_tokens": 100}
    state.write_shard([{**result(0), **usage}, result(2, "error"), result(3, "error"),
                       {**result(4), **usage}])  # fmt: skip
    state.write_shard([{**result(2, attempts=2), **usage}])  # --retry-errors answered it
    state.write_shard([result(3, "error", attempts=3)])  # and failed this one again
    results = find_results(job.output)
    s = status(results, PriceTable.load())
    assert (s.total_rows, s.done, s.ok, s.error, s.remaining) == (5, 4, 3, 1, 1)
    assert s.attempts == 1 + 2 + 3 + 1  # the latest answer's attempts, once a row
    assert s.prompt_tokens == 3000
    assert s.costs["USD"] == pytest.approx(3 * (1000 * 0.4 + 100 * 1.2) / 1e6)
    assert s.state_of_run == "running"  # this test holds the lock
    report = cost_report(results, PriceTable.load())
    assert sum(line.rows for line in report.lines) == 4
    state.close()
    assert status(results, PriceTable.load()).state_of_run == "stopped"
