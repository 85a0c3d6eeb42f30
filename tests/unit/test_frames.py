"""Staging a LazyFrame: the same Parquet bytes in a child process as in this one, and
in this one where the plan cannot go to a child."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batchq.errors import UsageError
from batchq.frames import Source, stage


@pytest.fixture
def scan(tmp_path: Path) -> pl.LazyFrame:
    pl.DataFrame({"id": range(5000), "text": [f"review {i}" for i in range(5000)]}).write_parquet(
        tmp_path / "in.parquet"
    )
    return pl.scan_parquet(tmp_path / "in.parquet")


def test_a_scan_is_staged_as_polars_sinks_it_here(scan: pl.LazyFrame, tmp_path: Path) -> None:
    query = scan.filter(pl.col("id") % 3 == 0).with_columns(n=pl.col("text").str.len_chars())
    stage(Source("lazy"), query, tmp_path / "staged.parquet", rename={"text": "prompt"})
    query.rename({"text": "prompt"}).sink_parquet(tmp_path / "here.parquet")
    # The cache knows a call again by these bytes.
    assert (tmp_path / "staged.parquet").read_bytes() == (tmp_path / "here.parquet").read_bytes()


def test_plans_a_child_cannot_take_are_staged_here(scan: pl.LazyFrame, tmp_path: Path) -> None:
    doubled = scan.with_columns(
        twice=pl.col("id").map_batches(lambda ids: ids * 2, return_dtype=pl.Int64)
    )  # a Python function: polars serializes it only with cloudpickle
    stage(Source("lazy"), doubled, tmp_path / "udf.parquet", rename={})
    assert pl.read_parquet(tmp_path / "udf.parquet")["twice"].sum() == 2 * sum(range(5000))
    in_memory = pl.DataFrame({"text": ["a", "b"]}).lazy()
    stage(Source("lazy"), in_memory, tmp_path / "df.parquet", rename={})
    assert pl.read_parquet(tmp_path / "df.parquet")["text"].to_list() == ["a", "b"]
    with pytest.raises(UsageError, match=r"LazyFrame's query cannot be written.*nope"):
        stage(Source("lazy"), scan.select(pl.col("nope")), tmp_path / "bad.parquet", rename={})
    assert not (tmp_path / "bad.parquet").exists()
