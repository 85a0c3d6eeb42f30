"""The README documents every command and every flag of every command."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from batchq.cli import main

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_is_in_the_readme(name: str) -> None:
    assert f"batchq {name}" in README


@pytest.mark.parametrize(
    "flag",
    sorted(
        {
            opt
            for name in sorted(main.commands)
            for param in main.commands[name].params
            if isinstance(param, click.Option) and not param.hidden
            for opt in param.opts
            if opt.startswith("--") and opt != "--help"
        }
    ),
)
def test_every_flag_is_in_the_readme(flag: str) -> None:
    assert f"`{flag}" in README
