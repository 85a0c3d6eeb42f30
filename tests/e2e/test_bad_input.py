"""The bad-input catalogue: each kind is reported with where and what to do, exit 2, and
nothing is sent (the simulator counts zero requests) or written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

OK = '{"id": 1, "text": "fine"}\n'
T = ["--template", "{text}"]

# (name, input file bytes, extra flags, words the message must hold)
CASES: list[tuple[str, bytes, list[str], list[str]]] = [
    ("empty file", b"", T, ["in.jsonl", "no rows"]),
    ("only blank lines", b"\n\n", T, ["no rows"]),
    ("not JSON", (OK + "{'id': 2}\n").encode(), T, ["in.jsonl, line 2", "not valid JSON"]),
    ("JSON that is not an object", (OK + "[2, 3]\n").encode(), T,
     ["line 2", "a JSON list where an object was expected"]),
    ("a BOM inside the file", OK.encode() + b'\xef\xbb\xbf{"id": 2, "text": "x"}\n', T,
     ["line 2", "not valid JSON"]),
    ("invalid UTF-8", OK.encode() + b'{"id": 2, "text": "caf\xe9"}\n', T,
     ["line 2", "not valid JSON"]),
    ("no messages or prompt", b'{"id": 1, "prompt": "a"}\n{"id": 2, "title": "x"}\n', [],
     ["line 2, column messages", "give a messages or prompt column"]),
    ("a prompt that is not text", b'{"id": 1, "prompt": ["a"]}\n', [],
     ["line 1, column prompt", "prompt must be a string"]),
    ("missing template column", (OK + '{"id": 2, "body_text": "x"}\n').encode(), T,
     ["line 2, column text", "template names column 'text'"]),
    ("messages of the wrong shape", b'{"id": 1, "messages": {"role": "user"}}\n',
     [], ["line 1, column messages", "list"]),
    ("unknown role", b'{"id": 1, "messages": [{"role": "human", "content": "x"}]}\n',
     [], ["line 1, column messages", "unknown role 'human'"]),
    ("duplicate ids", (OK + OK).encode(), T, ["line 2, column id", "duplicate id '1'",
                                               "the first is at line 1"]),
    ("null id", (OK + '{"id": null, "text": "x"}\n').encode(), T,
     ["line 2, column id", "missing or null"]),
    ("an input column clashing with the output", b'{"id": 1, "text": "a", "response": "x"}\n',
     T, ["column response", "clashes", "rename it"]),
    ("a request larger than the TPM limit", ('{"id": 1, "text": "' + "w " * 5000 + '"}\n').encode(),
     [*T, "--tpm", "1000"], ["line 1", "more than the whole TPM limit", "raise tpm"]),
    ("a negative limit", OK.encode(), [*T, "--qps", "-5"], ["qps must be positive"]),
    ("zero concurrency", OK.encode(), [*T, "--concurrency", "0"], ["concurrency must be positive"]),
    ("a null where the template reads", (OK + '{"id": 2, "text": null}\n').encode(), T,
     ["line 2, column text", "is null in this row"]),
    ("a template field that is not a column name", OK.encode(), ["--template", "{text.upper}"],
     ["{text.upper} is not a column name"]),
    ("a template field with a conversion", OK.encode(), ["--template", "{text!r}"],
     ["{text!r} is not a column name"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "flags", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    simulator: Callable[..., Any],
    cli: Any,
    tmp_path: Path,
    name: str,
    content: bytes,
    flags: list[str],
    words: list[str],
) -> None:
    sim = simulator()
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    result = cli(
        "run",
        "--input",
        path,
        "--output",
        tmp_path / "o.parquet",
        "--model",
        "m",
        "--base-url",
        sim.base_url,
        *flags,
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    for word in words:
        assert word in result.output
    assert sim.stats.requests == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


JOB_CASES = [
    ("unknown key", 'input = "in.jsonl"\nmodle = "m"\n', "unknown key 'modle'"),
    ("wrong type", 'input = "in.jsonl"\n[limits]\nqps = "fast"\n', "qps must be int or float"),
    ("unknown limit", 'input = "in.jsonl"\n[limits]\nrps = 3\n', "unknown key [limits].rps"),
    ("not TOML", 'input = "in.jsonl\n', "is not valid TOML"),
]


@pytest.mark.parametrize(("name", "text", "words"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_bad_job_file(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path, name: str, text: str, words: str
) -> None:
    sim = simulator()
    job = tmp_path / "job.toml"
    job.write_text(text)
    (tmp_path / "in.jsonl").write_text(OK)
    result = cli("run", job, "--base-url", sim.base_url)
    assert result.exit_code == 2
    assert f"error: {job}: " in result.output or f"error: job file {job}" in result.output
    assert words in result.output
    assert sim.stats.requests == 0


def test_parquet_that_is_not_parquet(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    path = tmp_path / "in.parquet"
    path.write_text(OK)
    result = cli("run", "--input", path, "--model", "m", "--base-url", sim.base_url)
    assert result.exit_code == 2
    assert f"error: {path}: not a readable Parquet file" in result.output
    assert sim.stats.requests == 0


def test_a_parquet_files_rows_are_counted_from_1_as_its_lines_would_be(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path
) -> None:
    """The second row of a Parquet file is "row 2", as the second line of a JSONL file
    is "line 2"."""
    sim = simulator()
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "b"], "text": ["x", None, "z", "w"]}), path)
    null = cli(
        "run", "--input", path, "--model", "m", "--template", "{text}", "--base-url", sim.base_url
    )
    assert null.exit_code == 2
    assert f"error: {path}, row 2, column text: column 'text' is null" in null.output
    twice = cli(
        "run",
        "--input",
        path,
        "--model",
        "m",
        "--template",
        "{id}",
        "--id-column",
        "id",
        "--base-url",
        sim.base_url,
    )
    assert twice.exit_code == 2
    assert f"{path}, row 4, column id: duplicate id 'b'" in twice.output
    assert "(the first is at row 2)" in twice.output
    assert sim.stats.requests == 0


@pytest.mark.parametrize(
    ("input_name", "words"),
    [("missing.jsonl", "does not exist"), ("in.csv", "unknown input format")],
)
def test_unreadable_inputs(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path, input_name: str, words: str
) -> None:
    sim = simulator()
    (tmp_path / "in.csv").write_text("id,text\n1,x\n")
    result = cli(
        "run", "--input", tmp_path / input_name, "--model", "m", "--base-url", sim.base_url
    )
    assert result.exit_code == 2
    assert words in result.output
    assert sim.stats.requests == 0


def test_output_in_a_missing_folder_is_made(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    (tmp_path / "in.jsonl").write_text(OK)
    output = tmp_path / "no" / "such" / "o.parquet"
    result = cli(
        "run",
        "--input",
        tmp_path / "in.jsonl",
        "--output",
        output,
        "--model",
        "m",
        "--template",
        "{text}",
        "--base-url",
        sim.base_url,
    )
    assert result.exit_code == 0, result.output
    assert output.exists()


def test_output_under_a_file_cannot_be_made(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    (tmp_path / "in.jsonl").write_text(OK)
    (tmp_path / "afile").write_text("x")
    result = cli(
        "run",
        "--input",
        tmp_path / "in.jsonl",
        "--output",
        tmp_path / "afile" / "sub" / "o.parquet",
        "--model",
        "m",
        "--template",
        "{text}",
        "--base-url",
        sim.base_url,
    )
    assert result.exit_code == 2
    assert "cannot be made" in result.output
    assert "is a file" in result.output
    assert sim.stats.requests == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_output_in_a_read_only_folder(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path
) -> None:
    sim = simulator()
    folder = tmp_path / "ro"
    folder.mkdir()
    (tmp_path / "in.jsonl").write_text(OK)
    folder.chmod(0o500)
    try:
        output = folder / "o.parquet"
        result = cli(
            "run",
            "--input",
            tmp_path / "in.jsonl",
            "--output",
            output,
            "--model",
            "m",
            "--template",
            "{text}",
            "--base-url",
            sim.base_url,
        )
    finally:
        folder.chmod(0o700)
    assert result.exit_code == 2
    assert "is not writable" in result.output
    assert sim.stats.requests == 0


def test_a_malformed_param_flag(cli: Any, tmp_path: Path) -> None:
    result = cli("run", "--input", tmp_path / "in.jsonl", "--param", "top_p")
    assert result.exit_code == 2
    assert "is not KEY=JSON" in result.output


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ("response_format={type:json_object}", "check its quotes and brackets"),
        ("stop=END", """a string needs JSON quotes: --param 'stop="END"'"""),
        ("top_p=abc", "'abc' is not JSON"),
    ],
)
def test_a_param_that_is_not_json_is_refused_not_sent_as_text(
    simulator: Callable[..., Any], cli: Any, tmp_path: Path, param: str, words: str
) -> None:
    sim = simulator()
    (tmp_path / "in.jsonl").write_text(OK)
    result = cli(
        "run",
        "--input",
        tmp_path / "in.jsonl",
        *T,
        "--model",
        "m",
        "--base-url",
        sim.base_url,
        "--param",
        param,
    )
    assert result.exit_code == 2
    assert "--param" in result.output
    assert words in result.output
    assert "line 1" not in result.output  # the flag's fault, not the input's
    assert sim.stats.requests == 0


def test_a_bad_value_in_the_jobs_settings_blames_the_setting(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(OK)
    result = cli(
        "run",
        "--input",
        tmp_path / "in.jsonl",
        *T,
        "--model",
        "qwen-plus",
        "--simulate",
        "--param",
        'top_p="abc"',
    )
    assert result.exit_code == 2
    assert "top_p = 'abc' (set by a flag or in [request])" in result.output
    assert "line 1" not in result.output
    assert not (tmp_path / "in.batchq.parquet.batchq").exists()
