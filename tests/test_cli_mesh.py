"""Where actors live: ``GET /v1/actors``, ``GET /v1/placement/...``, the ``ops_address`` of
``/v1/members`` rows, and the CLI commands ``actors``, ``placement`` and ``invoke`` on top of
them, against three embedded nodes (real gossip, real peer wire, one store) and with the CLI
run as a real process.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trio

from spawnmesh import Node
from spawnmesh.statestore import MemoryStateStore
from tests.conftest import NodeFactory
from tests.e2e import http_get, run_cli
from tests.test_mesh import cluster, mesh, owners, ref


def url(node: Node) -> str:
    return f"http://127.0.0.1:{node.ops_port}"


async def get(node: Node, path: str) -> tuple[int, Any]:
    status, body = await trio.to_thread.run_sync(http_get, url(node) + path)
    return status, json.loads(body)


async def cli(*args: str) -> Any:
    return await trio.to_thread.run_sync(lambda: run_cli(*args))


async def activate(nodes: list[Node], names: list[str]) -> dict[str, int]:
    """Add to every counter through every node; the expected values."""
    expected = dict.fromkeys(names, 0)
    for i, name in enumerate(names):
        for j, node in enumerate(nodes):
            expected[name] += i + j
            assert await ref(node, name).invoke("add", i + j) == expected[name]
    return expected


async def test_actors_and_placement_endpoints() -> None:
    store = MemoryStateStore()
    async with cluster(["a", "b", "c"], store) as nodes:
        names = [f"k{i}" for i in range(30)]
        await activate(nodes, names)
        where: dict[str, str] = {}
        for node in nodes:
            status, body = await get(node, "/v1/actors")
            assert status == 200, body
            assert body["node"] == node.name and body["truncated"] is False
            assert body["active"] == len(body["actors"]) == node.runtime.active_count()
            for row in body["actors"]:
                assert row["name"] not in where, f"{row['name']} active on two nodes"
                where[row["name"]] = node.name
                assert row["system"] == "mesh" and row["parent"] == "counter"
                assert row["type"] == "mesh/counter" and row["kind"] == "unnamed"
                assert row["revision"] >= 1 and row["queued"] == 0 and row["busy"] is False
                assert row["dirty"] is False  # write-through
                assert 0 <= row["idle_s"] < 60
            assert body["handing_off"] == []
        assert set(where) == set(names)
        assert len(set(where.values())) == 3  # 30 keys over 3 members: each owns some

        members: dict[str, Any] = {}
        for node in nodes:
            status, body = await get(node, "/v1/members")
            assert status == 200
            rows = {r["name"]: r for r in body["members"]}
            for n in nodes:
                assert rows[n.name]["ops_address"] == f"127.0.0.1:{n.ops_port}"
            members[node.name] = rows

        versions = set()
        for name in names:
            for node in nodes:
                status, body = await get(node, f"/v1/placement/mesh/{name}?parent=counter")
                assert status == 200, body
                assert body["owner"] == where[name] == owners(nodes, name)[0], body
                assert body["owner_ops_address"] == members[node.name][where[name]]["ops_address"]
                assert body["active_here"] is (node.name == where[name])
                assert body["members"] == ["a", "b", "c"]
                assert body["type"] == "mesh/counter" and body["node"] == node.name
                versions.add(body["placement_version"])
        assert len(versions) == 1  # one view: one placement version everywhere

        # an instance known only by its stored row: no parent needed
        status, body = await get(nodes[0], "/v1/placement/mesh/k3")
        assert status == 200 and body["owner"] == where["k3"]
        status, body = await get(nodes[0], "/v1/placement/mesh/nobody")
        assert status == 404 and body["error"]["code"] == "actor_not_found"

        status, body = await get(nodes[1], "/v1/actors?limit=2")
        assert status == 200 and len(body["actors"]) == 2 and body["truncated"] is True
        assert body["active"] == nodes[1].runtime.active_count()
        for bad in ("0", "x", "100001", "-1", "%C2%B2"):
            status, body = await get(nodes[1], f"/v1/actors?limit={bad}")
            assert status == 400 and "limit" in body["error"]["message"], (bad, body)
        status, body = await get(nodes[1], "/v1/actors?limit=%FF")
        assert status == 400
        with trio.fail_after(10):
            reply = await trio.to_thread.run_sync(
                lambda: run_cli(
                    "invoke", "--node", url(nodes[2]), "mesh", "k0", "where", "--parent", "counter"
                )
            )
        assert reply.ok().json() == where["k0"]


async def test_cli_actors_placement_and_invoke_through_every_node() -> None:
    store = MemoryStateStore()
    async with cluster(["a", "b", "c"], store) as nodes:
        names = [f"q{i}" for i in range(12)]
        expected = await activate(nodes, names)
        owner = {name: owners(nodes, name)[0] for name in names}

        everything = (await cli("actors", "--all", "--json", "--node", url(nodes[1]))).ok()
        replies = everything.json()
        assert [r["node"] for r in replies] == ["a", "b", "c"]
        seen = {a["name"]: r["node"] for r in replies for a in r["actors"]}
        assert seen == owner

        table = (await cli("actors", "--node", url(nodes[0]))).ok().stdout.splitlines()
        assert table[0].split() == [
            "Node",
            "System",
            "Name",
            "Parent",
            "Revision",
            "Queued",
            "Idle",
        ]
        assert sorted(line.split()[2] for line in table[1:]) == sorted(
            n for n in names if owner[n] == "a"
        )
        assert all(line.split()[:2] == ["a", "mesh"] for line in table[1:])

        name = names[5]
        text = (
            (await cli("placement", "mesh", name, "--parent", "counter", "--node", url(nodes[2])))
            .ok()
            .stdout
        )
        o = next(n for n in nodes if n.name == owner[name])
        assert f"mesh/{name}: owner {owner[name]} (ops 127.0.0.1:{o.ops_port})" in text, text
        assert "hosted by a, b, c" in text

        for node in nodes:  # invoke works against any node of the cluster
            result = (
                await cli(
                    "invoke",
                    "--node",
                    url(node),
                    "mesh",
                    name,
                    "add",
                    "--data",
                    "1",
                    "--parent",
                    "counter",
                )
            ).ok()
            expected[name] += 1
            assert result.json() == expected[name]
        assert await ref(nodes[0], name).invoke("add", 0) == expected[name]


def test_actors_all_reports_a_member_that_does_not_answer() -> None:
    """A member whose ops port does not answer is named on stderr (exit 1); the members that
    answered are still listed. A stand-in node answers /v1/members and /v1/actors."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # nothing listens here once closed
    served: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = served.get(self.path.split("?")[0], b"{}")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    served["/v1/members"] = json.dumps(
        {
            "enabled": True,
            "members": [
                {"name": "a", "status": "alive", "self": True, "ops_address": f"127.0.0.1:{port}"},
                {
                    "name": "b",
                    "status": "alive",
                    "self": False,
                    "ops_address": f"127.0.0.1:{dead_port}",
                },
                {"name": "c", "status": "dead", "self": False, "ops_address": "127.0.0.1:9"},
                {"name": "d", "status": "suspect", "self": False, "ops_address": ""},
            ],
        }
    ).encode()
    served["/v1/actors"] = json.dumps({"node": "a", "active": 1, "truncated": False,
        "actors": [{"system": "s", "name": "x", "parent": None, "revision": 3, "queued": 0,
                    "idle_s": 1.25}],
        "handing_off": [{"system": "s", "name": "y"}]}).encode()  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_cli("actors", "--all", "--node", f"http://127.0.0.1:{port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[1].split() == ["a", "s", "x", "-", "3", "0", "1.2s"]
    assert result.stdout.splitlines()[2].split() == ["a", "s", "y", "-", "-", "-", "handing", "off"]
    assert len(result.stdout.splitlines()) == 3, result  # c is dead: not asked
    assert f"cannot connect to http://127.0.0.1:{dead_port}" in result.stderr, result
    assert "member d advertises no ops address" in result.stderr, result


async def test_placement_with_clustering_off_names_this_node(make_node: NodeFactory) -> None:
    async with make_node(mesh, **{"cluster.enabled": False}) as node:
        assert await ref(node, "solo").invoke("add", 2) == 2
        status, body = await get(node, "/v1/placement/mesh/solo?parent=counter")
        assert status == 200
        assert body["owner"] == node.name and body["members"] == [node.name]
        assert body["placement_version"] is None and body["active_here"] is True
        status, body = await get(node, "/v1/members")
        assert body["members"] == []
        result = (await cli("actors", "--all", "--json", "--node", url(node))).ok()
        (only,) = result.json()
        assert [a["name"] for a in only["actors"]] == ["solo"]
