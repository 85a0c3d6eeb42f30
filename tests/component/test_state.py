"""The state folder: atomic shards, done rows, the latest result wins, refusing a changed
job, the lock, the checks on the output path."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchq.config import Job, load_job
from batchq.engine.live import FLUSH_MAX_ROWS, FLUSH_MAX_TEXT, Journal
from batchq.errors import UsageError
from batchq.files import write_atomic
from batchq.io.preflight import InputInfo, preflight
from batchq.money.pricing import PriceTable
from batchq.money.report import cost_report, find_results, status
from batchq.result import Result
from batchq.state import RowMask, StateDir, check_output, manifest_for

ERRORS = frozenset({"error"})


def attempts_of(state: StateDir) -> dict[int, int]:
    """The attempts so far of the rows whose latest result is an error."""
    return {row: prior["attempts"] for row, prior in state.prior_by_row(ERRORS).items()}


def result(row: int, status: str = "ok", attempts: int = 1, **columns: Any) -> Result:
    return Result(
        row=row,
        id=str(row),
        status=status,
        model=columns.pop("model", "m"),
        attempts=attempts,
        via="live",
        **columns,
    )


def open_state(job: Job, info: InputInfo, *, restart: bool = False) -> StateDir:
    manifest = manifest_for(job, info, region="intl")
    return StateDir.open(job, info, manifest=manifest, restart=restart)


@pytest.fixture
def job(write_jsonl: Callable[..., Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(5)])
    return load_job(
        None, overrides={"input": str(path), "model": "m", "output": str(tmp_path / "o.parquet")}
    )


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
    state = open_state(job, info)
    state.write([result(0), result(3, "error", 2)])
    state.write([result(4)])
    assert [p.name for p in state.shard_paths()] == ["000001.parquet", "000002.parquet"]
    assert list(state.done_mask(5)) == [1, 0, 0, 1, 1]
    assert list(state.done_mask(5, retry=ERRORS)) == [1, 0, 0, 0, 1]
    assert attempts_of(state) == {3: 2}
    assert not list(state.shards.glob(".tmp-*"))
    state.close()


def test_the_journal_flushes_by_rows_and_by_answer_text(job) -> None:  # type: ignore[no-untyped-def]
    state = open_state(job, preflight(job))
    flushed: list[int] = []
    journal = Journal(state, lambda event: flushed.append(event.rows))
    long = "x" * (FLUSH_MAX_TEXT // 3)
    for row in range(7):  # the third long answer reaches the limit: a shard of 3 rows
        journal.add(result(row, response=long, choices=["y"] if row else None))
    for row in range(7, 7 + FLUSH_MAX_ROWS):
        journal.add(result(row, response="short"))
    journal.flush()
    assert flushed == [3, 3, FLUSH_MAX_ROWS, 1]
    assert len(state.shard_paths()) == 4
    state.close()


def test_a_later_ok_supersedes_an_earlier_error(job) -> None:  # type: ignore[no-untyped-def]
    state = open_state(job, preflight(job))
    state.write([result(1, "error")])
    state.write([result(1, "ok")])
    assert state.done_mask(5, retry=ERRORS)[1] == 1
    assert attempts_of(state) == {}
    state.close()


def test_a_changed_request_is_refused_unless_restart(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    state = open_state(job, info)
    state.write([result(0)])
    state.close()
    changed = load_job(
        None, overrides={"input": str(job.input), "model": "other", "output": str(job.output)}
    )
    with pytest.raises(UsageError, match=r'\[request\].model \(was "m", now "other"\).*--restart'):
        open_state(changed, info)
    state = open_state(changed, info, restart=True)
    assert state.shard_paths() == []
    state.close()


def test_changed_limits_are_allowed(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    open_state(job, info).close()
    faster = load_job(
        None,
        overrides={"input": str(job.input), "model": "m", "qps": 99, "output": str(job.output)},
    )
    open_state(faster, info).close()


def test_a_changed_input_is_refused(job) -> None:  # type: ignore[no-untyped-def]
    open_state(job, preflight(job)).close()
    job.input.write_text('{"prompt": "different"}\n')
    with pytest.raises(UsageError, match="the input file"):
        open_state(job, preflight(job))


def test_one_run_at_a_time(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    first = open_state(job, info)
    with pytest.raises(UsageError, match="another batchq process"):
        open_state(job, info)
    first.close()
    open_state(job, info).close()


def test_status_and_cost_of_a_state_folder_count_each_row_once(job) -> None:  # type: ignore[no-untyped-def]
    info = preflight(job)
    state = open_state(job, info)
    usage: dict[str, Any] = {"model": "qwen-plus", "prompt_tokens": 1000, "completion_tokens": 100}
    state.write([result(0, **usage), result(2, "error"), result(3, "error"), result(4, **usage)])
    state.write([result(2, attempts=2, **usage)])  # --retry-errors answered it
    state.write([result(3, "error", attempts=3)])  # and failed this one again
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


def test_the_latest_shard_wins_everywhere_it_is_read(job) -> None:  # type: ignore[no-untyped-def]
    """One rule, read four ways: the done mask, the attempts so far, the merge's blocks
    and the reports' tables all see row 1's third answer and row 3's second."""
    state = open_state(job, preflight(job))
    state.write([result(1, "error", response=None), result(3, "ok", response="three-a")])
    state.write([result(0, response="zero"), result(1, "error", attempts=2)])
    state.write(
        [
            result(1, response="one", attempts=3),
            result(3, "error", attempts=4),
            result(2, response="two"),
            result(4, response="four"),
        ]
    )
    assert list(state.done_mask(5, retry=ERRORS)) == [1, 1, 1, 0, 1]
    assert attempts_of(state) == {3: 4}
    block = state.index().results(1, 3)
    assert block.column("_row").to_pylist() == [1, 2, 3]
    assert block.column("status").to_pylist() == ["ok", "ok", "error"]
    assert block.column("attempts").to_pylist() == [3, 1, 4]
    rows = [r for table in state.latest(["status"]) for r in table.to_pylist()]
    assert len(rows) == 5  # a row once, however often it was answered
    assert {r["_row"]: r["status"] for r in rows} == {
        0: "ok",
        1: "ok",
        2: "ok",
        3: "error",
        4: "ok",
    }
    with pytest.raises(RuntimeError, match="2 results for 3"):
        state.index().results(3, 3)  # row 5 has none
    state.close()


def test_the_output_path_is_checked_before_anything_is_written(
    write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_jsonl([{"prompt": "a"}])

    def job_to(output: Path) -> Job:
        return load_job(None, overrides={"input": str(path), "model": "m", "output": str(output)})

    check_output(job_to(tmp_path / "missing" / "deeper" / "o.parquet"))
    assert not (tmp_path / "missing").exists()  # nothing is written by the checks
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        check_output(job_to(tmp_path / "file" / "o.parquet"))
    with pytest.raises(UsageError, match="is the input file"):
        check_output(job_to(path))


@pytest.mark.parametrize(
    "fault", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_a_write_that_fails_leaves_neither_a_temp_file_nor_a_half_file(
    tmp_path: Path, fault: BaseException
) -> None:
    path = tmp_path / "kept.bin"
    path.write_bytes(b"the old whole file")

    def half_then_fail(f: Any) -> None:
        f.write(b"half of the new")
        raise fault

    with pytest.raises(type(fault)):
        write_atomic(path, half_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin"]
    assert path.read_bytes() == b"the old whole file"
