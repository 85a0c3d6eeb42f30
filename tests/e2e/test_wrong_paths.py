"""Every command, given each kind of wrong path a user types: exit 2 with a message, never
a traceback, and nothing sent or written over."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_run import rows

KINDS = ["folder", "missing", "foreign file", "the input", "unwritable"]


def wrong(kind: str, tmp_path: Path, input_path: Path) -> Path:
    if kind == "folder":
        (tmp_path / "adir").mkdir(exist_ok=True)
        return tmp_path / "adir"
    if kind == "missing":
        return tmp_path / "no" / "such.parquet"
    if kind == "foreign file":
        (tmp_path / "notes.parquet").write_text("my notes\n")
        return tmp_path / "notes.parquet"
    if kind == "the input":
        return input_path
    return Path("/proc/batchq-cannot-be-here/o.parquet")  # not even root can make it


def commands(sim: Any, job: Path, input_path: Path, bad: Path) -> dict[str, list[Any]]:
    flags = ["--model", "qwen-plus", "--template", "{text}", "--base-url", sim.base_url]
    to_bad = ["--input", input_path, "--output", bad, *flags]
    return {
        "run --input": ["run", "--input", bad, *flags],
        "run --output": ["run", *to_bad],
        "run --output --restart": ["run", *to_bad, "--restart"],
        "run JOB": ["run", bad],
        "status": ["status", bad],
        "cost": ["cost", bad],
        "estimate --input": ["estimate", "--input", bad, *flags],
        "export-batch --out-dir": ["export-batch", job, "--out-dir", bad],
        "export-batch --output": ["export-batch", *to_bad],
        "import-batch RESULTS": ["import-batch", bad, "--job", job],
        "import-batch --job": ["import-batch", input_path, "--job", bad],
    }


NAMES = list(commands(type("S", (), {"base_url": ""})(), Path(), Path(), Path()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_path_is_exit_2_with_a_message(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    name: str,
    kind: str,
) -> None:
    sim = simulator()
    input_path = write_jsonl(rows(5))
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{input_path}"\noutput = "{tmp_path / "o.parquet"}"\n[request]\n'
        f'model = "qwen-plus"\ntemplate = "{{text}}"\nbase_url = "{sim.base_url}"\n'
    )
    bad = wrong(kind, tmp_path, input_path)
    args = commands(sim, job, input_path, bad)[name]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli(*args)  # a traceback fails the test here
    if result.exit_code == 0:
        # Some paths are right for some arguments (a missing folder for --out-dir, the
        # input file as import-batch's results is still refused below): nothing overwritten.
        assert (kind, name) in ALLOWED, result.output
    else:
        assert result.exit_code == 2, result.output
        # batchq's own message, or click's for a path of the wrong kind
        assert result.output.startswith("error: ") or "\nError: " in result.output, result.output
    assert sim.stats.requests == 0 or (kind, name) in ALLOWED
    for path, content in before.items():
        if path.exists() and path != tmp_path / "o.parquet":
            assert path.read_bytes() == content, path


#: A wrong path for one argument is a fine one for another: a missing folder is made for
#: an output or --out-dir; a folder is what --out-dir wants.
ALLOWED = {
    ("missing", "run --output"), ("missing", "run --output --restart"),
    ("missing", "export-batch --out-dir"), ("missing", "export-batch --output"),
    ("folder", "export-batch --out-dir"), ("the input", "run --input"),
    ("the input", "estimate --input"),
}  # fmt: skip


@pytest.mark.timeout(30)
def test_simulate_on_a_port_in_use(cli: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("simulate", "--port", taken.getsockname()[1])
    assert result.exit_code == 2, result.output
    assert "address already in use" in result.output
    assert "choose another --port" in result.output
