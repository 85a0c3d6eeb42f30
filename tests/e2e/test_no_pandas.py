"""pandas is imported only when batchq is given a pandas object (SPEC "Python API").
pyarrow imports it, wherever it is installed, on its first conversion of a Python value
(0.15-0.2 s and 42 MB), so batchq converts none itself (``batchq.arrays``). Each test runs
its commands in a fresh process in which importing pandas fails and is counted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("pandas")  # where it is not installed, nothing can import it

GUARD = textwrap.dedent(
    """
    import atexit, importlib.abc, importlib.machinery, os, sys, traceback

    attempts = []

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            attempts.append("".join(traceback.format_stack(limit=12)))
            raise RuntimeError("pandas was imported")

        def exec_module(self, module):
            raise RuntimeError("pandas was imported")

    class NoPandas:  # polars asks find_spec("pandas") without importing it: no harm
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pandas":
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, NoPandas())

    def report():
        if attempts:
            sys.stderr.write("PANDAS IMPORTED\\n" + attempts[0])
            sys.stderr.flush()
            os._exit(99)

    atexit.register(report)

    from batchq.cli import main

    def cli(*args):
        try:
            main([str(a) for a in args], standalone_mode=False)
        except SystemExit as e:
            assert not e.code, (args, e.code)
    """
)


def guarded(code: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", GUARD + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_cli_runs_resumes_and_reports_import_no_pandas(
    write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    reviews = write_jsonl(
        [{"id": f"r{i}", "text": f"review {i}", "stars": i % 5} for i in range(40)],
        "reviews.jsonl",
    )
    pl.read_ndjson(reviews).write_parquet(tmp_path / "reviews.parquet")
    messages = [{"role": "user", "content": "hi"}]
    write_jsonl([{"id": i, "messages": messages} for i in range(20)], "messages.jsonl")
    body = {"model": "qwen-plus", "max_tokens": 5, "messages": messages}
    write_jsonl(
        [
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            for i in range(20)
        ],
        "lines.jsonl",
    )
    # ids of two kinds, a nested column, a null: the exact pass, not the fast one
    odd = [{"id": 1, "text": "a", "meta": {"k": [1, 2]}}, {"id": "x", "text": "b", "meta": None}]
    write_jsonl(odd, "odd.jsonl")
    guarded(
        """
        common = ["--model", "qwen-plus", "--simulate", "--quiet"]
        cli("run", "--input", "reviews.jsonl", "--output", "a.parquet", "--template",
            "Review: {text} ({stars})", *common)
        cli("run", "--input", "reviews.jsonl", "--output", "a.parquet", "--template",
            "Review: {text} ({stars})", *common)  # complete already
        cli("run", "--input", "messages.jsonl", "--output", "b.parquet", "--dedupe", *common)
        cli("run", "--input", "lines.jsonl", "--output", "c.parquet", *common)
        cli("run", "--input", "odd.jsonl", "--output", "d.parquet", "--template", "T: {text}",
            *common)
        cli("run", "--input", "reviews.jsonl", "--output", "e.parquet", "--template", "{text}",
            "--via", "batch", *common)
        cli("run", "--input", "reviews.parquet", "--output", "h.parquet", "--template", "{text}",
            "--labels", "positive,negative", "--keep-raw", *common)
        cli("cost", "a.parquet", "--by", "stars")
        cli("cost", "e.parquet")
        cli("status", "a.parquet", "--json")
        cli("estimate", "--input", "reviews.jsonl", "--model", "qwen-plus", "--template", "{text}")
        # against a server that fails a third of requests: rows end as errors, a resume
        # sends them again, an estimate sends a sample
        os.environ["DASHSCOPE_API_KEY"] = "sk-simulated"
        from batchq.simulator import SimConfig, serve_in_thread
        with serve_in_thread(SimConfig(fail_500=0.3, fail_429=0.1, seed=2)) as sim:
            url = ["--base-url", sim.base_url, "--model", "qwen-plus"]
            job = ["--input", "reviews.jsonl", "--output", "f.parquet", "--template", "{text}"]
            cli("run", *job, "--max-attempts", "1", "--quiet", *url)
            cli("run", *job, "--retry-errors", "--quiet", *url)
            cli("estimate", "--input", "reviews.jsonl", "--output", "g.parquet", "--template",
                "{text}", "--sample", "5", *url)
        """,
        tmp_path,
    )


def test_the_python_api_over_polars_imports_no_pandas(tmp_path: Path) -> None:
    guarded(
        f"""
        import os
        os.environ["XDG_CACHE_HOME"] = {str(tmp_path / "cache")!r}
        import polars as pl
        import batchq
        frame = pl.DataFrame({{"id": [1, 2, 3], "text": ["a", "b", "c"]}})
        keys = dict(model="qwen-plus", template="Say {{text}}", simulate=True, progress=False)
        out = batchq.run(frame, **keys)
        assert out["status"].to_list() == ["ok"] * 3
        assert batchq.run(frame, **keys)["response"].to_list() == out["response"].to_list()
        lazy = pl.LazyFrame({{"text": ["x", "y"]}})
        assert batchq.run(lazy, cache=False, **keys).height == 2
        assert len(batchq.run([{{"text": "q"}}], cache=False, **keys)) == 1
        """,
        tmp_path,
    )
