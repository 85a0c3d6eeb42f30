"""The API key never appears in output, state, log file, progress lines or error messages,
whatever goes wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchq.simulator.server import MODERATION_MARKER

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-batchqTESTkey7f3a9c2e51d4"
FRAGMENTS = [KEY, "batchqTESTkey", "7f3a9c2e51d4"]


def run(args: list[str], key: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MY_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "batchq", "run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_nowhere(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        for fragment in FRAGMENTS:
            assert fragment not in text
    for file in tmp_path.rglob("*"):
        if file.is_file() and file.name != "in.jsonl":
            data = file.read_bytes()
            for fragment in FRAGMENTS:
                assert fragment.encode() not in data, file


def test_the_key_is_nowhere_whatever_goes_wrong(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    faulty = simulator(
        api_key=KEY,
        fail_503=0.1,
        fail_500=0.05,
        fail_429=0.1,
        fail_drop=0.05,
        fail_truncate=0.05,
        fail_malformed=0.05,
        fail_slow=0.05,
        slow_s=2,
        retry_after=0.1,
    )
    rows = [{"id": f"r{i}", "text": f"text {i}"} for i in range(150)]
    rows[3]["text"] = MODERATION_MARKER
    path = write_jsonl(rows)
    out = tmp_path / "o.parquet"
    common = [
        "--input",
        str(path),
        "--output",
        str(out),
        "--model",
        "m",
        "--template",
        "{text}",
        "--api-key-env",
        "MY_KEY",
        "--timeout",
        "1",
        "--log-file",
        str(tmp_path / "log.jsonl"),
    ]
    done = run(
        [*common, "--base-url", faulty.base_url, "--max-attempts", "2", "--keep-state"],
        KEY,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert faulty.stats.by_status[200] > 0
    assert faulty.stats.by_status[400] == 1
    log = (tmp_path / "log.jsonl").read_text()
    assert '"event":"retry"' in log
    assert '"event":"row_error"' in log
    assert_nowhere(tmp_path, done.stdout, done.stderr)

    # A server that rejects the key and echoes it back in its 401 message.
    strict = simulator(api_key="another-key")
    refused = run([*common, "--base-url", strict.base_url, "--restart"], KEY, tmp_path)
    assert refused.returncode == 3
    assert "Incorrect API key provided: ***" in refused.stderr
    assert "Incorrect API key provided: ***" in (tmp_path / "log.jsonl").read_text()
    assert_nowhere(tmp_path, refused.stdout, refused.stderr)

    # Bad input, with the key set.
    path.write_text('{"id": 1, "text": "x"}\n{"id": 1, "text": "y"}\n')
    bad = run([*common, "--base-url", strict.base_url, "--restart"], KEY, tmp_path)
    assert bad.returncode == 2
    assert_nowhere(tmp_path, bad.stdout, bad.stderr)


def test_the_key_is_not_in_batch_files_their_names_or_metadata(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], tmp_path: Path
) -> None:
    sim = simulator(api_key=KEY, batch_seconds=0.2, batch_fail_lines=0.1, fail_503=0.05)
    path = write_jsonl([{"id": f"r{i}", "text": f"text {i}"} for i in range(40)])
    out = tmp_path / "o.parquet"
    done = run(
        [
            "--input",
            str(path),
            "--output",
            str(out),
            "--model",
            "m",
            "--template",
            "{text}",
            "--api-key-env",
            "MY_KEY",
            "--base-url",
            sim.base_url,
            "--via",
            "batch",
            "--poll-s",
            "0.1",
            "--keep-remote",
            "--log-file",
            str(tmp_path / "log.jsonl"),
        ],
        KEY,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    store = sim.simulator.batch
    assert store.stats.uploads == 1
    remote = [
        str(store.files),
        *(str(c) for c in store.contents.values()),
        *(str(b.data) for b in store.batches.values()),
    ]  # names, contents, metadata
    assert any("metadata" in text for text in remote)
    assert_nowhere(tmp_path, done.stdout, done.stderr, *remote)
