"""The cluster through a node's ops API (in process, real HTTP on loopback): two embedded nodes
join over ``POST /v1/cluster/join``, ``GET /v1/members`` lists both with metadata and counters,
bad bodies are 400, a node with clustering off says so, leave marks the node left and asks it
to stop, and the gossip metrics are exported."""

from __future__ import annotations

import json
from typing import Any

import trio

from spawnmesh import ActorSystem, Context, action
from tests.conftest import NodeFactory
from tests.e2e import http_get, http_post_json

system = ActorSystem("demo")


@system.actor("echo")
class Echo:
    @action
    async def say(self, ctx: Context, text: str) -> str:
        return text


async def get_json(url: str) -> Any:
    status, body = await trio.to_thread.run_sync(http_get, url)
    assert status == 200, body
    return json.loads(body)


async def post(url: str, body: object) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(http_post_json, url, body)


async def test_join_members_and_leave_over_http(make_node: NodeFactory) -> None:
    async with (
        make_node(system, name="a", **{"cluster.tags": "zone=z1"}) as a,
        make_node(system, name="b") as b,
    ):
        ua, ub = f"http://127.0.0.1:{a.ops_port}", f"http://127.0.0.1:{b.ops_port}"
        info = await get_json(f"{ua}/v1/node")
        gossip_a = info["cluster"]["gossip_address"]
        assert gossip_a.startswith("127.0.0.1:") and info["cluster"]["encrypted"] is False

        status, reply = await post(f"{ub}/v1/cluster/join", {"addrs": [gossip_a]})
        assert (status, reply) == (200, {"answered": 1, "tried": 1})
        listed = await get_json(f"{ub}/v1/members")
        rows = {r["name"]: r for r in listed["members"]}
        assert set(rows) == {"a", "b"} and listed["self"] == "b"
        assert rows["a"]["status"] == "alive" and rows["a"]["tags"] == {"zone": "z1"}
        assert rows["a"]["actor_types"] == ["demo/echo"]
        assert a.peers is not None
        assert rows["a"]["peer_address"] == f"127.0.0.1:{a.peers.port}"
        assert rows["b"]["self"] is True
        assert listed["stats"]["transport"]["sent_bytes"] > 0

        for bad in ({}, {"addrs": []}, {"addrs": "x:1"}, {"addrs": [1]}):
            status, reply = await post(f"{ub}/v1/cluster/join", bad)
            assert status == 400, (bad, reply)
        status, reply = await post(f"{ub}/v1/cluster/join", {"addrs": ["no port here:x"]})
        assert status == 400 and "bad address" in reply["error"]["message"]

        metrics = (await trio.to_thread.run_sync(http_get, f"{ua}/metrics"))[1]
        assert 'spawnmesh_cluster_members{node="a",status="alive"} 2.0' in metrics
        assert "spawnmesh_cluster_sent_bytes" in metrics

        status, reply = await post(f"{ub}/v1/cluster/leave", {})
        assert (status, reply) == (200, {"left": True, "shutting_down": True})
        with trio.fail_after(10):
            await b.stop_requested.wait()
            while a.membership is not None and a.membership.live().keys() != {"a"}:
                await a.membership.wait_changed(a.membership.version)
        statuses = {r["name"]: r["status"] for r in (await get_json(f"{ua}/v1/members"))["members"]}
        assert statuses == {"a": "alive", "b": "left"}


async def test_clustering_off(make_node: NodeFactory) -> None:
    async with make_node(system, **{"cluster.enabled": False}) as node:
        url = f"http://127.0.0.1:{node.ops_port}"
        assert (await get_json(f"{url}/v1/members"))["enabled"] is False
        assert (await get_json(f"{url}/v1/node"))["cluster"] is None
        status, reply = await post(f"{url}/v1/cluster/join", {"addrs": ["127.0.0.1:1"]})
        assert status == 400 and "cluster.enabled" in reply["error"]["message"]
        assert node.membership is None
