"""Architecture rules, read from the source: imports only go down the layers, sans-IO cores
touch no I/O library, and time and randomness enter spawnmesh through one door each.

L0 pure (no trio, no sockets, no clocks): the SWIM core, codecs, ids, errors, config.
L1 trio shells: runtime, statestores, supervisor, ops, transports.
L2 edges: the composition root, the SDK facade, the CLI, host API, test kits.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "spawnmesh"

# First matching pattern wins; every module must match one (a new module needs a decision).
LAYERS: list[tuple[str, int]] = [
    ("spawnmesh.cluster.transport*", 1),
    ("spawnmesh.cluster.discovery*", 1),
    ("spawnmesh.cluster.membership*", 1),
    ("spawnmesh.cluster.*", 0),
    ("spawnmesh.cluster", 0),
    ("spawnmesh.wire.codec*", 0),
    ("spawnmesh.wire.messages*", 0),
    ("spawnmesh.wire.handshake*", 0),
    ("spawnmesh.wire.*", 1),
    ("spawnmesh.mesh", 1),
    ("spawnmesh.mesh.*", 1),
    ("spawnmesh.wire", 1),
    ("spawnmesh._version", 0),
    ("spawnmesh.errors", 0),
    ("spawnmesh.ids", 0),
    ("spawnmesh.clock", 0),
    ("spawnmesh.keyring", 0),
    ("spawnmesh.codec", 0),
    ("spawnmesh.config", 0),
    ("spawnmesh.actors.definition", 0),
    ("spawnmesh.actors.activation", 0),
    ("spawnmesh.statestore.crypto", 0),
    ("spawnmesh.statestore.base", 0),
    ("spawnmesh.actors", 1),
    ("spawnmesh.actors.*", 1),
    ("spawnmesh.statestore", 1),
    ("spawnmesh.statestore.*", 1),
    ("spawnmesh.ops", 1),
    ("spawnmesh.ops.*", 1),
    ("spawnmesh.supervisor", 1),
    ("spawnmesh.logs", 1),
    ("spawnmesh.refs", 1),
    ("spawnmesh.system", 1),
    ("spawnmesh.pb.codegen", 2),
    ("spawnmesh.pb", 0),
    ("spawnmesh.pb.*", 0),
    ("spawnmesh.host", 2),
    ("spawnmesh.host.*", 2),
    ("spawnmesh.spawn_compat.http11", 0),
    ("spawnmesh.spawn_compat", 2),
    ("spawnmesh.spawn_compat.*", 2),
    ("spawnmesh.node", 2),
    ("spawnmesh.cli", 2),
    ("spawnmesh.examples", 2),
    ("spawnmesh.testing", 2),
    ("spawnmesh.testing.*", 2),
    ("spawnmesh", 2),
]

SANS_IO = ["spawnmesh.cluster.*", "spawnmesh.wire.codec*", "spawnmesh.wire.messages*",
           "spawnmesh.wire.handshake*", "spawnmesh.spawn_compat.http11", "spawnmesh.pb.gen*"]
SANS_IO_EXCEPT = ["spawnmesh.cluster.transport*", "spawnmesh.cluster.discovery*",
                  "spawnmesh.cluster.membership*"]
IO_MODULES = {"trio", "asyncio", "socket", "selectors", "threading", "time", "anyio",
              "grpclib", "sqlalchemy", "subprocess"}
RANDOM_OK = {"Random", "SystemRandom"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> int:
    for pattern, layer in LAYERS:
        if fnmatch.fnmatchcase(mod, pattern):
            return layer
    raise AssertionError(f"module {mod} has no layer in tests/test_layers.py: decide one")


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, guarded by TYPE_CHECKING) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    guarded.add(id(inner))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, id(node) in guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno, id(node) in guarded))
            out.extend((f"{node.module}.{a.name}", node.lineno, id(node) in guarded)
                       for a in node.names)
    return out


def resolve_internal(name: str) -> str | None:
    """The spawnmesh module an import names (``spawnmesh.x.y`` or the package of a symbol)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_only_go_down(mod: str) -> None:
    mine = layer_of(mod)
    for name, line, guarded in imports(MODULES[mod]):
        if guarded or not name.startswith("spawnmesh"):
            continue
        target = resolve_internal(name)
        if target is None or target == mod or mod.startswith(target + ".") or target == "spawnmesh":
            if target == "spawnmesh" and mod != "spawnmesh" and name.count(".") == 1:
                pytest.fail(f"{mod}:{line} imports the public facade {name}; import the module")
            continue
        assert layer_of(target) <= mine, (
            f"{mod} (L{mine}) imports {target} (L{layer_of(target)}) at line {line}: "
            "imports only go down"
        )


def _sans_io(mod: str) -> bool:
    return any(fnmatch.fnmatchcase(mod, p) for p in SANS_IO) and not any(
        fnmatch.fnmatchcase(mod, p) for p in SANS_IO_EXCEPT
    )


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if _sans_io(m)))
def test_sans_io_cores_import_no_io(mod: str) -> None:
    for name, line, _ in imports(MODULES[mod]):
        top = name.split(".")[0]
        assert top not in IO_MODULES, f"sans-IO core {mod} imports {name} at line {line}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_time_and_randomness_enter_through_one_door(mod: str) -> None:
    tree = ast.parse(MODULES[mod].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (
                node.value.id == "time"
                and node.attr in ("time", "monotonic", "monotonic_ns", "perf_counter")
                and mod != "spawnmesh.clock"  # the door itself (its busy-wait clock)
            ):
                pytest.fail(f"{mod}:{node.lineno} reads time.{node.attr}(); use "
                            "trio.current_time() in shells, now_ms in cores, spawnmesh.clock "
                            "for wall time")
            if node.value.id == "random" and node.attr not in RANDOM_OK:
                pytest.fail(f"{mod}:{node.lineno} uses module-level random.{node.attr}; pass "
                            "a seeded random.Random in")
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "random"):
            names = {a.name for a in node.names}
            bad = names - RANDOM_OK if node.module == "random" else names
            assert not bad, f"{mod}:{node.lineno} imports {bad} from {node.module}"
    if mod != "spawnmesh.clock":
        for name, line, _ in imports(MODULES[mod]):
            assert name != "time", (
                f"{mod}:{line} imports time: wall time comes from spawnmesh.clock, monotonic "
                "time from trio.current_time() or now_ms arguments"
            )


def test_every_module_has_a_layer() -> None:
    for mod in MODULES:
        layer_of(mod)


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checker itself works: a core importing trio and reading the clock is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nimport time\nx = time.monotonic()\n")
    names = [n for n, _, _ in imports(bad)]
    assert "trio" in names and "time" in names
    assert layer_of("spawnmesh.node") > layer_of("spawnmesh.actors.runtime") > layer_of(
        "spawnmesh.cluster.swim"
    )
