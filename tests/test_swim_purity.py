"""The membership core stays sans-IO: no trio/asyncio/sockets/threads/clocks/global random."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[1] / "spawnmesh" / "cluster"
PURE = ["awareness", "broadcasts", "config", "messages", "state", "suspicion", "swim", "sim"]
PURE += ["targets"]
FORBIDDEN = {"trio", "asyncio", "socket", "selectors", "threading", "time", "anyio"}


@pytest.mark.parametrize("mod", PURE)
def test_module_is_pure(mod: str) -> None:
    tree = ast.parse((CLUSTER / f"{mod}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in FORBIDDEN, (mod, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN, (mod, node.module)
            if node.module == "random":
                assert {a.name for a in node.names} <= {"Random"}, mod
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
        ):
            assert node.attr == "Random", f"{mod}: module-level random.{node.attr}"


def test_core_is_well_under_a_thousand_lines() -> None:
    assert len((CLUSTER / "swim.py").read_text().splitlines()) < 900
