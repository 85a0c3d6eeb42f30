from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchq.config import PRESETS, load_job
from batchq.errors import UsageError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


JOB = """
name = "j"
input = "in.jsonl"
output = "out.parquet"
[request]
model = "qwen-plus"
template = "{text}"
top_p = 0.8
enable_thinking = false
[limits]
qps = 5
"""


def test_job_file_keys_and_pass_through_params(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, JOB))
    assert job.request.model == "qwen-plus"
    assert job.request.params == {"top_p": 0.8, "enable_thinking": False}
    assert job.limits.qps == 5
    assert job.request.url == PRESETS["dashscope-intl"].base_url
    assert job.request.key_env == "DASHSCOPE_API_KEY"


def test_flags_override_the_file(tmp_path: Path) -> None:
    overrides = {"model": "qwen-max", "qps": 7.5, "params": {"seed": 3}}
    job = load_job(write(tmp_path, JOB), overrides=overrides)
    assert (job.request.model, job.limits.qps, job.request.params["seed"]) == ("qwen-max", 7.5, 3)


def test_flags_alone_make_a_job() -> None:
    job = load_job(None, overrides={"input": "data/x.jsonl", "base_url": "http://h/v1"})
    assert job.request.provider == "custom"
    assert job.output == Path("data/x.batchq.parquet")
    assert job.request.key_env is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('input = "x.jsonl"\nbogus = 1', "unknown key 'bogus'"),
        ('input = "x.jsonl"\n[limits]\nqsp = 1', "unknown key [limits].qsp"),
        ('input = "x.jsonl"\n[limits]\nqps = -1', "qps must be positive"),
        ('input = "x.jsonl"\n[limits]\nconcurrency = "many"', "concurrency must be int"),
        ('input = "x.jsonl"\n[request]\nmax_tokens = 1.5', "max_tokens must be int"),
        ('input = "x.jsonl"\n[request]\nprovider = "acme"', "unknown provider 'acme'"),
        ("input = ", "not valid TOML"),
        ('output = "o.parquet"', "no input"),
    ],
)
def test_bad_job_files_say_what_is_wrong(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        load_job(write(tmp_path, text))


def test_missing_job_file() -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_job("nope.toml")


def test_custom_provider_needs_a_base_url() -> None:
    job = load_job(None, overrides={"input": "x.jsonl", "provider": "custom"})
    with pytest.raises(UsageError, match="needs a base_url"):
        _ = job.request.url


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    job = load_job(None, overrides={"input": "x.jsonl"})
    with pytest.raises(UsageError, match="DASHSCOPE_API_KEY is not set"):
        job.request.api_key()
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    assert job.request.api_key() == "sk-test"
