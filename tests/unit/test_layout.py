"""The tree's shape, read as a newcomer would: the state folder spelled in one place,
imports that point one way between batchq's parts, runtime dependencies that earn it."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "batchq"
#: What only batchq/state/ may spell: the folder's suffix, its parts, the shard glob.
STATE_LAYOUT = {".batchq", "shards", "lock", "[0-9]*.parquet", "manifest.json"}
#: manifest.json is also the name of the Batch-API export folder's own index.
ALSO_EXPORT = {"batchq/batch/api.py": {"manifest.json"}}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def imported(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def part(name: str) -> str | None:
    """The part of batchq a module belongs to: its folder (``state``), or its own name."""
    pieces = name.removesuffix(".py").replace("/", ".").split(".")
    if pieces[0] != "batchq" or len(pieces) < 2:
        return None
    return pieces[1] if pieces[1] != "__init__" else None


def test_only_the_state_package_spells_the_state_folder() -> None:
    spelled = []
    for name, tree in modules():
        if name.startswith("batchq/state/"):
            continue
        allowed = ALSO_EXPORT.get(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in STATE_LAYOUT - allowed:
                spelled.append(f"{name}:{node.lineno} {node.value!r}")
        spelled += [f"{name}: imports fcntl" for m in imported(tree) if m == "fcntl"]
    assert spelled == []


def test_imports_point_one_way_between_parts() -> None:
    arrows: dict[str, set[str]] = {}
    for name, tree in modules():
        source = part(name)
        for target in filter(None, map(part, imported(tree))):
            if source is not None and target != source:
                arrows.setdefault(source, set()).add(target)

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(arrows.get(path[-1], ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := cycle_from(start, [*path, nxt])):
                return found
        return None

    cycles = [c for start in sorted(arrows) if (c := cycle_from(start, [start]))]
    assert cycles == [], " / ".join(" -> ".join(c) for c in cycles)


def test_every_runtime_dependency_is_imported_by_batchq() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    used = {m.split(".")[0] for _, tree in modules() for m in imported(tree)}
    assert sorted(names - used) == []
