"""The package as a user's type checker sees it: ``py.typed`` shipped, and the names at
``batchq.`` (imported lazily at run time) typed as their definitions, so that a wrong
keyword in a user's script is a type error, not a surprise at run time."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_SCRIPT = """
import polars as pl

import batchq

frame = pl.DataFrame({"text": ["good pan"]})
labeled = batchq.run(frame, model="qwen-plus", template="{text}", qps=5, simulate=True)
summary: batchq.RunSummary = batchq.run_job("job.toml", simulate=True, qps=5)
try:
    batchq.run(frame, model="qwen-plus")
except batchq.InputError as e:
    where: int | None = e.row
reveal_type(batchq.run)
reveal_type(batchq.run_job)
"""


def mypy(script: Path) -> subprocess.CompletedProcess[str]:
    # From the checkout (its strict settings, and the cache `mypy batchq` left), where
    # ``batchq`` is found as the installed package would be.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_package_ships_py_typed() -> None:
    assert resources.files("batchq").joinpath("py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()  # in the wheel's data


@pytest.mark.timeout(300)
def test_a_users_script_is_type_checked_against_batchq(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(USER_SCRIPT)
    bad = tmp_path / "bad.py"
    bad.write_text(USER_SCRIPT.replace("qps=5, simulate", "qpss=5, simulate"))
    checked = mypy(good)
    assert checked.returncode == 0, checked.stdout
    revealed = [line for line in checked.stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 2
    assert all("Any" not in line.split("def ", 1)[0] for line in revealed), revealed
    assert "model: builtins.str" in revealed[0] or "RunKeys" in revealed[0], revealed[0]
    assert "RunSummary" in revealed[1], revealed[1]
    refused = mypy(bad)
    assert refused.returncode == 1
    assert '"qpss"' in refused.stdout, refused.stdout
