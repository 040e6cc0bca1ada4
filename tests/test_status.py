"""``GET /v1/status``, ``GET /v1/cluster/status`` and ``spawnmesh status`` against three
embedded nodes (real gossip, real peer wire, one store), with the CLI run as a real process;
and the aggregation client against members that refuse or never answer."""

from __future__ import annotations

import json
import socket
from typing import Any

import trio

from spawnmesh import Node
from spawnmesh.errors import StatestoreUnavailable
from spawnmesh.ops.status import fetch_statuses
from spawnmesh.statestore import MemoryStateStore
from spawnmesh.statestore.base import StateWrite, WriteResult
from tests.e2e import http_get, run_cli
from tests.test_mesh import cluster, ref


class FlakyStore(MemoryStateStore):
    """The memory store, with writes failing while ``down`` (a database outage)."""

    down = False

    async def save_many(self, writes: list[StateWrite]) -> list[WriteResult]:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise StatestoreUnavailable("the test took the store down")
        return await super().save_many(writes)


def url(node: Node) -> str:
    return f"http://127.0.0.1:{node.ops_port}"


async def get(node: Node, path: str) -> tuple[int, Any]:
    status, body = await trio.to_thread.run_sync(http_get, url(node) + path)
    return status, json.loads(body)


async def cli(*args: str) -> Any:
    return await trio.to_thread.run_sync(lambda: run_cli(*args))


async def test_status_documents_and_the_status_command() -> None:
    store = FlakyStore()
    async with cluster(["a", "b", "c"], store) as nodes:
        names = [f"k{i}" for i in range(24)]
        for i, name in enumerate(names):
            await ref(nodes[i % 3], name).invoke("add", 1)
        active = {n.name: n.runtime.active_count() for n in nodes}
        assert sum(active.values()) == len(names)

        # one node in one document
        for node in nodes:
            status, doc = await get(node, "/v1/status")
            assert status == 200, doc
            assert doc["name"] == node.name and doc["ready"] is True and doc["reasons"] == []
            assert doc["version"] and doc["uptime_s"] > 0 and doc["now_ms"] > 0
            assert doc["active_actors"] == active[node.name]
            assert doc["actors_by_type"] == (
                {"mesh/counter": active[node.name]} if active[node.name] else {}
            )
            assert doc["placement_version"] == nodes[0].router.placement.version  # type: ignore[union-attr]
            assert "actors" not in doc  # rows only when asked for
            assert doc["invocations"]["ok"] >= 1 or active[node.name] == 0

        status, doc = await get(nodes[0], "/v1/status?actors=100&q=K1")  # case-insensitive
        assert status == 200
        rows = doc["actors"]
        assert rows and all("k1" in r["name"] for r in rows)
        assert {r["name"] for r in rows} == {
            n for n in names if "k1" in n and nodes[0].runtime.owns(("mesh", n))
        }
        assert (await get(nodes[0], "/v1/status?actors=x"))[0] == 400
        assert (await get(nodes[0], "/v1/cluster/status?actors=-1"))[0] == 400

        # every member from one node, and the ring balance
        status, whole = await get(nodes[1], "/v1/cluster/status")
        assert status == 200, whole
        assert whole["self"] == "b"
        rows = {m["name"]: m for m in whole["members"]}
        assert set(rows) == {"a", "b", "c"}
        for name, m in rows.items():
            assert m["status"] == "alive" and m["self"] == (name == "b")
            assert m["node"]["name"] == name and m["node"]["ready"] is True
            assert "error" not in m
        assert whole["ring"] == {"mesh/counter": {n: c for n, c in sorted(active.items()) if c}}

        # the CLI, as an operator runs it
        table = await cli("status", "--node", url(nodes[2]))
        assert table.returncode == 0, table
        out = table.stdout
        assert out.startswith("node c  spawnmesh ") and "  ready  " in out.splitlines()[0]
        for name in ("a", "b", "c"):
            assert any(
                line.split()[:2] == [name + (" *" if name == "c" else ""), "alive"]
                or line.split()[:3] == [name, "*", "alive"]
                for line in out.splitlines()
            ), out
        assert "Ring balance (actors owned per member)" in out
        counts = next(line.split() for line in out.splitlines() if line.startswith("mesh/counter"))
        assert counts == [
            "mesh/counter",
            *(str(active[n]) for n in ("a", "b", "c")),
            str(len(names)),
        ]
        assert f"Actors by type: mesh/counter {len(names)}" in out
        assert "Readiness: all 3 reachable members ready" in out

        as_json = await cli("status", "--node", url(nodes[2]), "--json")
        assert as_json.returncode == 0, as_json
        parsed = as_json.json()
        assert isinstance(parsed, dict) and parsed["self"] == "c"
        assert parsed["ring"] == whole["ring"]

        # a node whose state writes fail says so, and why
        owner = next(n for n in nodes if n.runtime.owns(("mesh", "k0")))
        store.down = True
        try:
            try:
                await ref(owner, "k0").invoke("add", 1)
            except StatestoreUnavailable:
                pass
            status, doc = await get(owner, "/v1/status")
            assert doc["ready"] is False
            assert any("state writes failing" in r for r in doc["reasons"]), doc["reasons"]
            assert doc["recent_errors"][0]["code"] == "statestore_unavailable"
            table = await cli("status", "--node", url(nodes[2]))
            assert table.returncode == 0, table
            assert f"Readiness: {owner.name}: state writes failing" in table.stdout, table
        finally:
            store.down = False
        await ref(owner, "k0").invoke("add", 1)  # the next write succeeds: ready again
        status, doc = await get(owner, "/v1/status")
        assert doc["ready"] is True and doc["reasons"] == []


async def test_status_of_a_node_that_cannot_be_reached() -> None:
    result = await cli("status", "--node", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("spawnmesh: cannot connect to http://127.0.0.1:9")


async def test_aggregation_marks_members_that_refuse_or_never_answer() -> None:
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    try:
        targets = {
            "silent": f"127.0.0.1:{silent.getsockname()[1]}",
            "refused": f"127.0.0.1:{closed.getsockname()[1]}",
            "garbled": "no-port-here",
        }
        t0 = trio.current_time()
        got = await fetch_statuses(targets, "/v1/status", timeout_s=0.5)
        assert trio.current_time() - t0 < 5  # in parallel, each bounded
        assert set(got) == set(targets)
        assert isinstance(got["silent"], str) and "within 0.5 s" in got["silent"]
        assert isinstance(got["refused"], str) and got["refused"].startswith("unreachable")
        assert isinstance(got["garbled"], str) and "not host:port" in got["garbled"]
    finally:
        silent.close()
        closed.close()
